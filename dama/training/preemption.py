"""Graceful preemption: on a signal of `save_on_signal` (SIGTERM, SIGUSR1 by default) finish the optimizer step,
save a complete checkpoint, and stop with exit status 75 (dama.exit_status.EXIT_REQUEUE) for the scheduler to requeue.

The handler only records the signal. After each optimizer step the flag is summed over the ranks (one all_reduce of
one number), so under torchrun and DeepSpeed every rank stops after the same step and saves the same checkpoint,
whichever rank the signal reached. The checkpoint is an ordinary one (the model, the optimizer and scheduler, the RNG,
the DAMA state and the data position in trainer_state.json), so `--resume true` continues from it as from any
other. A second signal before the checkpoint is complete ends the process at once with the signal's default action
(the checkpoints are written atomically, so the last complete one stays as it was); after it, the process is on
its way out with status 75 and further signals of the list are ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import torch
from transformers import Trainer, TrainerCallback

from dama.errors import DamaError
from dama.exit_status import EXIT_REQUEUE, Preempted
from dama.method.distributed import all_reduce_sum, is_distributed

from .checkpointing import newest_checkpoint

NO_SIGNALS = "none"


def signals_from_option(value: str) -> tuple[signal.Signals, ...]:
    """`save_on_signal` ("SIGTERM,SIGUSR1", "TERM", "none") -> the signals; DamaError naming a wrong one."""
    if value.strip().lower() == NO_SIGNALS:
        return ()
    chosen = []
    for name in (part.strip().upper() for part in value.split(",") if part.strip()):
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, name):
            raise DamaError(f"save_on_signal: {name} is not a signal a process can catch; give names such as "
                             "SIGTERM,SIGUSR1, or none")
        chosen.append(signal.Signals[name])
    if not chosen:
        raise DamaError("save_on_signal is empty: give signal names such as SIGTERM,SIGUSR1, or none")
    return tuple(chosen)


class SaveOnSignal(TrainerCallback):
    """Turns a recorded signal into "save this step's checkpoint, then stop", the same step on every rank."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.received: signal.Signals | None = None
        self.stopped_at: int | None = None

    def handle(self, signum: int, frame) -> None:
        if self.received is not None:
            # The second signal: the default action, now (the atomic saves keep the last complete checkpoint).
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum)
        # os.write, not print: a signal handler may run in the middle of another print to the same stream.
        os.write(2, f"dama train: {self.received.name} received: finishing this optimizer step, then saving a "
                    f"checkpoint (a second signal stops at once)\n".encode())

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Before on_step_end, where the Trainer's own flow decides on logging and saving; should_save set here
        # survives it, and the save follows this step.
        requested = self.received is not None
        if is_distributed():
            requested = float(all_reduce_sum(torch.tensor(float(requested), device=self.device))) > 0
        if requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step + 1  # counted up right after this hook
        return control


@contextlib.contextmanager
def stop_on_signal(trainer: Trainer) -> Iterator[SaveOnSignal]:
    """Installs the handlers of `trainer.args.save_on_signal` for the block (the training loop). When the block ends
    after a signal stopped the run, raises Preempted with the checkpoint it saved."""
    signals = signals_from_option(trainer.args.save_on_signal)
    callback = SaveOnSignal(trainer.args.device)
    trainer.add_callback(callback)
    previous = {number: signal.signal(number, callback.handle) for number in signals}
    try:
        yield callback
    finally:
        for number, handler in previous.items():
            # Once stopped, the checkpoint is complete and the process is on its way out with status 75: another
            # signal (a launcher relays one when a worker ends) must not turn that into a death by signal.
            signal.signal(number, signal.SIG_IGN if callback.stopped_at is not None else handler)
        trainer.remove_callback(callback)
    if callback.stopped_at is not None:
        # No rank leaves before every rank's part of the checkpoint is written: a launcher that sees one worker end
        # signals the others, and that signal would be their second.
        trainer.accelerator.wait_for_everyone()
        checkpoint = newest_checkpoint(trainer.args.output_dir)
        why = f"{callback.received.name} received" if callback.received else "a signal reached another rank"
        raise Preempted(f"{why}: saved {checkpoint} (step {callback.stopped_at} of {trainer.state.max_steps}); "
                        f"requeue with --resume true (exit status {EXIT_REQUEUE})")

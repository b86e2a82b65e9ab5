"""Disk space for `dama train`'s saves: checked before each checkpoint, and a failed write told as one line.

Before a checkpoint is written, the free space of output_dir's filesystem is compared with the size it will need:
the newest complete checkpoint's size, or before the first one the estimate of dama.planning.checkpoint_size (the
figure `dama plan` prints). A save that cannot fit is not started: the run stops with one line (needed, free, the
last complete checkpoint) and exit status 74, every rank together (the shortfall is summed over the ranks that
write). A write that fails anyway (ENOSPC, EDQUOT, EIO, or the same words from torch's serializer) gives the same
kind of line: the checkpoint being written is removed, the complete ones are never touched, and `--resume true`
goes on from the newest once there is space.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dama.disk_space import check_room, free_bytes, is_write_error, tree_bytes, write_failure
from dama.exit_status import ResumableStop, WriteFailed
from dama.method.distributed import all_reduce_sum, is_distributed
from dama.planning.checkpoint_size import checkpoint_size
from dama.planning.model_shape import ModelShape
from dama.planning.setup import training_setup

from .checkpointing import is_complete, newest_checkpoint

logger = logging.getLogger(__name__)


def first_checkpoint_estimate(trainer: Trainer) -> int | None:
    """The planned size of one checkpoint of this run, or None when the plan does not know its model or optimizer."""
    try:
        shape = ModelShape.from_config(trainer.model.llava.config)
        setup = training_setup(trainer.args, shape, device=trainer.args.device.type)
    except ValueError as error:
        logger.warning("no estimate of the checkpoint size (%s): the first save is not checked for space", error)
        return None
    return checkpoint_size(shape, setup).total


def intact_note(output_dir: str | Path) -> str:
    """What a rerun continues from, for the one-line message."""
    newest = newest_checkpoint(output_dir)
    if newest is None:
        return "no checkpoint was complete yet"
    return f"the last complete checkpoint, {newest}, is intact"


class CheckpointRoom(TrainerCallback):
    """Refuses a checkpoint that cannot fit before the Trainer starts writing it (see the module docstring)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.writes = trainer.args.should_save or trainer.is_deepspeed_enabled  # DeepSpeed: every rank writes
        self.estimate: int | None = None
        self.pending: str | None = None  # the checkpoint decided on and not yet saved

    def needed(self) -> int | None:
        newest = newest_checkpoint(self.trainer.args.output_dir)
        if newest is not None:
            return tree_bytes(newest)
        if self.estimate is None:
            self.estimate = first_checkpoint_estimate(self.trainer)
        return self.estimate

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.check(args, state)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:  # save_strategy "epoch"
            self.check(args, state)
        return control

    def check(self, args, state) -> None:
        """WriteFailed on every rank when the checkpoint of this step does not fit on a rank that writes."""
        self.pending = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        needed = self.needed() if self.writes else None
        short = self.writes and needed is not None and free_bytes(args.output_dir) < needed
        shortfall = torch.tensor(float(short), device=args.device)
        if is_distributed():
            shortfall = all_reduce_sum(shortfall)
        if float(shortfall) > 0:
            intact = intact_note(args.output_dir)
            if short:
                check_room(args.output_dir, needed, self.pending, intact)
            raise WriteFailed(f"not enough disk space for {self.pending} on another rank; {intact}")

    def on_save(self, args, state, control, **kwargs):
        self.pending = None
        return control


def _remove_partial(output_dir: Path, name: str) -> None:
    """Removes what a failed save of checkpoint `name` left; a complete checkpoint is never touched."""
    folder = output_dir / name
    if folder.is_dir() and not is_complete(folder):
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def guarded_writes(trainer: Trainer) -> Iterator[CheckpointRoom]:
    """For the block (training, then the final save): the space check before each checkpoint, and a failed write
    turned into WriteFailed."""
    room = CheckpointRoom(trainer)
    trainer.add_callback(room)
    output_dir = Path(trainer.args.output_dir)
    try:
        yield room
    except ResumableStop:
        raise
    except Exception as error:
        if not is_write_error(error):
            raise
        if room.pending and trainer.args.should_save:
            _remove_partial(output_dir, room.pending)
        needed = room.needed() if room.writes else None
        raise write_failure(error, output_dir, needed, room.pending or "the final model",
                            intact_note(output_dir)) from error
    finally:
        trainer.remove_callback(room)

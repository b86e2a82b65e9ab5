"""Checkpoints of a DamaTrainer: what the model folder holds, when a checkpoint counts as complete, rotation, resume.

The Trainer writes checkpoint-N in place (the model through DamaTrainer.save_model, then its optimizer, scheduler,
RNG and trainer state). Only then does CheckpointCompletion, a TrainerCallback, add the DamaLoss state and the
completion marker (written atomically, after every process has finished writing): a folder without the marker is a
save that was cut short and is never resumed from, counted for rotation or kept: the next training start removes it.
The saved model is the LLaVA inside the policy, as a loadable save_pretrained folder; with LoRA it is the adapter
folder (dama.model.lora), which peft loads onto the base checkpoint and `dama export --merge` folds in.

Best-model tracking (`load_best_model_at_end`, `save_strategy: best`): the Trainer records the best checkpoint where it
is written; rotation never deletes it, and loading it at the end goes through save_pretrained's own loader into the
LLaVA inside the policy (with LoRA: the adapters' weights into the adapters; dama.training.private_overrides).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dama.data.formats import write_json_atomic
from dama.method.loss import DamaLoss
from dama.model.lora import adapter_state_dict, save_adapters

logger = logging.getLogger(__name__)

DAMA_STATE_NAME = "dama_state.pt"
COMPLETE_MARKER = "checkpoint_complete.json"


def _checkpoint_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every checkpoint-N folder of output_dir, complete or not, by step."""
    folders = []
    for folder in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = folder.name.rsplit("-", 1)[-1]
        if step.isdigit() and folder.is_dir():
            folders.append((int(step), folder))
    return sorted(folders)


def is_complete(folder: str | Path) -> bool:
    """Whether a checkpoint folder carries its completion marker (written last, so everything else is there)."""
    return Path(folder, COMPLETE_MARKER).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoint-N folders of output_dir, oldest step first."""
    return [folder for _, folder in _checkpoint_folders(output_dir) if is_complete(folder)]


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint-N folder with the largest N in output_dir, or None."""
    complete = complete_checkpoints(output_dir)
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Deletes the checkpoint folders without a marker (saves cut short by a crash); returns them."""
    removed = [folder for _, folder in _checkpoint_folders(output_dir) if not is_complete(folder)]
    for folder in removed:
        logger.warning("removing %s: its save did not complete (no %s)", folder, COMPLETE_MARKER)
        shutil.rmtree(folder)
    return removed


def mark_complete(folder: str | Path, dama_loss: DamaLoss, global_step: int, nonfinite_steps: int) -> None:
    """Completes a checkpoint the Trainer has written: the DamaLoss state, then the marker. Call on the process that
    saves, once every process has finished writing into `folder`."""
    torch.save(dama_loss.state_dict(), Path(folder, DAMA_STATE_NAME))
    write_json_atomic(Path(folder, COMPLETE_MARKER), {"global_step": global_step, "nonfinite_steps": nonfinite_steps})


def rotate_complete_checkpoints(output_dir: str | Path, limit: int | None, best: str | Path | None) -> None:
    """Deletes the oldest complete checkpoints beyond `limit`, never `best`."""
    if not limit:
        return
    for folder in complete_checkpoints(output_dir)[:-limit]:
        if best is None or Path(best).resolve() != folder.resolve():
            shutil.rmtree(folder)


def save_policy_folder(trainer, output_dir: str | Path, state_dict: dict | None = None) -> None:
    """Writes the model of a DamaTrainer (`model.llava`, `adapters`) as a loadable folder, with its processor and
    training arguments. state_dict: the policy's gathered weights when the live ones are partitioned (ZeRO-3)."""
    os.makedirs(output_dir, exist_ok=True)
    if trainer.adapters is not None:
        save_adapters(trainer.adapters, output_dir, None if state_dict is None else adapter_state_dict(state_dict))
    else:
        if state_dict is not None:
            state_dict = {key[len("llava."):]: value for key, value in state_dict.items() if key.startswith("llava.")}
        trainer.model.llava.save_pretrained(output_dir, state_dict=state_dict)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, "training_args.bin"))


def load_llava_weights(llava: torch.nn.Module, folder: str | Path) -> None:
    """Loads the weights of a save_pretrained folder into `llava` in place, every key accounted for.

    Goes through from_pretrained: transformers renames LLaVA's keys on save (to the original checkpoint layout) and
    only its loader maps them back.
    """
    if not Path(folder, "config.json").is_file():
        raise ValueError(f"{folder}: no saved model to resume from")
    dtype = next(llava.parameters()).dtype
    saved = type(llava).from_pretrained(folder, dtype=dtype, local_files_only=True)
    llava.load_state_dict(saved.state_dict(), strict=True)


def restore_dama_state(checkpoint: str | Path, dama_loss: DamaLoss) -> int:
    """Loads the DamaLoss running state of a complete checkpoint into `dama_loss`; returns its non-finite count."""
    state_file = Path(checkpoint, DAMA_STATE_NAME)
    if not is_complete(checkpoint) or not state_file.is_file():
        raise ValueError(f"{checkpoint} is not a complete dama checkpoint (no {COMPLETE_MARKER} or "
                         f"{DAMA_STATE_NAME}): resume from another checkpoint")
    # weights_only, explicitly (an environment variable can change the default): a checkpoint folder is data, and
    # must not be able to run code when it is resumed from. Read on the CPU (a launcher's device may be "cpu:0",
    # which torch.load cannot map to); load_state_dict copies the values onto the buffers' own device.
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{state_file} holds more than tensors and was not loaded ({error})") from error
    dama_loss.load_state_dict(state)
    marker = json.loads(Path(checkpoint, COMPLETE_MARKER).read_text())
    return int(marker.get("nonfinite_steps", 0))


class CheckpointCompletion(TrainerCallback):
    """Marks each checkpoint of a DamaTrainer complete once the Trainer has saved it, then rotates the complete ones;
    at the start of training, removes the checkpoint folders a crash left without their marker.

    on_save is the Trainer's own signal that checkpoint-<global_step> has been written (model, optimizer, scheduler,
    RNG, trainer state) on this process; the others may still be writing theirs, hence the barrier first.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save:
            remove_incomplete_checkpoints(args.output_dir)
        self.trainer.accelerator.wait_for_everyone()

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        folder = Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        trainer.accelerator.wait_for_everyone()
        if args.should_save:
            if not folder.is_dir():
                raise RuntimeError(f"the Trainer reported a save, but {folder} does not exist")
            mark_complete(folder, trainer.dama_loss, state.global_step, trainer.nonfinite_steps)
            rotate_complete_checkpoints(args.output_dir, args.save_total_limit, state.best_model_checkpoint)
        trainer.accelerator.wait_for_everyone()
        return control

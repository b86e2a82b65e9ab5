"""Checkpoints of a DamaTrainer: atomic saves that carry the DamaLoss state, rotation, and resume.

A checkpoint is written under <output_dir>/.staging/checkpoint-N and renamed into place once complete (with a
completion marker), so a crash mid-save never leaves a half-written checkpoint-N; only complete checkpoints count for
rotation and resume. The saved model is the LLaVA inside the policy, as a loadable save_pretrained folder; with LoRA it
is the adapter folder (dama.model.lora), which peft loads onto the base checkpoint and `dama export --merge` folds in.

Best-model tracking (`load_best_model_at_end`, `save_strategy: best`): the Trainer records the best checkpoint while
it is still in the staging folder; the record (and the trainer_state.json saved with it) is moved to the final
folder with the rename, rotation never deletes the best checkpoint, and loading it at the end goes through
save_pretrained's own loader into the LLaVA inside the policy (with LoRA: the adapters' weights into the adapters).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dama.method.loss import DamaLoss
from dama.model.lora import adapter_state_dict, load_adapter_weights, save_adapters

DAMA_STATE_NAME = "dama_state.pt"
STAGING_DIR = ".staging"
COMPLETE_MARKER = "checkpoint_complete.json"


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint-N folder with the largest N in output_dir, or None."""
    candidates = []
    for folder in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = folder.name.rsplit("-", 1)[-1]
        if step.isdigit() and (folder / COMPLETE_MARKER).is_file():
            candidates.append((int(step), folder))
    return max(candidates)[1] if candidates else None


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
    if not state_file.is_file():
        raise ValueError(f"{checkpoint} has no {DAMA_STATE_NAME}: not a complete dama checkpoint")
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


class AtomicCheckpoints:
    """Mixin for a transformers.Trainer subclass with `model.llava`, `dama_loss` and `adapters` (peft's PeftModel
    around model.llava, or None): the checkpoint methods."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Saves the LLaVA inside the policy as a loadable save_pretrained folder (the head shares its weights)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if self.adapters is not None:
            save_adapters(self.adapters, output_dir, None if state_dict is None else adapter_state_dict(state_dict))
        else:
            if state_dict is not None:
                state_dict = {key[len("llava."):]: value for key, value in state_dict.items()
                              if key.startswith("llava.")}
            self.model.llava.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staged):
            shutil.rmtree(staged)  # left over from a crash during an earlier save of this step
        # The parent writes into <run_dir>/.staging/checkpoint-N; renaming it afterwards makes the save atomic.
        self._get_output_dir = lambda trial=None: staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        if self.state.best_model_checkpoint is not None and Path(self.state.best_model_checkpoint) == Path(staged):
            # Recorded while the checkpoint sat in the staging folder: point it at where the rename puts it.
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        if self.args.should_save:
            torch.save(self.dama_loss.state_dict(), os.path.join(staged, DAMA_STATE_NAME))
            marker = {"global_step": self.state.global_step, "nonfinite_steps": self.nonfinite_steps}
            Path(staged, COMPLETE_MARKER).write_text(json.dumps(marker))
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            self._rotate_complete_checkpoints(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate_complete_checkpoints(self, run_dir: str) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        complete = sorted((int(p.name.rsplit("-", 1)[-1]), p) for p in Path(run_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                          if (p / COMPLETE_MARKER).is_file())
        best = self.state.best_model_checkpoint
        for _, folder in complete[:-limit]:
            if best is None or Path(best).resolve() != folder.resolve():
                shutil.rmtree(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_model_weights(resume_from_checkpoint, (model or self.model).llava)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:
            super()._load_best_model()  # the engine's own checkpoint files, saved with every checkpoint
        else:
            self._load_model_weights(self.state.best_model_checkpoint, self.model.llava)

    def _load_model_weights(self, folder: str, llava: torch.nn.Module) -> None:
        if self.adapters is not None:
            load_adapter_weights(self.adapters, folder)
        else:
            load_llava_weights(llava, folder)

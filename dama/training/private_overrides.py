"""The only private transformers.Trainer methods DamaTrainer overrides, each where the Trainer has no public hook.

Both read model weights back into the policy. The Trainer's own loaders load `model.safetensors` into `trainer.model`
with load_state_dict; here `trainer.model` is a DamaPolicy wrapping the LLaVA, and the folder is the LLaVA's own
save_pretrained output (keys renamed to the original checkpoint layout, which only from_pretrained maps back) or a
LoRA adapter folder. No callback or public method runs in their place: resume loads the weights inside train(),
before any callback, and the best model is loaded before on_train_end.
"""

from __future__ import annotations

import torch

from dama.model.lora import load_adapter_weights

from .checkpointing import load_llava_weights


def load_policy_weights(llava: torch.nn.Module, adapters, folder: str) -> None:
    """A checkpoint's weights into the policy, in place: the adapters' with LoRA (adapters given), else the LLaVA's."""
    if adapters is not None:
        load_adapter_weights(adapters, folder)
    else:
        load_llava_weights(llava, folder)


class PolicyWeightLoading:
    """Mixin for a transformers.Trainer subclass with `model.llava` and `adapters` (peft's PeftModel around
    model.llava, or None)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # Called by Trainer.train(resume_from_checkpoint=...) before the loop; DeepSpeed resumes through its engine.
        load_policy_weights((model or self.model).llava, self.adapters, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        # Called at the end of training under load_best_model_at_end.
        if self.is_deepspeed_enabled:
            super()._load_best_model()  # the engine's own checkpoint files, saved with every checkpoint
        else:
            load_policy_weights(self.model.llava, self.adapters, self.state.best_model_checkpoint)

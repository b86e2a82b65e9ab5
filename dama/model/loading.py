"""Loading a LLaVA from a local folder and choosing what trains: freezing, liger's kernels (LoRA is in lora.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dama.errors import DamaError
from dama.options import DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def load_llava(path: str | Path, dtype: str = "float32") -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA model and its processor from a local folder (never the hub)."""
    path = Path(path)
    processor = load_processor(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    return model, processor


def load_processor(path: str | Path) -> LlavaProcessor:
    """The processor (tokenizer and image processor) of a saved LLaVA folder, without its weights."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DamaError(f"{path} holds no config.json: give the folder of a saved LlavaForConditionalGeneration")
    return LlavaProcessor.from_pretrained(path, local_files_only=True)


def configure_trainable(
    model: LlavaForConditionalGeneration,
    *,
    freeze_vision_tower: bool = True,
    freeze_projector: bool = False,
    freeze_language_model: bool = False,
) -> dict[str, int]:
    """Sets requires_grad per part; returns the trainable parameter count of each part."""
    parts = {
        "vision_tower": (model.model.vision_tower, freeze_vision_tower),
        "projector": (model.model.multi_modal_projector, freeze_projector),
        "language_model": (model.model.language_model, freeze_language_model),
        "lm_head": (model.lm_head, freeze_language_model),
    }
    counts = {}
    for name, (module, frozen) in parts.items():
        module.requires_grad_(not frozen)
        # Under ZeRO-3 a parameter is partitioned at load time and its full size is kept in ds_numel.
        counts[name] = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)
    if not any(counts.values()):
        raise DamaError("every part of the model is frozen: nothing would train")
    return counts


def apply_liger_patches(model: LlavaForConditionalGeneration) -> None:
    """liger-kernel's Llama kernels (RMSNorm, SwiGLU, RoPE) on the language model; they need a GPU."""
    if not torch.cuda.is_available():
        raise DamaError("liger_patches needs a CUDA GPU (liger's Triton kernels do not run on the CPU)")
    text_type = model.config.text_config.model_type
    if text_type != "llama":
        raise DamaError(f"liger_patches covers a Llama language model (LLaVA-1.5's), this one is {text_type!r}: "
                        "set liger_patches: false")
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    # Given the instance, liger swaps its modules in place (and LlamaRMSNorm, LlamaMLP and RoPE in transformers'
    # Llama module for models built later); the loss stays the project's own.
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model.model.language_model)

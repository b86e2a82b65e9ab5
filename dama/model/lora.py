"""LoRA on a LLaVA with peft: adapters on the language model's linear layers, whole parts trained beside them, the
adapter folder peft reads back, and merging the adapters into plain LLaVA weights.

What trains: a rank-r pair (A (r, in), B (out, r)) beside every q/k/v/o/gate/up/down projection of the language model,
whose own weights (and the lm_head's) stay frozen; the projector and the vision tower train whole when asked. Those
are peft's "modules to save": a trainable copy is made beside the original, so switching the adapters off gives back
the starting model exactly (the online reference of DPO, without a second model in memory).

Precision: trainable weights are kept in fp32 (the adapters by peft, the whole-part copies here), frozen ones in the
loaded dtype. With 16-bit frozen weights the step must run under autocast (--bf16 / --fp16), which runs the fp32
adapters in 16 bits; peft's own cast of each adapter's input to fp32 is switched off, since it would keep an fp32
copy of the input of every adapted projection alive for the backward. Under DeepSpeed, which casts the model to
16 bits and keeps fp32 masters in its optimizer, everything stays in the base's dtype (fp32_trained=False).

Folder format: peft's (adapter_config.json + adapter_model.safetensors), keys named after the in-memory modules,
so `PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), folder)` loads it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from dama.errors import DamaError

from .loading import DTYPES

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# peft's key prefix of the wrapped model's parameters: PeftModel.base_model (LoraModel).model (the LLaVA).
PEFT_PREFIX = "base_model.model."
# The LLaVA attributes that can be trained whole beside the adapters (peft matches module names by suffix).
WHOLE_PARTS = {"projector": "multi_modal_projector", "vision_tower": "vision_tower"}


def _peft():
    try:
        import peft
    except ImportError as missing:
        raise DamaError("lora_rank > 0 needs peft: pip install '.[lora]'") from missing
    return peft


def apply_lora(llava: LlavaForConditionalGeneration, rank: int, alpha: float, *, train_projector: bool = True,
               train_vision_tower: bool = False, base_model_path: str | Path | None = None, seed: int = 0,
               fp32_trained: bool = True):
    """Adds LoRA adapters to `llava` in place and returns peft's PeftModel around it (`.base_model.model is llava`).

    Every base weight is frozen; the adapters train, and the projector / vision tower too when asked (as trainable
    copies beside the frozen originals). fp32_trained keeps what trains in fp32 whatever the base's dtype; an engine
    that keeps fp32 masters itself (DeepSpeed) wants them in the base's dtype instead. base_model_path is written into
    the adapter config, so that the adapter folder names the checkpoint it applies to. The A matrices are drawn from
    `seed` (B starts at zero), whatever the caller's random state.
    """
    peft = _peft()
    if rank < 1:
        raise DamaError(f"lora_rank must be >= 1 to add adapters, got {rank}")
    whole = [name for part, name in WHOLE_PARTS.items()
             if {"projector": train_projector, "vision_tower": train_vision_tower}[part]]
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0,
        target_modules=rf".*language_model.*\.({'|'.join(LORA_TARGETS)})",
        modules_to_save=whole or None,
        base_model_name_or_path=None if base_model_path is None else str(base_model_path),
    )
    llava.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapters = peft.get_peft_model(llava, config, autocast_adapter_dtype=fp32_trained)
    for module in llava.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.cast_input_dtype_enabled = False
        if fp32_trained and isinstance(module, peft.utils.other.ModulesToSaveWrapper):
            module.modules_to_save.float()
    return adapters


def trainable_parameter_counts(llava: LlavaForConditionalGeneration) -> dict[str, int]:
    """Trainable parameters per part: lora_adapters, vision_tower, projector, language_model, lm_head.

    Counts what has requires_grad now (after freezing and LoRA); under ZeRO-3 a partitioned parameter's full size
    is its ds_numel.
    """
    counts = dict.fromkeys(("lora_adapters", "vision_tower", "projector", "language_model", "lm_head"), 0)
    for name, parameter in llava.named_parameters():
        if not parameter.requires_grad:
            continue
        size = getattr(parameter, "ds_numel", parameter.numel())
        if ".lora_" in name:
            part = "lora_adapters"
        elif ".vision_tower." in f".{name}":
            part = "vision_tower"
        elif ".multi_modal_projector." in f".{name}":
            part = "projector"
        elif name.startswith("lm_head."):
            part = "lm_head"
        else:
            part = "language_model"
        counts[part] += size
    return counts


def adapter_state_dict(policy_state_dict: dict[str, torch.Tensor], prefix: str = "llava.") -> dict[str, torch.Tensor]:
    """Keys of a DamaPolicy state dict (`llava.<name>`) renamed to the PeftModel's (`base_model.model.<name>`)."""
    return {PEFT_PREFIX + key[len(prefix):]: value for key, value in policy_state_dict.items()
            if key.startswith(prefix)}


def save_adapters(adapters, output_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Writes the adapter folder (config + weights of the adapters and of the parts trained whole).

    state_dict: the PeftModel's full state dict when the live weights are not readable as they are (ZeRO-3 hands
    over gathered weights); None reads them from `adapters`.
    """
    adapters.save_pretrained(str(output_dir), state_dict=state_dict, save_embedding_layers=False)
    # peft writes a model card template as well; the folder is data, not a hub page.
    Path(output_dir, "README.md").unlink(missing_ok=True)


def load_adapter_weights(adapters, folder: str | Path) -> None:
    """Loads the adapter weights of an adapter folder into `adapters` in place; every adapter key must be there."""
    peft = _peft()
    weights_file = Path(folder, ADAPTER_WEIGHTS_NAME)
    if not weights_file.is_file():
        raise DamaError(f"{folder} holds no {ADAPTER_WEIGHTS_NAME}: not a LoRA checkpoint of this run")
    result = peft.set_peft_model_state_dict(adapters, load_file(str(weights_file)))
    trained = {name for name, p in adapters.named_parameters() if p.requires_grad}
    missing = sorted(set(result.missing_keys) & trained)
    if missing or result.unexpected_keys:
        raise DamaError(f"{weights_file} does not match this model's adapters: missing {missing[:3]}, unexpected "
                        f"{list(result.unexpected_keys)[:3]} (was it saved with another lora_rank or parts?)")


def merge_adapters(adapter_dir: str | Path, output_dir: str | Path, base_model_path: str | Path | None = None,
                   dtype: str = "auto") -> Path:
    """Folds the adapters of `adapter_dir` into their base checkpoint and writes a plain LLaVA folder.

    The base is `base_model_path`, else the one named in the adapter config. dtype: of the written weights, "auto" =
    the base checkpoint's. The folder (weights, config, processor) is written beside `output_dir` and renamed into
    place when complete. Returns output_dir.
    """
    peft = _peft()
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not (adapter_dir / ADAPTER_CONFIG_NAME).is_file():
        raise DamaError(f"{adapter_dir} holds no {ADAPTER_CONFIG_NAME}: give the output folder (or a checkpoint) of "
                        "a `dama train` run with lora_rank > 0")
    config = peft.PeftConfig.from_pretrained(str(adapter_dir))
    base = Path(base_model_path or config.base_model_name_or_path or "")
    if not (base / "config.json").is_file():
        raise DamaError(f"the base checkpoint {str(base)!r} holds no config.json: pass --base, the folder the "
                        "adapters were trained on")
    if output_dir.resolve() in (adapter_dir.resolve(), base.resolve()):
        raise DamaError(f"--output {output_dir} would replace the adapters or the base checkpoint: give a new folder")
    if dtype != "auto" and dtype not in DTYPES:
        raise DamaError(f"dtype must be 'auto' or one of {tuple(DTYPES)}, got {dtype!r}")
    llava = LlavaForConditionalGeneration.from_pretrained(
        base, dtype="auto" if dtype == "auto" else DTYPES[dtype], local_files_only=True)
    merged = peft.PeftModel.from_pretrained(llava, str(adapter_dir)).merge_and_unload()
    processor_source = adapter_dir if (adapter_dir / "processor_config.json").is_file() else base
    processor = LlavaProcessor.from_pretrained(processor_source, local_files_only=True)

    staging = output_dir.with_name(output_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)  # left over from an export that crashed
    merged.save_pretrained(staging)
    processor.save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(staging, output_dir)
    logger.info("merged %s into %s -> %s", adapter_dir, base, output_dir)
    return output_dir

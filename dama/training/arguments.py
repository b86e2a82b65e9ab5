"""The project's single training config: transformers.TrainingArguments + the DAMA method + model and data options.

`dama train --config configs/<name>.yaml [--field value ...]` parses it: YAML first, the command line wins, unknown
keys are errors. Each field is documented once, in its `help`, which is also what `dama train --help` prints.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments

from dama.data.collator import LAYOUTS
from dama.method.config import DamaMethodConfig, _check_choice

HEADS = ("fused", "full_logits")
ATTENTIONS = ("packed", "sdpa", "eager")
OVERLONG = ("error", "skip")
REFERENCES = ("precomputed", "online")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DamaTrainingArguments(TrainingArguments, DamaMethodConfig):
    # Model
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local folder of a saved LlavaForConditionalGeneration and its processor (no hub access)."},
    )
    model_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={"help": "Dtype the weights are loaded in. With --bf16 on a GPU keep float32 masters (mixed "
                  "precision) or load bfloat16 to halve weight memory."},
    )
    freeze_vision_tower: bool = field(
        default=True, metadata={"help": "Keep the CLIP vision tower frozen (the authors' recipe)."}
    )
    freeze_projector: bool = field(default=False, metadata={"help": "Keep the multimodal projector frozen."})
    freeze_language_model: bool = field(
        default=False, metadata={"help": "Keep the language model frozen (train only the projector, or LoRA)."}
    )
    lora_rank: int = field(
        default=0,
        metadata={"help": "LoRA rank on the language model's linear layers (needs `pip install .[lora]`); 0 = off."},
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / rank)."})
    liger_patches: bool = field(
        default=False,
        metadata={"help": "Apply liger-kernel's Llama kernels (RMSNorm, SwiGLU, RoPE) to the language model (GPU)."},
    )
    attention: Literal["packed", "sdpa", "eager"] = field(
        default="packed",
        metadata={"help": "Attention: 'packed' (flash-attn varlen on a GPU when installed, exact per-segment SDPA "
                  "otherwise; for layout prefix_shared or packed), or transformers' 'sdpa' / 'eager' (padded "
                  "layout)."},
    )
    head: Literal["fused", "full_logits"] = field(
        default="fused",
        metadata={"help": "Log-prob head: 'fused' scores supervised tokens from hidden states without logits; "
                  "'full_logits' builds logits for every position (the usual DPO trainer, kept as a baseline)."},
    )
    # Data
    train_file: str | None = field(
        default=None,
        metadata={"help": "Training pairs: an RLAIF-V parquet file or folder of shards, or the authors' JSON list. "
                  "Needs reference log-prob columns (dama precompute-ref) unless reference=online."},
    )
    eval_file: str | None = field(default=None, metadata={"help": "Held-out pairs, same format as train_file."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder that image_path entries are relative to (JSON format)."}
    )
    max_length: int = field(
        default=2048, metadata={"help": "Most tokens of one sequence (prompt + image tokens + response)."}
    )
    overlong: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "A pair longer than max_length: stop with an error naming it, or skip it and count it."},
    )
    layout: Literal["prefix_shared", "packed", "padded"] = field(
        default="prefix_shared",
        metadata={"help": "Micro-batch layout: 'prefix_shared' puts each pair in one row as [prompt | chosen | "
                  "rejected], so the image and prompt tokens go through the language model once per pair (exact: "
                  "each response attends to the prompt and itself only); 'packed' puts the 2P sequences in one row "
                  "without padding; 'padded' pads chosen and rejected to one length (the usual layout, a baseline)."},
    )
    max_tokens_per_batch: int = field(
        default=0,
        metadata={"help": "Token budget per micro-batch: pairs are grouped so their length in the layout (the "
                  "prompt counted once with prefix_shared) stays under it (per_device_train_batch_size is then "
                  "ignored). 0 = fixed pairs per batch."},
    )
    shuffle: bool = field(
        default=True,
        metadata={"help": "Shuffle the training pairs each epoch; false keeps file order (the authors' setting)."},
    )
    reference: Literal["precomputed", "online"] = field(
        default="precomputed",
        metadata={"help": "Reference log-probs from the data's columns (precomputed once, no reference model in "
                  "memory) or from a frozen copy of the starting model run online."},
    )
    # Robustness
    max_nonfinite_steps: int = field(
        default=5,
        metadata={"help": "A micro-batch with a non-finite loss is skipped and counted; this many in a row stop "
                  "the run with an error (the last checkpoint stays intact)."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the newest complete checkpoint in output_dir (if there is one)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_method_options()
        _check_choice("head", self.head, HEADS)
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("attention", self.attention, ATTENTIONS)
        _check_choice("overlong", self.overlong, OVERLONG)
        _check_choice("reference", self.reference, REFERENCES)
        _check_choice("model_dtype", self.model_dtype, DTYPES)
        if (self.attention == "packed") != (self.layout != "padded"):
            raise ValueError(f"attention={self.attention!r} does not fit layout={self.layout!r}: layouts "
                             "'prefix_shared' and 'packed' need attention='packed', layout='padded' needs "
                             "attention='sdpa' or 'eager'")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_tokens_per_batch < 0 or self.max_nonfinite_steps < 1 or self.lora_rank < 0:
            raise ValueError("max_tokens_per_batch and lora_rank must be >= 0, max_nonfinite_steps >= 1")
        # The trainer computes its own loss from packed batches; these keep the Trainer from dropping our columns.
        self.remove_unused_columns = False


def _yaml_to_argv(values: dict[str, Any], known: set[str], source: str) -> list[str]:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; `dama train --help` lists every field")
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_training_arguments(argv: list[str] | None = None) -> DamaTrainingArguments:
    """`--config file.yaml` (optional) then the command line; the command line wins and unknown keys are errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(DamaTrainingArguments, prog="dama train")
    parser.add_argument("--config", default=None, help="YAML file of field: value pairs; command-line flags win.")
    yaml_argv: list[str] = []
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path")
        config_path = Path(argv[position + 1])
        if not config_path.is_file():
            raise ValueError(f"--config {config_path}: no such file")
        values = yaml.safe_load(config_path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config_path}: expected a mapping of field: value")
        yaml_argv = _yaml_to_argv(values, {f.name for f in fields(DamaTrainingArguments)}, str(config_path))
    (arguments, _config) = parser.parse_args_into_dataclasses(args=yaml_argv + argv, return_remaining_strings=False)
    return arguments


def resolved_config(arguments: DamaTrainingArguments) -> dict[str, Any]:
    """Every field with its final value, JSON-safe, for the output folder."""
    resolved = {}
    for f in fields(arguments):
        value = getattr(arguments, f.name)
        plain = isinstance(value, str | int | float | bool | type(None) | list | dict)
        resolved[f.name] = value if plain else str(value)
    return resolved


def fields_markdown() -> str:
    """A Markdown table of the fields this project adds to TrainingArguments, from their help texts."""
    own = [f for f in fields(DamaTrainingArguments) if f.name not in {g.name for g in fields(TrainingArguments)}]
    lines = ["| field | default | what it does |", "|---|---|---|"]
    for f in own:
        default = f.default if f.default is not None else "None"
        lines.append(f"| `{f.name}` | `{default}` | {f.metadata.get('help', '')} |")
    return "\n".join(lines)

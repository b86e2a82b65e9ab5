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
from dama.data.dataset import IMAGE_ASPECT_RATIOS, OVERLONG_POLICIES, VICUNA_V1_SYSTEM
from dama.data.validation import BAD_ROW_POLICIES
from dama.method.config import DamaMethodConfig, _check_choice
from dama.model.loading import DTYPES
from dama.model.policy import HEADS
from dama.training.transformers_compat import ActivationCheckpointingFields

ATTENTIONS = ("packed", "sdpa", "eager")
REFERENCES = ("precomputed", "online")


@dataclass
class DamaTrainingArguments(ActivationCheckpointingFields, TrainingArguments, DamaMethodConfig):
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
        metadata={"help": "LoRA rank on the language model's seven projections per layer (needs `pip install "
                  ".[lora]`); 0 = off. The language model's own weights then stay frozen; the projector (and the "
                  "vision tower) train whole beside the adapters unless frozen. Output: a peft adapter folder "
                  "(`dama export --merge` folds it into the base model)."},
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
        metadata={"help": "A pair longer than max_length: stop with an error naming it, or skip it (counted, logged "
                  "and listed in output_dir/skipped_rows.json)."},
    )
    on_bad_row: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "A bad row (missing, corrupt or over-large image, empty or missing response, non-finite "
                  "hardness or reference log-probs), found by checking every row before training starts: stop with "
                  "an error naming it, or skip it (counted by reason, logged and listed in "
                  "output_dir/skipped_rows.json). Rows an earlier step skipped are always skipped."},
    )
    image_aspect_ratio: Literal["crop", "pad"] = field(
        default="crop",
        metadata={"help": "Image preprocessing: 'crop' resizes the shortest side and centre-crops (CLIP's, the DAMA "
                  "authors' trainer); 'pad' first expands the image to a square of the processor's mean colour "
                  "(LLaVA-1.5's instruction tuning). precompute-ref must use the same setting."},
    )
    system_prompt: str = field(
        default=VICUNA_V1_SYSTEM,
        metadata={"help": "System text of the conversation template \"{system} USER: <image>\\n{question} "
                  "ASSISTANT: {answer}</s>\". Default: LLaVA-1.5's vicuna v1 wording (its instruction tuning and the "
                  "DAMA authors' trainer); set it for checkpoints tuned with another. precompute-ref must use the "
                  "same (--system-prompt)."},
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
                  "memory) or from a frozen copy of the starting model run online (with LoRA: the policy with its "
                  "adapters switched off, no copy)."},
    )
    # Robustness
    max_nonfinite_steps: int = field(
        default=5,
        metadata={"help": "A micro-batch with a non-finite loss is skipped and counted; this many in a row stop "
                  "the run with an error (the last checkpoint stays intact)."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue the run in output_dir (same config) from its newest complete checkpoint; a run "
                  "that is already complete is reported and left as it is."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir that holds another run: its checkpoints, model and run files "
                  "are removed (and listed) once the start-up checks pass. Without it such a folder is refused."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_method_options()
        _check_choice("head", self.head, HEADS)
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("attention", self.attention, ATTENTIONS)
        _check_choice("overlong", self.overlong, OVERLONG_POLICIES)
        _check_choice("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        _check_choice("image_aspect_ratio", self.image_aspect_ratio, IMAGE_ASPECT_RATIOS)
        _check_choice("reference", self.reference, REFERENCES)
        _check_choice("model_dtype", self.model_dtype, tuple(DTYPES))
        if (self.attention == "packed") != (self.layout != "padded"):
            raise ValueError(f"attention={self.attention!r} does not fit layout={self.layout!r}: layouts "
                             "'prefix_shared' and 'packed' need attention='packed', layout='padded' needs "
                             "attention='sdpa' or 'eager'")
        if not self.learning_rate >= 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.resume and self.overwrite_output_dir:
            raise ValueError("resume and overwrite_output_dir contradict each other: continue the run, or start over")
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
            argv += [f"--{key}={json.dumps(value)}"]
        else:
            # One token: argparse would read a value such as -1e-05 as an option of its own.
            argv += [f"--{key}={value}"]
    return argv


def read_config(path: str | Path) -> dict[str, Any]:
    """The field: value mapping of a YAML config; ValueError for a missing file, another shape or unknown keys."""
    config_path = Path(path)
    if not config_path.is_file():
        raise ValueError(f"--config {config_path}: no such file")
    try:
        values = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise ValueError(f"{config_path} is not valid YAML ({where}{problem})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{config_path}: expected a mapping of field: value")
    unknown = sorted(set(values) - {f.name for f in fields(DamaTrainingArguments)})
    if unknown:
        raise ValueError(f"{config_path}: unknown keys {unknown}; `dama train --help` lists every field")
    return values


def parse_training_arguments(argv: list[str] | None = None, *, check_devices: bool = True) -> DamaTrainingArguments:
    """`--config file.yaml` (optional) then the command line; the command line wins and unknown keys are errors.

    check_devices=False reads a config on a machine that is not the one to run it (`dama plan`): bf16/fp16 are not
    checked against this machine's hardware, and the DeepSpeed config is kept as given, not initialised.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(DamaTrainingArguments, prog="dama train")
    # One line, not the usage of every TrainingArguments field, then argparse's exit status 2.
    parser.error = lambda message: parser.exit(2, f"dama train: error: {message} (`dama train --help` lists every "
                                                  "field)\n")
    parser.add_argument("--config", default=None, help="YAML file of field: value pairs; command-line flags win.")
    yaml_argv: list[str] = []
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path")
        config_path = argv[position + 1]
        yaml_argv = _yaml_to_argv(read_config(config_path), {f.name for f in fields(DamaTrainingArguments)},
                                  config_path)
    combined = yaml_argv + argv
    deepspeed = None
    if not check_devices:
        while "--deepspeed" in combined:
            position = combined.index("--deepspeed")
            deepspeed = combined[position + 1] if position + 1 < len(combined) else None
            del combined[position:position + 2]
        combined += ["--use_cpu", "true"]
    (arguments, _config) = parser.parse_args_into_dataclasses(args=combined, return_remaining_strings=False)
    if deepspeed is not None:
        arguments.deepspeed = deepspeed
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

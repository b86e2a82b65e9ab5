"""The project's single training config: transformers.TrainingArguments + the DAMA method + the encoding + model and
data options.

`dama train --config configs/<name>.yaml [--field value ...]` parses it through dama.option_loader: YAML first, the
command line wins (`--key value` or `--key=value`, dashes or underscores), unknown keys are errors. Each field is
documented once, in its `help`, which is also what `dama train --help` prints and README's config table shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from dama.errors import DamaError
from dama.method.config import DamaMethodConfig
from dama.option_loader import build, read_options
from dama.options import (
    ATTENTIONS,
    BAD_ROW_POLICIES,
    DTYPE_NAMES,
    HEADS,
    PACKED_ATTENTION_IMPLS,
    REFERENCES,
    Attention,
    BadRowPolicy,
    DtypeName,
    EncodingOptions,
    Head,
    PackedAttentionImpl,
    Reference,
    check_at_least,
    check_choice,
)
from dama.training.preemption import signals_from_option
from dama.training.transformers_compat import ActivationCheckpointingFields

COMMAND = "dama train"


@dataclass
class DamaTrainingArguments(ActivationCheckpointingFields, TrainingArguments, DamaMethodConfig, EncodingOptions):
    # Model
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local folder of a saved LlavaForConditionalGeneration and its processor (no hub access)."},
    )
    model_dtype: DtypeName = field(
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
    attention: Attention = field(
        default="packed",
        metadata={"help": "Attention: 'packed' (varlen attention over the packed row, kernel per "
                  "packed_attention_impl; for layout prefix_shared or packed), or transformers' 'sdpa' / 'eager' "
                  "(padded layout)."},
    )
    packed_attention_impl: PackedAttentionImpl = field(
        default="auto",
        metadata={"help": "Kernel of packed attention: 'auto' (PyTorch's FlashAttention-2 varlen kernel on CUDA "
                  "fp16/bf16, the exact per-segment SDPA otherwise), 'varlen' (that kernel, torch >= 2.10), "
                  "'flash_attn' (flash-attn's, needs pip install .[gpu]) or 'segments'."},
    )
    head: Head = field(
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
    on_bad_row: BadRowPolicy = field(
        default="error",
        metadata={"help": "A bad row (missing, corrupt or over-large image, empty or missing response, non-finite "
                  "hardness or reference log-probs), found by checking every row before training starts: stop with "
                  "an error naming it, or skip it (counted by reason, logged and listed in "
                  "output_dir/skipped_rows.json). Rows an earlier step skipped are always skipped."},
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
    reference: Reference = field(
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
    save_on_signal: str = field(
        default="SIGTERM,SIGUSR1",
        metadata={"help": "Signals (comma-separated) on which a run finishes its optimizer step, saves a complete "
                  "checkpoint and exits with status 75, for the scheduler to requeue it with --resume true; a "
                  "second signal stops at once, the last complete checkpoint intact. 'none': a signal ends the run "
                  "at once (its default action)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir that holds another run: its checkpoints, model and run files "
                  "are removed (and listed) once the start-up checks pass. Without it such a folder is refused."},
    )

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except DamaError:
            raise
        except ValueError as error:
            # TrainingArguments' own checks of these values (bf16 on a machine without it, ...): the user's to fix.
            raise DamaError(f"the training config is not valid: {error}") from error
        self.validate_method_options()
        self.check_encoding_options()
        check_choice("head", self.head, HEADS)
        check_choice("attention", self.attention, ATTENTIONS)
        check_choice("packed_attention_impl", self.packed_attention_impl, PACKED_ATTENTION_IMPLS)
        check_choice("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        check_choice("reference", self.reference, REFERENCES)
        check_choice("model_dtype", self.model_dtype, DTYPE_NAMES)
        signals_from_option(self.save_on_signal)
        if (self.attention == "packed") != (self.layout != "padded"):
            raise DamaError(f"attention={self.attention!r} does not fit layout={self.layout!r}: layouts "
                            "'prefix_shared' and 'packed' need attention='packed', layout='padded' needs "
                            "attention='sdpa' or 'eager'")
        if not self.learning_rate >= 0:
            raise DamaError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.resume and self.overwrite_output_dir:
            raise DamaError("resume and overwrite_output_dir contradict each other: continue the run, or start over")
        check_at_least("max_tokens_per_batch", self.max_tokens_per_batch, 0)
        check_at_least("lora_rank", self.lora_rank, 0)
        check_at_least("max_nonfinite_steps", self.max_nonfinite_steps, 1)
        # The trainer computes its own loss from packed batches; these keep the Trainer from dropping our columns.
        self.remove_unused_columns = False


def training_arguments(values: dict[str, Any], check_devices: bool = True) -> DamaTrainingArguments:
    """DamaTrainingArguments from option values (`dama.option_loader.read_options`).

    check_devices=False reads a config on a machine that is not the one to run it (`dama plan`, `dama show-example`):
    bf16/fp16 are not checked against this machine's hardware, and the DeepSpeed config is kept as given, not
    initialised (DeepSpeed need not be installed).
    """
    values = dict(values)
    deepspeed = None
    if not check_devices:
        deepspeed = values.pop("deepspeed", None)
        values["use_cpu"] = True
    arguments = build(DamaTrainingArguments, values)
    if deepspeed is not None:
        arguments.deepspeed = deepspeed
    return arguments


def parse_training_arguments(argv: list[str] | None = None, *, check_devices: bool = True) -> DamaTrainingArguments:
    """`dama train`'s config: `--config file.yaml` (optional) then the command line, which wins; see
    `training_arguments` for check_devices."""
    return training_arguments(read_options(COMMAND, [DamaTrainingArguments], argv), check_devices)


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

"""From a `dama train` config to what the memory plan needs: the TrainingSetup and the largest micro-batch.

The config is the same DamaTrainingArguments `dama train` parses (YAML + command line); a DeepSpeed config is read
from its JSON file (or dict), with transformers' "auto" values filled the way transformers fills them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dama.errors import DamaError
from dama.training.arguments import DamaTrainingArguments
from dama_kernels.functional import CHUNK_ELEMENTS
from dama_kernels.linear_logprob_backward import backward_chunk_rows

from .activations import Precision
from .memory_plan import BatchShape, TrainingSetup, batch_shape
from .model_shape import ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def deepspeed_config(value: str | dict | None) -> dict | None:
    """The DeepSpeed config given to TrainingArguments.deepspeed: a JSON file path or a dict, or None."""
    if not value:
        return None  # also "": a command-line override that switches DeepSpeed off
    if isinstance(value, dict):
        return value
    path = Path(value)
    if not path.is_file():
        raise DamaError(f"deepspeed config {value} not found")
    return json.loads(path.read_text())


def _enabled(section: dict | None, auto: bool) -> bool:
    flag = (section or {}).get("enabled", False)
    return auto if flag == "auto" else bool(flag)


def _elements(value, auto: int) -> int:
    return auto if value in (None, "auto") else int(float(value))


def head_kernel_rows(vocab_size: int, kernel: str, weight_bytes: int) -> int:
    """Rows per chunk of logits the fused head holds at once."""
    if kernel == "torch":
        return max(16, CHUNK_ELEMENTS // vocab_size)
    return backward_chunk_rows(vocab_size, torch.float32 if weight_bytes == 4 else torch.bfloat16)


def training_setup(args: DamaTrainingArguments, shape: ModelShape, *, num_gpus: int = 1,
                   device: str = "cuda") -> TrainingSetup:
    """What `dama train` with `args` holds in memory on each of `num_gpus` GPUs (device "cpu": as on the CPU)."""
    if num_gpus < 1:
        raise DamaError(f"num_gpus must be >= 1, got {num_gpus}")
    ds = deepspeed_config(args.deepspeed)
    h = shape.hidden_size
    zero: dict = {}
    if ds is not None:
        zero = ds.get("zero_optimization", {}) or {}
        sixteen = _enabled(ds.get("bf16"), args.bf16) or _enabled(ds.get("fp16"), args.fp16)
        # DeepSpeed casts the whole model to 16 bits and keeps fp32 masters in its optimizer.
        weight = 2 if sixteen else DTYPE_BYTES[args.model_dtype]
        precision, trained_bytes = Precision(weight, weight), weight
    else:
        weight = DTYPE_BYTES[args.model_dtype]
        precision = Precision(weight, 2 if args.bf16 or args.fp16 else weight)
        trained_bytes = 4 if args.lora_rank else weight
    if args.layout == "padded":
        attention = "padded"
    else:
        attention = "varlen" if device == "cuda" and precision.compute_bytes == 2 else "segments"
    kernel = "triton" if device == "cuda" and args.loss_impl != "torch" else "torch"
    optimizer = getattr(args.optim, "value", str(args.optim))
    return TrainingSetup(
        precision=precision,
        train_language_model=not args.freeze_language_model and not args.lora_rank,
        lora_rank=args.lora_rank,
        train_projector=not args.freeze_projector,
        train_vision_tower=not args.freeze_vision_tower,
        trained_bytes=trained_bytes,
        optimizer=optimizer,
        optimizer_on_gpu_foreach=optimizer == "adamw_torch" and device == "cuda",
        layout=args.layout,
        head=args.head,
        reference=args.reference,
        activation_checkpointing=bool(args.activation_checkpointing),
        attention=attention,
        head_kernel=kernel,
        head_kernel_rows=head_kernel_rows(shape.vocab_size, kernel, precision.weight_bytes),
        zero_stage=None if ds is None else int(zero.get("stage", 0)),
        num_gpus=num_gpus,
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme"),
        offload_params=(zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme"),
        reduce_bucket=_elements(zero.get("reduce_bucket_size"), h * h),
        prefetch_bucket=_elements(zero.get("stage3_prefetch_bucket_size"), int(0.9 * h * h)) if zero else 0,
    )


def largest_batch(args: DamaTrainingArguments, shape: ModelShape, *, prompt_text: int, response: int,
                  layout: str | None = None, max_tokens_per_batch: int | None = None) -> BatchShape:
    """The largest micro-batch the config can make, the one that sets the peak.

    With a token budget B (max_tokens_per_batch, or the given override): rows holding B tokens, as many pairs as
    pairs of the typical size (prompt_text + response per sequence) fit in B, the rest of B scored; padded rows are
    as long as max_length. Without: per_device_train_batch_size pairs whose sequences all reach max_length.
    layout and max_tokens_per_batch override the config's.
    """
    budget = args.max_tokens_per_batch if max_tokens_per_batch is None else max_tokens_per_batch
    layout = layout or args.layout
    prompt = shape.image_tokens + prompt_text
    if prompt + 1 > args.max_length:
        raise DamaError(f"max_length={args.max_length} leaves no room for a response after the {prompt} prompt "
                        "tokens (image tokens included)")
    if not budget:
        return batch_shape(shape, layout, args.per_device_train_batch_size, prompt_text,
                           args.max_length - prompt)
    typical = batch_shape(shape, layout, 1, prompt_text, min(response, args.max_length - prompt))
    pairs = max(1, budget // typical.tokens)
    one = batch_shape(shape, layout, pairs, prompt_text, 0)  # the prompts alone
    if layout == "padded":
        return batch_shape(shape, "padded", pairs, prompt_text, args.max_length - prompt)
    scored = max(budget - one.tokens, 2 * pairs)
    rejected = scored // (2 * pairs)  # tokens of one response
    masks = pairs * rejected * (prompt + rejected) if layout == "prefix_shared" else 0
    return BatchShape(pairs=pairs, tokens=max(budget, one.tokens + 2 * pairs), scored=scored,
                      image_slots=one.image_slots, shared_keys=one.shared_keys, segment_mask_elements=masks)

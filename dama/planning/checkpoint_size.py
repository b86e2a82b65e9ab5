"""The disk size of one checkpoint of a training config, before any run (`dama plan` prints it; `dama train` checks
it against the free space before its first save).

A checkpoint holds the model as `save_pretrained` writes it (every LLaVA weight in the weights' dtype; with LoRA only
the adapters and the trained copies of the projector / vision tower, in fp32), the optimizer's state (its moments
in the trained parameters' dtype, one byte each for 8-bit AdamW; under DeepSpeed fp32 moments and fp32 masters of
16-bit weights, over all ranks' files together) and, under ZeRO-1 and -2, DeepSpeed's own copy of the module's
16-bit weights. Processor files, the scheduler, RNG and DAMA state are small beside these; the fixed allowance
covers them.
"""

from __future__ import annotations

from dataclasses import dataclass

from dama.disk_space import format_bytes

from .memory_plan import TrainingSetup, _state_bytes_per_param, _trained_counts
from .model_shape import ModelShape

# Tokenizer and processor files, trainer and scheduler state, RNG states, the DAMA state: a few MiB for LLaVA-1.5.
SMALL_FILES_ALLOWANCE = 16 << 20


@dataclass(frozen=True)
class CheckpointSize:
    """Bytes of one checkpoint by part."""

    weights: int
    optimizer: int
    engine: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.engine + SMALL_FILES_ALLOWANCE


def trained_params(shape: ModelShape, setup: TrainingSetup) -> int:
    """Parameters the optimizer updates (LoRA adapters included)."""
    counts = _trained_counts(shape, setup)
    return counts["layer"] * shape.num_layers + sum(count for name, count in counts.items() if name != "layer")


def checkpoint_size(shape: ModelShape, setup: TrainingSetup) -> CheckpointSize:
    """What one save of a run with this model and setup writes."""
    weight = setup.precision.weight_bytes
    trained = trained_params(shape, setup)
    if setup.lora_rank:
        copies = (shape.projector_params() if setup.train_projector else 0) + \
            (shape.vision_tower_params() if setup.train_vision_tower else 0)
        saved = shape.lora_params(setup.lora_rank) * 4 + copies * setup.trained_bytes
    else:
        saved = (shape.total_params() - trained) * weight + trained * setup.trained_bytes
    engine = shape.total_params() * weight if setup.zero_stage is not None and setup.zero_stage < 3 else 0
    return CheckpointSize(weights=saved, optimizer=trained * _state_bytes_per_param(setup), engine=engine)


def describe_checkpoint_size(size: CheckpointSize, save_total_limit: int | None) -> str:
    """The line `dama plan` prints: one save's size by part, and what the kept checkpoints hold together."""
    parts = [f"model {format_bytes(size.weights)}", f"optimizer state {format_bytes(size.optimizer)}"]
    if size.engine:
        parts.append(f"DeepSpeed's module copy {format_bytes(size.engine)}")
    kept = (f"save_total_limit={save_total_limit} keeps up to {format_bytes(save_total_limit * size.total)}"
            if save_total_limit else "save_total_limit unset: every checkpoint is kept")
    return (f"checkpoint per save: about {format_bytes(size.total)} on disk ({', '.join(parts)}, "
            f"{format_bytes(SMALL_FILES_ALLOWANCE)} for the small files); {kept}")

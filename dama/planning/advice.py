"""What to change when a config does not fit: the largest token budget that does, and the switches that free memory,
cheapest in step time first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .activations import Precision
from .memory_plan import BatchShape, MemoryPlan, TrainingSetup, plan_memory
from .model_shape import ModelShape

LORA_RANK = 64


@dataclass(frozen=True)
class Switch:
    """A config change that lowers memory: what to set, what it costs in speed, and the setup it gives."""

    name: str
    config: str
    speed_cost: str
    applies: Callable[[TrainingSetup], bool]
    apply: Callable[[TrainingSetup], TrainingSetup]


def _lora(setup: TrainingSetup) -> TrainingSetup:
    trained_bytes = 4 if setup.zero_stage is None else setup.trained_bytes
    return replace(setup, lora_rank=LORA_RANK, train_language_model=False, trained_bytes=trained_bytes)


def _prefix_shared(setup: TrainingSetup) -> TrainingSetup:
    # FlashAttention-2 varlen (PyTorch's or flash-attn's) where the head runs the Triton kernels (a GPU), the exact
    # SDPA path elsewhere.
    attention = "varlen" if setup.head_kernel == "triton" else "segments"
    return replace(setup, layout="prefix_shared", attention=attention)


def _zero(stage: int, offload_params: bool = False, offload_optimizer: bool = False):
    def apply(setup: TrainingSetup) -> TrainingSetup:
        # DeepSpeed casts the model to 16 bits (bf16: true) and keeps fp32 masters in its optimizer.
        return replace(setup, zero_stage=stage, precision=Precision(2, 2), trained_bytes=2,
                       offload_optimizer=offload_optimizer, offload_params=offload_params,
                       optimizer_on_gpu_foreach=False)
    return apply


# In order of what they cost in step time, cheapest first.
SWITCHES = (
    Switch("precomputed reference", "reference: precomputed  (run `dama precompute-ref` once)",
           "none: the step loses the reference forward", lambda s: s.reference == "online",
           lambda s: replace(s, reference="precomputed")),
    Switch("fused head", "head: fused", "none: faster than full logits", lambda s: s.head == "full_logits",
           lambda s: replace(s, head="fused")),
    Switch("prefix-shared layout", "layout: prefix_shared, attention: packed",
           "none: no padding, and each pair's image and prompt computed once", lambda s: s.layout != "prefix_shared",
           _prefix_shared),
    Switch("LoRA", f"lora_rank: {LORA_RANK}, freeze_language_model: true",
           "about none per step (no base-weight gradients), but it trains adapters, not the whole model",
           lambda s: s.train_language_model, _lora),
    Switch("8-bit AdamW", "optim: adamw_bnb_8bit  (needs bitsandbytes)", "small: a slower optimizer step",
           lambda s: s.optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"),
           lambda s: replace(s, optimizer="adamw_bnb_8bit", optimizer_on_gpu_foreach=False)),
    Switch("activation checkpointing", "activation_checkpointing: true",
           "about 1.33x the compute: every layer's forward runs again in the backward",
           lambda s: not s.activation_checkpointing, lambda s: replace(s, activation_checkpointing=True)),
    Switch("ZeRO-2", "deepspeed: configs/deepspeed/zero2.json", "little: gradients reduce-scattered across GPUs",
           lambda s: s.num_gpus > 1 and (s.zero_stage or 0) < 2, _zero(2)),
    Switch("ZeRO-3", "deepspeed: configs/deepspeed/zero3.json",
           "more communication: weights all-gathered in every forward and backward",
           lambda s: s.num_gpus > 1 and (s.zero_stage or 0) < 3, _zero(3)),
    Switch("weights offloaded to the CPU", "deepspeed: configs/deepspeed/zero3_offload_params.json",
           "slow: every layer's weights cross PCIe in each forward and backward", lambda s: not s.offload_params,
           _zero(3, offload_params=True)),
    Switch("weights and optimizer offloaded to the CPU", "deepspeed: configs/deepspeed/zero3_offload.json",
           "slowest: as above, and the optimizer steps on the CPU", lambda s: not s.offload_optimizer,
           _zero(3, offload_params=True, offload_optimizer=True)),
)


@dataclass
class SwitchOutcome:
    switch: Switch
    plan: MemoryPlan
    gpu_bytes: int
    fits: bool


def largest_fitting(fits_at: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest value in [low, high] for which fits_at holds, for a predicate that stays true below any value it
    holds at (memory grows with the batch); None when even `low` does not fit."""
    if not fits_at(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits_at(middle):
            low = middle
        else:
            high = middle - 1
    return low


def evaluate_switches(shape: ModelShape, setup: TrainingSetup, batch_for: Callable[[TrainingSetup], BatchShape],
                      gpu_bytes: Callable[[MemoryPlan], int], budget: int) -> tuple[list[SwitchOutcome],
                                                                                    list[SwitchOutcome]]:
    """Each applicable switch alone, and the switches taken together in order until the config fits.

    batch_for gives the largest micro-batch of a setup (it changes with the layout). Returns (alone, cumulative);
    cumulative is empty when a single switch suffices.
    """
    alone, cumulative = [], []
    for switch in SWITCHES:
        if not switch.applies(setup):
            continue
        changed = switch.apply(setup)
        plan = plan_memory(shape, changed, batch_for(changed))
        alone.append(SwitchOutcome(switch, plan, gpu_bytes(plan), gpu_bytes(plan) <= budget))
    if any(outcome.fits for outcome in alone):
        return alone, cumulative
    current = setup
    for switch in SWITCHES:
        if not switch.applies(current):
            continue
        current = switch.apply(current)
        plan = plan_memory(shape, current, batch_for(current))
        cumulative.append(SwitchOutcome(switch, plan, gpu_bytes(plan), gpu_bytes(plan) <= budget))
        if cumulative[-1].fits:
            break
    return alone, cumulative

"""How the Triton kernels are launched: tile sizes per GPU target and input dtype, and the launch record itself.

Under TRITON_INTERPRET=1 every tile operation is one Python call, so the interpreter wants few, large tiles; a GPU wants
tiles that fit its shared memory and registers. The tests use the interpreter blocks on purpose: test shapes are chosen
to be larger than these blocks and not multiples of them, so masked tails are exercised.

On a GPU the blocks depend on the target and on the bytes per tile element: the software pipeline keeps
`num_stages - 1` hidden and weight tiles in flight in shared memory, so fp32 tiles need twice the room of 16-bit ones
at the same K step, and what fits an H100 (227 KiB per block) need not fit an RTX 4090 (99 KiB). `linear_logprob_blocks`
picks, for one target and dtype, the first candidate whose shared memory fits; the ahead-of-time compile checks
(dama_kernels.aot_compile, run by the tests and by `dama selftest --compile-only`) build every choice for sm_80, sm_86,
sm_89 and sm_90 and hold it to the target's limits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

KIB = 1024


def running_in_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision(precision) for the block only ("highest": IEEE fp32, "high": TF32)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@dataclass(frozen=True)
class LinearLogprobBlocks:
    """Tile sizes of the fused linear log-prob kernels. `vocab_splits` = 0 picks a split count from the grid size."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int = 4
    num_stages: int = 1
    vocab_splits: int = 0


@dataclass(frozen=True)
class KeptProductBlocks:
    """Tile sizes of a filtered backward's gradient product (dama_kernels.linear_logprob_kept_tiles): each program
    owns a (block_out x block_hidden) output tile and reduces in steps of block_k."""

    block_out: int
    block_hidden: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class KernelLaunch:
    """One launch of a Triton kernel, built before it runs.

    The launchers build it and run it; dama_kernels.aot_compile builds the same record from tensors on the meta device
    and compiles it for GPU targets, so what is checked there is exactly what the launchers launch.
    `arguments` holds every kernel parameter by name, constexprs included; `options` holds num_warps / num_stages
    when the launch sets them (Triton's defaults otherwise).
    """

    kernel: Any  # a triton.jit function, or the interpreter's stand-in for one under TRITON_INTERPRET=1
    grid: tuple[int, ...]
    arguments: dict[str, Any]
    options: dict[str, int] = field(default_factory=dict)

    def run(self) -> None:
        self.kernel[self.grid](**self.arguments, **self.options)


@dataclass(frozen=True)
class TargetLimits:
    """Per-block limits of a GPU target: opt-in shared memory and the register file (32-bit registers)."""

    shared_memory_bytes: int
    registers_per_block: int = 64 * KIB
    registers_per_thread: int = 255


# Opt-in shared memory per block (CUDA programming guide, "Compute capabilities"). Unknown targets get the smallest
# limit of the tensor-core GPUs Triton builds for, so their blocks are the conservative ones.
TARGET_LIMITS = {
    (8, 0): TargetLimits(163 * KIB),  # A100
    (8, 6): TargetLimits(99 * KIB),  # RTX 30xx, A10, A40
    (8, 7): TargetLimits(163 * KIB),  # Jetson Orin
    (8, 9): TargetLimits(99 * KIB),  # RTX 40xx, L4, L40
    (9, 0): TargetLimits(227 * KIB),  # H100, H200
}
DEFAULT_LIMITS = TargetLimits(99 * KIB)


def target_limits(capability: tuple[int, int]) -> TargetLimits:
    return TARGET_LIMITS.get(tuple(capability), DEFAULT_LIMITS)


# Candidates per (kind, bytes per tile element), best first, each with the shared memory one launch needs: the most
# Triton 3.8 allocates for it on sm_80 / sm_86 / sm_89 / sm_90 with the launchers' argument specialisation (unit
# strides, 16-byte aligned pointers), over IEEE and TF32 products for fp32 tiles (TF32 feeds tensor cores through
# shared memory and needs more), rounded up to KiB. The last candidate of each list fits the smallest limit (99 KiB).
# "backward" is the backward's d_logits kernel, the same logit tile as the forward's with a store instead of a
# reduction. 128 x 128 fp32 accumulators with 64-wide K steps are the usual start for 16-bit tiles; fp32 tiles halve
# the K step, which keeps them within 99 KiB too. Not yet timed on hardware: bench/tune_blocks.py sweeps alternatives
# on a GPU, and a larger candidate goes first in a list with its measured need.
TILES_16_BIT_WIDE = LinearLogprobBlocks(block_n=128, block_v=256, block_h=64, num_warps=8, num_stages=3)
TILES_16_BIT = LinearLogprobBlocks(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
TILES_32_BIT = LinearLogprobBlocks(block_n=128, block_v=128, block_h=32, num_warps=8, num_stages=3)
LINEAR_LOGPROB_CANDIDATES = {
    ("forward", 2): ((TILES_16_BIT, 97 * KIB),),
    ("backward", 2): ((TILES_16_BIT, 97 * KIB),),
    ("forward", 4): ((TILES_32_BIT, 97 * KIB),),
    ("backward", 4): ((TILES_32_BIT, 97 * KIB),),
}
# Candidates of one GPU generation, tried there before the general ones (a general candidate listed here again
# carries that generation's own need). On an H200 (sm_90, wgmma), 128 x 256 tiles ran the bf16 forward at 71-77% of
# the measured bf16 matmul peak against 54-59% for 128 x 128, and the d_logits kernel at 80-83% against 65-67%
# (bench/tune_blocks.py, bench/RESULTS.md); on sm_80-sm_89 (mma) the same tiles spill 144-256 bytes of registers per
# thread and are untimed, so they are not used there. fp32 tiles in "tf32x3" take 113 KiB on sm_90, 96 KiB elsewhere.
MEASURED_CANDIDATES = {
    ((9, 0), "forward", 2): ((TILES_16_BIT_WIDE, 145 * KIB),),
    ((9, 0), "backward", 2): ((TILES_16_BIT_WIDE, 145 * KIB),),
    ((9, 0), "forward", 4): ((TILES_32_BIT, 113 * KIB),),
    ((9, 0), "backward", 4): ((TILES_32_BIT, 113 * KIB),),
}
KINDS = ("forward", "backward")
INTERPRETER_BLOCKS = LinearLogprobBlocks(block_n=64, block_v=128, block_h=64, vocab_splits=1)

# Blocks of the filtered backward's products per bytes per tile element, the same for both products and every target.
# Their tiles lie within the d_logits tiles of every target (128 x 128, or 128 x 256 on sm_90): 128-wide outputs, K
# steps of 64 (16-bit) or 32 (fp32). Each K step first reads which tile comes next, and Triton's pipeliner spends a
# stage on that read: 5 stages keep as many tiles in flight as the d_logits kernel's 3 (2 on sm_80-sm_89, 3 on sm_90).
# Shared memory, Triton 3.8: 64 KiB (16-bit and IEEE fp32) and 96 KiB (tf32x3) on sm_80-sm_89, 97 KiB (16-bit), 65 KiB
# (fp32) and 113 KiB (tf32x3) on sm_90; dama_kernels.aot_compile holds every target to its limit. Not yet timed.
KEPT_PRODUCT_BLOCKS = {
    2: KeptProductBlocks(block_out=128, block_hidden=128, block_k=64, num_warps=8, num_stages=5),
    4: KeptProductBlocks(block_out=128, block_hidden=128, block_k=32, num_warps=8, num_stages=5),
}
KEPT_PRODUCTS = ("d_hidden", "d_weight")
# Under the interpreter: one K step per INTERPRETER_BLOCKS tile along the reduction (its d_logits tiles are 64 x 128).
INTERPRETER_KEPT_BLOCKS = {
    "d_hidden": KeptProductBlocks(block_out=64, block_hidden=64, block_k=128),
    "d_weight": KeptProductBlocks(block_out=128, block_hidden=64, block_k=64),
}

# Pairs per program of the DAMA loss kernels (one element per lane; P is at most a few thousand).
LOSS_BLOCK = 1024


def linear_logprob_candidates(
    kind: str, capability: tuple[int, int], dtype: torch.dtype
) -> tuple[tuple[LinearLogprobBlocks, int], ...]:
    """(blocks, shared memory bytes) in the order they are tried on this target: its measured ones, then the rest."""
    measured = MEASURED_CANDIDATES.get((tuple(capability), kind, dtype.itemsize), ())
    listed = {blocks for blocks, _ in measured}
    general = tuple(entry for entry in LINEAR_LOGPROB_CANDIDATES[(kind, dtype.itemsize)] if entry[0] not in listed)
    return measured + general


def linear_logprob_blocks(kind: str, capability: tuple[int, int], dtype: torch.dtype) -> LinearLogprobBlocks:
    """The blocks the launchers use for the `kind` ("forward" or "backward") kernel on a GPU of compute capability
    `capability` (major, minor) with `dtype` hidden states and weight (fp16, bf16 or fp32; TF32 uses fp32 tiles)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the linear log-prob kernels take float16, bfloat16 or float32 tiles, got {dtype}")
    candidates = linear_logprob_candidates(kind, capability, dtype)
    limit = target_limits(capability).shared_memory_bytes
    for blocks, shared_bytes in candidates:
        if shared_bytes <= limit:
            return blocks
    return candidates[-1][0]


def device_blocks(kind: str, device: torch.device, dtype: torch.dtype) -> LinearLogprobBlocks:
    """Blocks for a launch on `device`: the interpreter's, or those of the CUDA device's compute capability."""
    if running_in_interpreter() or device.type != "cuda":
        return INTERPRETER_BLOCKS
    return linear_logprob_blocks(kind, torch.cuda.get_device_capability(device), dtype)


def fit_to_map(blocks: KeptProductBlocks, product: str, map_tile: tuple[int, int]) -> KeptProductBlocks:
    """`blocks` cut down to lie within the d_logits tiles (map_tile: rows x words) the product reads; tile sizes are
    powers of two, so the smaller of two divides the larger."""
    out_tile, k_tile = map_tile if product == "d_hidden" else map_tile[::-1]
    return replace(blocks, block_out=min(blocks.block_out, out_tile), block_k=min(blocks.block_k, k_tile))


def kept_product_blocks(product: str, dtype: torch.dtype, map_tile: tuple[int, int]) -> KeptProductBlocks:
    """The blocks of the filtered backward's `product` ("d_hidden" or "d_weight") on a GPU, for `dtype` operands and
    d_logits tiles of map_tile (rows, words)."""
    if product not in KEPT_PRODUCTS:
        raise ValueError(f"product must be one of {KEPT_PRODUCTS}, got {product!r}")
    return fit_to_map(KEPT_PRODUCT_BLOCKS[dtype.itemsize], product, map_tile)


def device_kept_blocks(
    product: str, device: torch.device, dtype: torch.dtype, map_tile: tuple[int, int]
) -> KeptProductBlocks:
    """Blocks of the filtered backward's `product` for a launch on `device` (the interpreter's off a GPU)."""
    if running_in_interpreter() or device.type != "cuda":
        return fit_to_map(INTERPRETER_KEPT_BLOCKS[product], product, map_tile)
    return kept_product_blocks(product, dtype, map_tile)


def vocab_split_count(blocks: LinearLogprobBlocks, num_tokens: int, vocab_size: int, device: torch.device) -> int:
    """How many vocabulary ranges the forward grid splits into, so that small N still fills the GPU."""
    vocab_tiles = -(-vocab_size // blocks.block_v)
    if blocks.vocab_splits:
        return max(1, min(blocks.vocab_splits, vocab_tiles))
    row_tiles = -(-num_tokens // blocks.block_n)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = -(-2 * sm_count // row_tiles)
    return max(1, min(wanted, vocab_tiles))

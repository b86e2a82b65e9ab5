"""Block sizes for the Triton kernels, kept apart for real GPUs and for the CPU interpreter.

Under TRITON_INTERPRET=1 every tile operation is one Python call, so the interpreter wants few, large tiles; a GPU wants
tiles that fit its registers and shared memory. The tests use the interpreter blocks on purpose: test shapes are chosen
to be larger than these blocks and not multiples of them, so masked tails are exercised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def running_in_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class LinearLogprobBlocks:
    """Tile sizes of the fused linear log-prob kernels. `vocab_splits` = 0 picks a split count from the grid size."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int = 4
    num_stages: int = 1
    vocab_splits: int = 0


# Not yet tuned on hardware: 128 x 128 fp32 accumulators with 64-wide K steps are the usual starting point on Hopper.
GPU_FORWARD_BLOCKS = LinearLogprobBlocks(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
GPU_BACKWARD_BLOCKS = LinearLogprobBlocks(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
INTERPRETER_BLOCKS = LinearLogprobBlocks(block_n=64, block_v=128, block_h=64, vocab_splits=1)

# Pairs per program of the DAMA loss kernels (one element per lane; P is at most a few thousand).
LOSS_BLOCK = 1024


def forward_blocks(device: torch.device) -> LinearLogprobBlocks:
    return INTERPRETER_BLOCKS if running_in_interpreter() or device.type != "cuda" else GPU_FORWARD_BLOCKS


def backward_blocks(device: torch.device) -> LinearLogprobBlocks:
    return INTERPRETER_BLOCKS if running_in_interpreter() or device.type != "cuda" else GPU_BACKWARD_BLOCKS


def vocab_split_count(blocks: LinearLogprobBlocks, num_tokens: int, vocab_size: int, device: torch.device) -> int:
    """How many vocabulary ranges the forward grid splits into, so that small N still fills the GPU."""
    vocab_tiles = -(-vocab_size // blocks.block_v)
    if blocks.vocab_splits:
        return max(1, min(blocks.vocab_splits, vocab_tiles))
    row_tiles = -(-num_tokens // blocks.block_n)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = -(-2 * sm_count // row_tiles)
    return max(1, min(wanted, vocab_tiles))

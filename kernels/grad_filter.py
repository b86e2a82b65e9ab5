"""Gradient filtering of the fused head's backward: which d_logits tiles are dropped, and how many were.

A tile of d_logits = g * (onehot - softmax) is filtered (written as zeros) when every |onehot - softmax| entry of its
rows that receive a gradient is below a threshold eps. The default eps follows the input dtype: finfo(dtype).eps / 32,
which is 2^-12 for bf16 (the value of Cut Cross-Entropy, Wijmans et al. 2024, arXiv 2411.09009) and 2^-15 for fp16 by
the same ratio to the dtype's resolution; fp32 and fp64 default to 0, which filters nothing (the comparison is strict),
so their gradient is exact. A dropped entry is 32 times below the step between 16-bit values near 1, where the
gradient's largest entries (the label's 1 - p) lie.

The Triton backward visits the vocabulary in order of decreasing mean logit over the rows (`vocabulary_order`), as
Cut Cross-Entropy does: the few words that carry probability in many rows then share the first tiles, and the tiles
of the long tail hold only negligible probabilities, so more of them are filtered than in the vocabulary's own order,
where frequent words are spread over every tile. The torch path keeps the vocabulary's order.

Counting is off the hot path: the backward adds its tiles to a counter only inside `count_filtered_tiles()`, and the
counts stay on the device until read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

# eps = finfo(dtype).eps / FILTER_EPS_DIVISOR for 16-bit inputs.
FILTER_EPS_DIVISOR = 32
# Share of filtered tiles from which a caller that counts them (DamaTrainer) has the Triton backward skip them rather
# than run cuBLAS's dense products. Not yet measured: bench/kept_products.py times both at several shares on a GPU.
KEPT_PRODUCTS_MIN_SHARE = 0.5
# Tiles of the torch path's filter: the Triton interpreter's blocks, so that the two paths' tiles have one shape there.
FILTER_TILE_ROWS, FILTER_TILE_COLS = 64, 128


def default_filter_eps(dtype: torch.dtype) -> float:
    """The threshold used when the caller gives none: 2^-12 for bf16, 2^-15 for fp16, 0 (exact) otherwise."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.finfo(dtype).eps / FILTER_EPS_DIVISOR
    return 0.0


def resolve_filter_eps(grad_filter_eps: float | None, dtype: torch.dtype) -> float:
    """The threshold for inputs of `dtype`: the caller's, or default_filter_eps. Raises ValueError on a bad one."""
    if grad_filter_eps is None:
        return default_filter_eps(dtype)
    if isinstance(grad_filter_eps, bool) or not isinstance(grad_filter_eps, int | float) or not (
        grad_filter_eps >= 0 and not math.isnan(grad_filter_eps)
    ):
        raise ValueError(f"grad_filter_eps must be a float >= 0 (0 filters nothing) or None, got {grad_filter_eps!r}")
    return float(grad_filter_eps)


def vocabulary_order(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(V,) int32: the words by decreasing mean logit over the rows, mean(hidden) @ weight.T (+ bias).

    Shapes: hidden (N, H), weight (V, H), bias (V,) or None. One pass over the weight in its own dtype (the order
    needs no more precision), no host sync.
    """
    mean_hidden = hidden.mean(dim=0, dtype=torch.float32).to(weight.dtype)  # (H,)
    mean_logits = torch.mv(weight, mean_hidden)  # (V,)
    if bias is not None:
        mean_logits = mean_logits + bias
    return torch.argsort(mean_logits, descending=True).to(torch.int32)


class FilteredTiles:
    """Tiles the backward filtered and tiles it computed, summed over the calls made while counting."""

    def __init__(self) -> None:
        self._flag_sums: list[torch.Tensor] = []  # 0-dim int64 counts, on the device of each call
        self._counted = 0
        self.total = 0

    def add(self, skipped: torch.Tensor | int, total: int) -> None:
        if isinstance(skipped, int):
            self._counted += skipped
        else:
            self._flag_sums.append(skipped.sum(dtype=torch.int64))
        self.total += total

    def reset(self) -> None:
        """Start counting afresh (a new window)."""
        self._flag_sums.clear()
        self._counted = 0
        self.total = 0

    @property
    def skipped(self) -> int:
        """Filtered tiles so far (reads the device counts: a host sync on a GPU)."""
        return self._counted + sum(int(count) for count in self._flag_sums)

    @property
    def skipped_share(self) -> float | None:
        """Filtered tiles / tiles computed, None before any backward."""
        return self.skipped / self.total if self.total else None


_counters: list[FilteredTiles] = []


@contextlib.contextmanager
def count_filtered_tiles() -> Iterator[FilteredTiles]:
    """Within the block, every backward of the fused head adds its filtered and computed d_logits tiles to the
    FilteredTiles yielded (tiles of the Triton kernel's blocks; of FILTER_TILE_ROWS x FILTER_TILE_COLS on the torch
    path). Unfiltered backwards count their tiles with none skipped."""
    counter = FilteredTiles()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def filtered_tiles(unscaled_d_logits: torch.Tensor, receives_grad: torch.Tensor, filter_eps: float) -> torch.Tensor:
    """The torch path's filter decision: (row tiles, vocabulary tiles) bool, True where every |onehot - softmax| of
    the rows that receive a gradient is below filter_eps.

    Shapes: unscaled_d_logits (C, V) = onehot - softmax; receives_grad (C,) bool. Tiles are FILTER_TILE_ROWS x
    FILTER_TILE_COLS from the chunk's first row and the first column; the last ones are cut short.
    """
    num_rows, vocab_size = unscaled_d_logits.shape
    row_tiles, col_tiles = -(-num_rows // FILTER_TILE_ROWS), -(-vocab_size // FILTER_TILE_COLS)
    magnitude = unscaled_d_logits.abs().mul_(receives_grad[:, None])
    magnitude = torch.nn.functional.pad(
        magnitude, (0, col_tiles * FILTER_TILE_COLS - vocab_size, 0, row_tiles * FILTER_TILE_ROWS - num_rows)
    )
    largest = magnitude.view(row_tiles, FILTER_TILE_ROWS, col_tiles, FILTER_TILE_COLS).amax(dim=(1, 3))
    return largest < filter_eps


def tile_mask(tiles: torch.Tensor, num_rows: int, vocab_size: int) -> torch.Tensor:
    """(C, V) bool: each element of d_logits takes the value of its tile in `tiles` (row tiles, vocabulary tiles)."""
    expanded = tiles.repeat_interleave(FILTER_TILE_ROWS, 0).repeat_interleave(FILTER_TILE_COLS, 1)
    return expanded[:num_rows, :vocab_size]


def record_tiles(skipped: torch.Tensor | int, total: int) -> None:
    """Adds one backward chunk's tiles to the active counters; does nothing (no launch) when none is active.

    skipped: a tensor of per-tile 0/1 flags or a count (int when nothing was filtered); total: tiles computed.
    """
    for counter in _counters:
        counter.add(skipped, total)

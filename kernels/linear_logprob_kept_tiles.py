"""The filtered backward's two gradient products over the d_logits tiles it kept, skipping the tiles it filtered.

What, for one chunk of C rows whose d_logits (C, V) the FILTER d_logits kernel wrote with a tile map
tile_skipped (R, T) (R row tiles of MAP_ROWS rows, T column tiles of MAP_COLS columns; 1 where the tile was
filtered to zeros), column j holding word vocab_order[j] (or word j without an order):
    d_hidden[chunk]           = d_logits @ W[vocab_order]                            (C, H), in hidden's dtype
    d_weight[vocab_order]     = d_logits^T @ h[chunk]  (+ previous d_weight rows)    (V, H), in d_weight's dtype
A filtered tile is all zeros, so leaving it out of both sums changes nothing: the products only read kept tiles.
Words come in order of mean logit (grad_filter.vocabulary_order), so the weight's rows are gathered, and d_weight's
rows scattered, through vocab_order, whole rows at a time: the loads and stores stay contiguous along H.

Strategy: `kept_tiles` turns the map into two lists, on the device and without a host sync: for each row tile the column
tiles it kept (in increasing order), and for each column tile the row tiles that kept it, each with a count. A program
of `_d_hidden_kept_kernel` owns a (BLOCK_OUT rows x BLOCK_HIDDEN) tile of d_hidden and walks its row tile's kept column
tiles in steps of BLOCK_K columns; a program of `_d_weight_kept_kernel` owns a (BLOCK_OUT columns x BLOCK_HIDDEN) tile
of d_weight's rows and walks the kept row tiles of its column tile in steps of BLOCK_K rows. Each loop has a single body
and a bound read from memory, so Triton pipelines its loads like a dense GEMM's; the work is proportional to the kept
tiles. Every output element has one writer: no atomics, and the result does not depend on scheduling. Output tiles lie
within one map tile: BLOCK_OUT divides the map tile along the output dimension and BLOCK_K along the reduction (checked
by `check_kept_blocks`).

Numerics: as the dense products they replace. Products accumulate in fp32 (16-bit tiles go into tl.dot as they are,
fp32 tiles with dot_settings' precision, every tile upcast under the interpreter) and each output is rounded once to
its dtype; with `accumulate`, the previous d_weight is read, added in fp32 and the sum rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import KeptProductBlocks, KernelLaunch
from .linear_logprob_forward import dot_settings


def kept_tiles(tile_skipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept_cols (R, T), kept_col_count (R,), kept_rows (T, R), kept_row_count (T,)), int32, from a tile map.

    tile_skipped: (R, T) int32, 1 where a tile was filtered. kept_cols[r, :kept_col_count[r]] are the column tiles
    row tile r kept, in increasing order; kept_rows[t, :kept_row_count[t]] the row tiles that kept column tile t.
    The entries past the counts are never read.
    """
    kept_cols = torch.argsort(tile_skipped, dim=1, stable=True).to(torch.int32)
    # argsort keeps the strides of its input's transposed view; the kernels read each list with unit stride.
    kept_rows = torch.argsort(tile_skipped.T, dim=1, stable=True).to(torch.int32).contiguous()
    kept_col_count = tile_skipped.shape[1] - tile_skipped.sum(dim=1, dtype=torch.int32)
    kept_row_count = tile_skipped.shape[0] - tile_skipped.sum(dim=0, dtype=torch.int32)
    return kept_cols, kept_col_count, kept_rows, kept_row_count


@triton.jit
def _d_hidden_kept_kernel(
    # pointers
    d_logits_ptr,
    weight_ptr,
    d_hidden_ptr,
    kept_cols_ptr,
    kept_count_ptr,
    vocab_order_ptr,
    # strides
    stride_d_logits_n,
    stride_weight_v,
    stride_weight_h,
    stride_d_hidden_n,
    stride_d_hidden_h,
    stride_kept_cols,
    # sizes
    num_rows,
    hidden_size,
    vocab_size,
    # meta
    MAP_ROWS: tl.constexpr,
    MAP_COLS: tl.constexpr,
    SORTED_VOCAB: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_HIDDEN: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block_row = tl.program_id(0).to(tl.int64)
    block_hidden = tl.program_id(1).to(tl.int64)
    rows = block_row * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    hidden_cols = block_hidden * BLOCK_HIDDEN + tl.arange(0, BLOCK_HIDDEN)
    row_ok = rows < num_rows
    hidden_ok = hidden_cols < hidden_size
    map_row = block_row * BLOCK_OUT // MAP_ROWS
    steps_per_tile: tl.constexpr = MAP_COLS // BLOCK_K
    num_steps = tl.load(kept_count_ptr + map_row) * steps_per_tile
    acc = tl.zeros((BLOCK_OUT, BLOCK_HIDDEN), dtype=tl.float32)
    for step in range(0, num_steps):
        vocab_tile = tl.load(kept_cols_ptr + map_row * stride_kept_cols + step // steps_per_tile).to(tl.int64)
        ks = vocab_tile * MAP_COLS + (step % steps_per_tile) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < vocab_size
        d_logits_tile = tl.load(
            d_logits_ptr + rows[:, None] * stride_d_logits_n + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # (BLOCK_OUT, BLOCK_K)
        if SORTED_VOCAB:  # d_logits column k belongs to word vocab_order[k]
            words = tl.load(vocab_order_ptr + ks, mask=k_ok, other=0).to(tl.int64)
        else:
            words = ks
        weight_tile = tl.load(
            weight_ptr + words[:, None] * stride_weight_v + hidden_cols[None, :] * stride_weight_h,
            mask=k_ok[:, None] & hidden_ok[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_HIDDEN)
        if UPCAST_DOT:
            d_logits_tile = d_logits_tile.to(tl.float32)
            weight_tile = weight_tile.to(tl.float32)
        acc = tl.dot(d_logits_tile, weight_tile, acc, input_precision=INPUT_PRECISION)
    tl.store(
        d_hidden_ptr + rows[:, None] * stride_d_hidden_n + hidden_cols[None, :] * stride_d_hidden_h,
        acc.to(d_hidden_ptr.dtype.element_ty),
        mask=row_ok[:, None] & hidden_ok[None, :],
    )


@triton.jit
def _d_weight_kept_kernel(
    # pointers
    d_logits_ptr,
    hidden_ptr,
    d_weight_ptr,
    kept_rows_ptr,
    kept_count_ptr,
    vocab_order_ptr,
    # strides
    stride_d_logits_n,
    stride_hidden_n,
    stride_hidden_h,
    stride_d_weight_v,
    stride_d_weight_h,
    stride_kept_rows,
    # sizes
    num_rows,
    hidden_size,
    vocab_size,
    # meta
    ACCUMULATE: tl.constexpr,
    MAP_ROWS: tl.constexpr,
    MAP_COLS: tl.constexpr,
    SORTED_VOCAB: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_HIDDEN: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Hidden blocks vary fastest: the programs in flight share one vocabulary tile's kept d_logits columns.
    block_hidden = tl.program_id(0).to(tl.int64)
    block_vocab = tl.program_id(1).to(tl.int64)
    cols = block_vocab * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    hidden_cols = block_hidden * BLOCK_HIDDEN + tl.arange(0, BLOCK_HIDDEN)
    col_ok = cols < vocab_size
    hidden_ok = hidden_cols < hidden_size
    map_col = block_vocab * BLOCK_OUT // MAP_COLS
    steps_per_tile: tl.constexpr = MAP_ROWS // BLOCK_K
    num_steps = tl.load(kept_count_ptr + map_col) * steps_per_tile
    acc = tl.zeros((BLOCK_OUT, BLOCK_HIDDEN), dtype=tl.float32)
    for step in range(0, num_steps):
        row_tile = tl.load(kept_rows_ptr + map_col * stride_kept_rows + step // steps_per_tile).to(tl.int64)
        ks = row_tile * MAP_ROWS + (step % steps_per_tile) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < num_rows
        d_logits_tile_t = tl.load(
            d_logits_ptr + ks[None, :] * stride_d_logits_n + cols[:, None],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # (BLOCK_OUT, BLOCK_K)
        hidden_tile = tl.load(
            hidden_ptr + ks[:, None] * stride_hidden_n + hidden_cols[None, :] * stride_hidden_h,
            mask=k_ok[:, None] & hidden_ok[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_HIDDEN)
        if UPCAST_DOT:
            d_logits_tile_t = d_logits_tile_t.to(tl.float32)
            hidden_tile = hidden_tile.to(tl.float32)
        acc = tl.dot(d_logits_tile_t, hidden_tile, acc, input_precision=INPUT_PRECISION)
    if SORTED_VOCAB:  # d_logits column j belongs to word vocab_order[j]
        words = tl.load(vocab_order_ptr + cols, mask=col_ok, other=0).to(tl.int64)
    else:
        words = cols
    out_ptrs = d_weight_ptr + words[:, None] * stride_d_weight_v + hidden_cols[None, :] * stride_d_weight_h
    out_mask = col_ok[:, None] & hidden_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(d_weight_ptr.dtype.element_ty), mask=out_mask)


def check_kept_blocks(blocks: KeptProductBlocks, map_rows: int, map_cols: int, product: str) -> None:
    """Raises ValueError unless the product's tiles lie within the map's (map_rows x map_cols) tiles."""
    out_tile, k_tile = (map_rows, map_cols) if product == "d_hidden" else (map_cols, map_rows)
    if out_tile % blocks.block_out or k_tile % blocks.block_k:
        raise ValueError(
            f"{product} blocks {blocks} do not divide the tile map's {map_rows} x {map_cols} tiles: "
            f"block_out must divide {out_tile} and block_k {k_tile}"
        )


def _shared_meta(
    product: str,
    d_logits: torch.Tensor,
    map_tile: tuple[int, int],
    blocks: KeptProductBlocks,
    vocab_order: torch.Tensor | None,
) -> dict:
    """The constexprs both products take, once `blocks` are checked against the map's tiles."""
    check_kept_blocks(blocks, *map_tile, product)
    upcast, precision = dot_settings(d_logits.dtype)
    return dict(
        MAP_ROWS=map_tile[0],
        MAP_COLS=map_tile[1],
        SORTED_VOCAB=vocab_order is not None,
        UPCAST_DOT=upcast,
        INPUT_PRECISION=precision,
        BLOCK_OUT=blocks.block_out,
        BLOCK_HIDDEN=blocks.block_hidden,
        BLOCK_K=blocks.block_k,
    )


def d_hidden_kept_launch(
    d_hidden: torch.Tensor,
    d_logits: torch.Tensor,
    weight: torch.Tensor,
    kept_cols: torch.Tensor,
    kept_col_count: torch.Tensor,
    map_tile: tuple[int, int],
    blocks: KeptProductBlocks,
    vocab_order: torch.Tensor | None = None,
) -> KernelLaunch:
    """The launch that writes every element of d_hidden (C, H) = d_logits (C, V) @ weight (V, H) over kept tiles.

    d_logits is row-major with unit column stride, in the dtype of weight and d_hidden; kept_cols, kept_col_count from
    `kept_tiles` of the map of (map_tile[0] rows x map_tile[1] columns) tiles. vocab_order (V,) int32, when given,
    is the word of each d_logits column (the weight row it multiplies).
    """
    num_rows, hidden_size = d_hidden.shape
    arguments = dict(
        d_logits_ptr=d_logits,
        weight_ptr=weight,
        d_hidden_ptr=d_hidden,
        kept_cols_ptr=kept_cols,
        kept_count_ptr=kept_col_count,
        vocab_order_ptr=vocab_order if vocab_order is not None else kept_cols,  # read only when SORTED_VOCAB
        stride_d_logits_n=d_logits.stride(0),
        stride_weight_v=weight.stride(0),
        stride_weight_h=weight.stride(1),
        stride_d_hidden_n=d_hidden.stride(0),
        stride_d_hidden_h=d_hidden.stride(1),
        stride_kept_cols=kept_cols.stride(0),
        num_rows=num_rows,
        hidden_size=hidden_size,
        vocab_size=d_logits.shape[1],
        **_shared_meta("d_hidden", d_logits, map_tile, blocks, vocab_order),
    )
    return KernelLaunch(
        kernel=_d_hidden_kept_kernel,
        grid=(triton.cdiv(num_rows, blocks.block_out), triton.cdiv(hidden_size, blocks.block_hidden)),
        arguments=arguments,
        options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages},
    )


def d_weight_kept_launch(
    d_weight: torch.Tensor,
    d_logits: torch.Tensor,
    hidden: torch.Tensor,
    kept_rows: torch.Tensor,
    kept_row_count: torch.Tensor,
    map_tile: tuple[int, int],
    blocks: KeptProductBlocks,
    accumulate: bool,
    vocab_order: torch.Tensor | None = None,
) -> KernelLaunch:
    """The launch that writes every element of d_weight (V, H) = d_logits (C, V)^T @ hidden (C, H) over kept tiles,
    plus d_weight's previous value when `accumulate`.

    d_weight may be 16-bit or fp32 whatever the operands' dtype; kept_rows, kept_row_count from `kept_tiles`;
    vocab_order (V,) int32, when given, is the word of each d_logits column (the d_weight row it writes).
    """
    vocab_size, hidden_size = d_weight.shape
    arguments = dict(
        d_logits_ptr=d_logits,
        hidden_ptr=hidden,
        d_weight_ptr=d_weight,
        kept_rows_ptr=kept_rows,
        kept_count_ptr=kept_row_count,
        vocab_order_ptr=vocab_order if vocab_order is not None else kept_rows,  # read only when SORTED_VOCAB
        stride_d_logits_n=d_logits.stride(0),
        stride_hidden_n=hidden.stride(0),
        stride_hidden_h=hidden.stride(1),
        stride_d_weight_v=d_weight.stride(0),
        stride_d_weight_h=d_weight.stride(1),
        stride_kept_rows=kept_rows.stride(0),
        num_rows=d_logits.shape[0],
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        ACCUMULATE=accumulate,
        **_shared_meta("d_weight", d_logits, map_tile, blocks, vocab_order),
    )
    return KernelLaunch(
        kernel=_d_weight_kept_kernel,
        grid=(triton.cdiv(hidden_size, blocks.block_hidden), triton.cdiv(vocab_size, blocks.block_out)),
        arguments=arguments,
        options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages},
    )

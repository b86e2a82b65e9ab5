"""The logit tile both fused linear log-prob kernels compute: hidden[rows] @ weight[cols].T (+ bias), fp32."""

import triton
import triton.language as tl


@triton.jit
def logit_tile(
    # pointers
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    # tile coordinates
    rows,
    cols,
    row_ok,
    col_ok,
    # strides
    stride_hidden_n,
    stride_hidden_h,
    stride_weight_v,
    stride_weight_h,
    # sizes
    hidden_size,
    # meta
    HAS_BIAS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """(BLOCK_N, BLOCK_V) fp32 logits; masked rows and columns hold the bias (or 0), callers mask them."""
    logits = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k_start in range(0, hidden_size, BLOCK_H):
        ks = k_start + tl.arange(0, BLOCK_H)
        k_ok = ks < hidden_size
        hidden_tile = tl.load(
            hidden_ptr + rows[:, None] * stride_hidden_n + ks[None, :] * stride_hidden_h,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_H)
        weight_tile_t = tl.load(
            weight_ptr + ks[:, None] * stride_weight_h + cols[None, :] * stride_weight_v,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # (BLOCK_H, BLOCK_V)
        if UPCAST_DOT:
            hidden_tile = hidden_tile.to(tl.float32)
            weight_tile_t = weight_tile_t.to(tl.float32)
        logits = tl.dot(hidden_tile, weight_tile_t, logits, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        logits += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return logits

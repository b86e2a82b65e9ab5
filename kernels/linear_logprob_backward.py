"""Backward kernel of the fused linear log-prob: d_hidden, d_weight and d_bias from recomputed logit tiles.

Strategy: one program per (BLOCK_N rows, BLOCK_V vocabulary columns) tile. It recomputes the logit tile with a K-loop
of tl.dot, turns it into
    dlogits = g * (onehot(label) - exp((logits - max_logit) - log_norm))   (g: upstream gradient, 0 if ignored)
and walks the hidden size a second time to add dlogits @ W[cols] into d_hidden[rows] and dlogits^T @ h[rows] into
d_weight[cols]. Both targets receive partial sums from many programs, so they are fp32 buffers updated with
tl.atomic_add; the host casts them to the input dtypes. FLOPs: 2 N H V to recompute plus 2 N H V per gradient.

Numerics: as in the forward, tiles are upcast to fp32 when `UPCAST_DOT` is set; on a GPU with 16-bit inputs dlogits
is rounded to the input dtype before its two matmuls (fp32 accumulation), the usual fused-cross-entropy trade.
Atomic accumulation makes the gradients' last bits depend on scheduling on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import KernelLaunch, LinearLogprobBlocks
from .linear_logprob_forward import dot_settings
from .linear_logprob_tiles import logit_tile


@triton.jit
def _linear_logprob_bwd_kernel(
    # pointers
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    max_logit_ptr,
    log_norm_ptr,
    grad_ptr,
    d_hidden_ptr,
    d_weight_ptr,
    d_bias_ptr,
    # strides
    stride_hidden_n,
    stride_hidden_h,
    stride_weight_v,
    stride_weight_h,
    stride_d_hidden_n,
    stride_d_weight_v,
    # sizes
    num_tokens,
    hidden_size,
    vocab_size,
    ignore_index,
    # meta
    HAS_BIAS: tl.constexpr,
    COMPUTE_D_HIDDEN: tl.constexpr,
    COMPUTE_D_WEIGHT: tl.constexpr,
    COMPUTE_D_BIAS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    block_row = tl.program_id(0).to(tl.int64)
    block_col = tl.program_id(1).to(tl.int64)
    rows = block_row * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = block_col * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < num_tokens
    col_ok = cols < vocab_size
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    max_logit = tl.load(max_logit_ptr + rows, mask=row_ok, other=0.0)
    log_norm = tl.load(log_norm_ptr + rows, mask=row_ok, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    grad = tl.where(labels != ignore_index, grad, 0.0)

    logits = logit_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok,
        stride_hidden_n, stride_hidden_h, stride_weight_v, stride_weight_h, hidden_size,
        HAS_BIAS=HAS_BIAS, UPCAST_DOT=UPCAST_DOT, INPUT_PRECISION=INPUT_PRECISION,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H,
    )  # (BLOCK_N, BLOCK_V)

    probs = tl.exp((logits - max_logit[:, None]) - log_norm[:, None])
    onehot = (cols[None, :] == labels[:, None]).to(tl.float32)
    d_logits = grad[:, None] * (onehot - probs)
    d_logits = tl.where(row_ok[:, None] & col_ok[None, :], d_logits, 0.0)  # (BLOCK_N, BLOCK_V)

    if COMPUTE_D_BIAS:
        tl.atomic_add(d_bias_ptr + cols, tl.sum(d_logits, axis=0), mask=col_ok)
    if COMPUTE_D_HIDDEN or COMPUTE_D_WEIGHT:
        if UPCAST_DOT:
            d_logits_dot = d_logits
        else:
            d_logits_dot = d_logits.to(hidden_ptr.dtype.element_ty)
        for k_start in range(0, hidden_size, BLOCK_H):
            ks = k_start + tl.arange(0, BLOCK_H)
            k_ok = ks < hidden_size
            if COMPUTE_D_HIDDEN:
                weight_tile = tl.load(
                    weight_ptr + cols[:, None] * stride_weight_v + ks[None, :] * stride_weight_h,
                    mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )  # (BLOCK_V, BLOCK_H)
                if UPCAST_DOT:
                    weight_tile = weight_tile.to(tl.float32)
                d_hidden_part = tl.dot(d_logits_dot, weight_tile, input_precision=INPUT_PRECISION)
                tl.atomic_add(
                    d_hidden_ptr + rows[:, None] * stride_d_hidden_n + ks[None, :],
                    d_hidden_part,
                    mask=row_ok[:, None] & k_ok[None, :],
                )
            if COMPUTE_D_WEIGHT:
                hidden_tile = tl.load(
                    hidden_ptr + rows[:, None] * stride_hidden_n + ks[None, :] * stride_hidden_h,
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )  # (BLOCK_N, BLOCK_H)
                if UPCAST_DOT:
                    hidden_tile = hidden_tile.to(tl.float32)
                d_weight_part = tl.dot(tl.trans(d_logits_dot), hidden_tile, input_precision=INPUT_PRECISION)
                tl.atomic_add(
                    d_weight_ptr + cols[:, None] * stride_d_weight_v + ks[None, :],
                    d_weight_part,
                    mask=col_ok[:, None] & k_ok[None, :],
                )


def linear_logprob_bwd_launch(
    grad_token_logps: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    max_logit: torch.Tensor,
    log_norm: torch.Tensor,
    ignore_index: int,
    blocks: LinearLogprobBlocks,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[KernelLaunch, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward launch and the zeroed fp32 buffers it accumulates into: (launch, d_hidden, d_weight, d_bias).

    Shapes as in linear_logprob_bwd_triton; a buffer is None where `needs_grad` says no.
    """
    need_hidden, need_weight, need_bias = needs_grad
    num_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    device = hidden.device
    d_hidden = torch.zeros((num_tokens, hidden_size), dtype=torch.float32, device=device) if need_hidden else None
    d_weight = torch.zeros((vocab_size, hidden_size), dtype=torch.float32, device=device) if need_weight else None
    d_bias = torch.zeros(vocab_size, dtype=torch.float32, device=device) if need_bias else None
    placeholder = log_norm  # stands in for buffers the constexpr flags leave untouched
    upcast, precision = dot_settings(hidden.dtype)
    arguments = dict(
        hidden_ptr=hidden,
        weight_ptr=weight,
        bias_ptr=bias if bias is not None else placeholder,
        labels_ptr=labels,
        max_logit_ptr=max_logit,
        log_norm_ptr=log_norm,
        grad_ptr=grad_token_logps.contiguous(),
        d_hidden_ptr=d_hidden if need_hidden else placeholder,
        d_weight_ptr=d_weight if need_weight else placeholder,
        d_bias_ptr=d_bias if need_bias else placeholder,
        stride_hidden_n=hidden.stride(0),
        stride_hidden_h=hidden.stride(1),
        stride_weight_v=weight.stride(0),
        stride_weight_h=weight.stride(1),
        stride_d_hidden_n=hidden_size,
        stride_d_weight_v=hidden_size,
        num_tokens=num_tokens,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        ignore_index=ignore_index,
        HAS_BIAS=bias is not None,
        COMPUTE_D_HIDDEN=need_hidden,
        COMPUTE_D_WEIGHT=need_weight,
        COMPUTE_D_BIAS=need_bias,
        UPCAST_DOT=upcast,
        INPUT_PRECISION=precision,
        BLOCK_N=blocks.block_n,
        BLOCK_V=blocks.block_v,
        BLOCK_H=blocks.block_h,
    )
    launch = KernelLaunch(
        kernel=_linear_logprob_bwd_kernel,
        grid=(triton.cdiv(num_tokens, blocks.block_n), triton.cdiv(vocab_size, blocks.block_v)),
        arguments=arguments,
        options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages},
    )
    return launch, d_hidden, d_weight, d_bias


def linear_logprob_bwd_triton(
    grad_token_logps: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    max_logit: torch.Tensor,
    log_norm: torch.Tensor,
    ignore_index: int,
    blocks: LinearLogprobBlocks,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel.

    Shapes: grad_token_logps (N,), hidden (N, H), weight (V, H), labels (N,), bias (V,) or None,
    max_logit (N,) and log_norm (N,) fp32 from the forward.
    `needs_grad` says which of (hidden, weight, bias) want a gradient; the others come back as None.
    Returns (d_hidden (N, H), d_weight (V, H), d_bias (V,)) in the dtypes of their inputs.
    """
    launch, d_hidden, d_weight, d_bias = linear_logprob_bwd_launch(
        grad_token_logps, hidden, weight, labels, bias, max_logit, log_norm, ignore_index, blocks, needs_grad
    )
    launch.run()
    return (
        d_hidden.to(hidden.dtype) if d_hidden is not None else None,
        d_weight.to(weight.dtype) if d_weight is not None else None,
        d_bias.to(bias.dtype) if d_bias is not None else None,
    )

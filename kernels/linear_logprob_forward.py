"""Forward kernel of the fused linear log-prob: per-token log-sum-exp and target logit, never the (N, V) logits.

Strategy: each program owns BLOCK_N rows and one contiguous range of the vocabulary. It walks that range in BLOCK_V
tiles; each logit tile is a K-loop of tl.dot over the hidden size, folded straight into an online log-sum-exp
(running max m and running sum s: s <- s * exp(m_old - m_new) + sum exp(l - m_new)), and the tile column equal to the
label is picked as the target logit. Only m, s and the target leave the program. When the grid has few row blocks
the vocabulary is split into ranges (a second grid axis) whose partial (m, s) the host combines. The normaliser stays
split as lse = m + log(s): l - m is exact near the maximum, which keeps probabilities close to 1 precise in the
backward even for logits in the thousands.

Numerics: every loaded tile is converted to fp32 when `UPCAST_DOT` is set (always under the interpreter, whose bf16
arithmetic is wrong); on a GPU 16-bit tiles go into tl.dot as they are, which multiplies exactly and accumulates in
fp32, and fp32 tiles use IEEE or TF32 products as torch.get_float32_matmul_precision() says (see dot_settings). All
softmax arithmetic is fp32.

Limits: labels equal to ignore_index must be masked by the caller (the host returns 0 for them); offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import KernelLaunch, LinearLogprobBlocks, running_in_interpreter, vocab_split_count
from .linear_logprob_tiles import logit_tile


@triton.jit
def _linear_logprob_fwd_kernel(
    # pointers
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    target_logit_ptr,
    # strides
    stride_hidden_n,
    stride_hidden_h,
    stride_weight_v,
    stride_weight_h,
    stride_partial_split,
    # sizes
    num_tokens,
    hidden_size,
    vocab_size,
    split_size,
    # meta
    HAS_BIAS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # int64 program ids keep row * stride from overflowing for N x H or V x H beyond 2^31 elements.
    block_row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = block_row * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_tokens
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64)

    vocab_start = split * split_size
    vocab_end = tl.minimum(vocab_start + split_size, vocab_size)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile_start in range(vocab_start, vocab_end, BLOCK_V):
        cols = tile_start + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab_end
        logits = logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok,
            stride_hidden_n, stride_hidden_h, stride_weight_v, stride_weight_h, hidden_size,
            HAS_BIAS=HAS_BIAS, UPCAST_DOT=UPCAST_DOT, INPUT_PRECISION=INPUT_PRECISION,
            BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H,
        )  # (BLOCK_N, BLOCK_V)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))

        # Every tile holds at least one valid column, so new_max is finite and exp(-inf - new_max) = 0 on entry.
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        is_target = cols[None, :] == labels[:, None]
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)

    tl.store(partial_max_ptr + split * stride_partial_split + rows, running_max, mask=row_ok)
    tl.store(partial_sum_ptr + split * stride_partial_split + rows, running_sum, mask=row_ok)
    owns_target = row_ok & (labels >= vocab_start) & (labels < vocab_end)
    tl.store(target_logit_ptr + rows, target_logit, mask=owns_target)


# tl.dot's input precision for fp32 tiles under each torch.get_float32_matmul_precision() (see dot_settings).
FP32_DOT_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32x3"}


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST_DOT, INPUT_PRECISION) of tl.dot for tiles of this dtype, read at launch time like cuBLAS reads it.

    16-bit tiles go into tl.dot as they are (exact products, fp32 accumulation). fp32 tiles follow
    torch.get_float32_matmul_precision(): "highest" multiplies in IEEE fp32; "high" and "medium", which allow tensor
    cores, in "tf32x3" (each operand split into a TF32 part and a TF32 remainder, three products: close to fp32
    accuracy). Plain TF32 is not used: on an H200 (Triton 3.6) its log-probs erred 1.5-6x beyond a cuBLAS TF32 baseline
    (bench/RESULTS.md), biased enough to move sums over a response. The interpreter upcasts every tile (its 16-bit
    arithmetic is wrong) and has no TF32, so it always gets IEEE.
    """
    if running_in_interpreter() or dtype != torch.float32:
        return running_in_interpreter(), "ieee"
    return True, FP32_DOT_PRECISION[torch.get_float32_matmul_precision()]


def linear_logprob_fwd_launch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    blocks: LinearLogprobBlocks,
) -> tuple[KernelLaunch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward launch and the buffers it writes: (launch, partial_max, partial_sum, target_logits).

    Shapes: hidden (N, H), weight (V, H), labels (N,), bias (V,) or None -> partial_max, partial_sum (splits, N) and
    target_logits (N,), fp32. target_logits starts at 0: a row's target is written by the one split that owns it.
    """
    num_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    splits = vocab_split_count(blocks, num_tokens, vocab_size, hidden.device)
    vocab_tiles = triton.cdiv(vocab_size, blocks.block_v)
    split_size = triton.cdiv(vocab_tiles, splits) * blocks.block_v
    splits = triton.cdiv(vocab_size, split_size)  # no empty range
    partial_max = torch.empty((splits, num_tokens), dtype=torch.float32, device=hidden.device)
    partial_sum = torch.empty((splits, num_tokens), dtype=torch.float32, device=hidden.device)
    target_logits = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
    upcast, precision = dot_settings(hidden.dtype)
    arguments = dict(
        hidden_ptr=hidden,
        weight_ptr=weight,
        bias_ptr=bias if bias is not None else hidden,  # never read when HAS_BIAS is False
        labels_ptr=labels,
        partial_max_ptr=partial_max,
        partial_sum_ptr=partial_sum,
        target_logit_ptr=target_logits,
        stride_hidden_n=hidden.stride(0),
        stride_hidden_h=hidden.stride(1),
        stride_weight_v=weight.stride(0),
        stride_weight_h=weight.stride(1),
        stride_partial_split=partial_max.stride(0),
        num_tokens=num_tokens,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        split_size=split_size,
        HAS_BIAS=bias is not None,
        UPCAST_DOT=upcast,
        INPUT_PRECISION=precision,
        BLOCK_N=blocks.block_n,
        BLOCK_V=blocks.block_v,
        BLOCK_H=blocks.block_h,
    )
    launch = KernelLaunch(
        kernel=_linear_logprob_fwd_kernel,
        grid=(triton.cdiv(num_tokens, blocks.block_n), splits),
        arguments=arguments,
        options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages},
    )
    return launch, partial_max, partial_sum, target_logits


def linear_logprob_fwd_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    blocks: LinearLogprobBlocks,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Shapes: hidden (N, H), weight (V, H), labels (N,), bias (V,) or None; fp16, bf16 or fp32.
    Returns (token_logps, max_logit, log_norm), each (N,) fp32, with lse = max_logit + log_norm; token_logps is 0
    where labels == ignore_index.
    """
    launch, partial_max, partial_sum, target_logits = linear_logprob_fwd_launch(hidden, weight, labels, bias, blocks)
    launch.run()
    if partial_max.shape[0] == 1:  # one vocabulary range: nothing to combine, one launch instead of five
        max_logit, log_norm = partial_max[0], partial_sum[0].log()  # (N,)
    else:
        max_logit = partial_max.max(dim=0).values  # (N,)
        log_norm = (partial_sum * torch.exp(partial_max - max_logit)).sum(dim=0).log()  # (N,)
    supervised = labels != ignore_index
    token_logps = torch.where(supervised, (target_logits - max_logit) - log_norm, torch.zeros_like(log_norm))
    return token_logps, max_logit, log_norm

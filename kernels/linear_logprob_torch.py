"""Chunked PyTorch path of the fused linear log-prob: the `impl="torch"` route, used where there is no GPU.

Same contract and memory behaviour as the Triton kernels: the forward keeps only two floats per token (the largest
logit and the log of the shifted softmax sum), and the backward recomputes the logits, so the working memory is
O(chunk_size x V) and never O(N x V).

Maths, for a row with logits l = h W^T + b, lse = log sum_v exp(l_v) and target t:
    logp = l_t - lse
    d logp / d l_v = [v == t] - softmax(l)_v
so with upstream gradient g, dlogits = g * (onehot(t) - softmax(l)), and
    d_hidden = dlogits @ W,   d_weight = dlogits^T @ h,   d_bias = sum_rows dlogits.
lse is kept as max_logit + log_norm rather than one number: softmax(l)_v = exp((l_v - max) - log_norm), and l_v - max
is exact near the maximum, so a probability close to 1 keeps full precision even when logits are in the thousands.
"""

from __future__ import annotations

import torch

from .grad_filter import FILTER_TILE_COLS, FILTER_TILE_ROWS, filtered_tiles, record_tiles, tile_mask


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every 16/32-bit input; fp64 stays fp64 so that gradcheck can run on this path."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(
    hidden_chunk: torch.Tensor, weight_c: torch.Tensor, bias_c: torch.Tensor | None
) -> torch.Tensor:
    logits = hidden_chunk.to(weight_c.dtype) @ weight_c.T  # (C, V)
    if bias_c is not None:
        logits += bias_c
    return logits


def linear_logprob_fwd_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token log-probs and the softmax normaliser, one chunk of rows at a time.

    Shapes: hidden (N, H), weight (V, H), labels (N,), bias (V,) or None.
    Returns (token_logps, max_logit, log_norm), each (N,), fp32 (fp64 for fp64 inputs), with
    lse = max_logit + log_norm; token_logps is 0 on ignored rows.
    """
    dtype = compute_dtype_for(hidden.dtype)
    # One upcast copy of the weight per call (a no-op for fp32): logits computed in 16-bit would round to 3 digits.
    weight_c = weight.to(dtype)  # (V, H)
    bias_c = None if bias is None else bias.to(dtype)
    num_tokens = hidden.shape[0]
    max_logit = torch.empty(num_tokens, dtype=dtype, device=hidden.device)
    log_norm = torch.empty(num_tokens, dtype=dtype, device=hidden.device)
    shifted_target = torch.empty(num_tokens, dtype=dtype, device=hidden.device)
    supervised = labels != ignore_index
    safe_labels = torch.where(supervised, labels, torch.zeros_like(labels)).long()
    for start in range(0, num_tokens, chunk_size):
        rows = slice(start, start + chunk_size)
        logits = _chunk_logits(hidden[rows], weight_c, bias_c)  # (C, V)
        chunk_max = logits.max(dim=-1).values
        logits.sub_(chunk_max.unsqueeze(1))
        max_logit[rows] = chunk_max
        shifted_target[rows] = logits.gather(1, safe_labels[rows].unsqueeze(1)).squeeze(1)
        log_norm[rows] = logits.exp_().sum(dim=-1).log_()
        del logits
    token_logps = torch.where(supervised, shifted_target - log_norm, torch.zeros_like(log_norm))
    return token_logps, max_logit, log_norm


def linear_logprob_bwd_torch(
    grad_token_logps: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    max_logit: torch.Tensor,
    log_norm: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool],
    filter_eps: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum(grad_token_logps * token_logps) w.r.t. hidden, weight and bias, recomputing logits per chunk.

    Shapes: grad_token_logps (N,), hidden (N, H), weight (V, H), labels (N,), bias (V,) or None,
    max_logit (N,), log_norm (N,) from the forward.
    `needs_grad` says which of (hidden, weight, bias) want a gradient; the others come back as None.
    `filter_eps` > 0 zeroes the d_logits tiles that grad_filter.filtered_tiles picks; 0 keeps every one.
    Returns (d_hidden (N, H), d_weight (V, H), d_bias (V,)) in the dtypes of their inputs.
    """
    need_hidden, need_weight, need_bias = needs_grad
    dtype = log_norm.dtype
    weight_c = weight.to(dtype)  # (V, H)
    bias_c = None if bias is None else bias.to(dtype)
    supervised = labels != ignore_index
    # Ignored rows contribute nothing, whatever gradient arrives for them.
    grad = torch.where(supervised, grad_token_logps.to(dtype), torch.zeros((), dtype=dtype, device=hidden.device))
    safe_labels = torch.where(supervised, labels, torch.zeros_like(labels)).long()

    d_hidden = torch.empty_like(hidden) if need_hidden else None
    d_weight = torch.zeros_like(weight_c) if need_weight else None
    d_bias = torch.zeros_like(bias_c) if need_bias else None
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        hidden_chunk = hidden[rows].to(dtype)  # (C, H)
        d_logits = _chunk_logits(hidden_chunk, weight_c, bias_c)  # (C, V), reused in place to hold dlogits
        d_logits.sub_(max_logit[rows].unsqueeze(1)).sub_(log_norm[rows].unsqueeze(1)).exp_().neg_()
        d_logits.scatter_add_(1, safe_labels[rows].unsqueeze(1), torch.ones_like(d_logits[:, :1]))
        if filter_eps > 0:
            skipped = filtered_tiles(d_logits, grad[rows] != 0, filter_eps)  # (row tiles, vocabulary tiles)
            d_logits.masked_fill_(tile_mask(skipped, *d_logits.shape), 0.0)
            record_tiles(skipped, skipped.numel())
        else:
            record_tiles(0, -(-d_logits.shape[0] // FILTER_TILE_ROWS) * -(-d_logits.shape[1] // FILTER_TILE_COLS))
        d_logits.mul_(grad[rows].unsqueeze(1))
        if need_hidden:
            d_hidden[rows] = (d_logits @ weight_c).to(hidden.dtype)
        if need_weight:
            d_weight.addmm_(d_logits.T, hidden_chunk)
        if need_bias:
            d_bias += d_logits.sum(0)
        del d_logits
    if need_weight:
        d_weight = d_weight.to(weight.dtype)
    if need_bias:
        d_bias = d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias

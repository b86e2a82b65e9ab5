"""Autograd wrapper of the fused linear log-prob: saves two floats per token (the softmax normaliser), never logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .launch_config import device_blocks
from .linear_logprob_backward import linear_logprob_bwd_triton
from .linear_logprob_forward import linear_logprob_fwd_triton
from .linear_logprob_torch import linear_logprob_bwd_torch, linear_logprob_fwd_torch


@dataclass(frozen=True)
class LinearLogprobParams:
    """Non-tensor arguments. impl is "triton" or "torch" (already resolved); chunk_size is for the torch path;
    filter_eps is the backward's gradient-filter threshold (dama_kernels.grad_filter, 0: exact); skip_filtered lets
    the Triton backward's products skip the filtered tiles."""

    ignore_index: int
    impl: str
    chunk_size: int
    filter_eps: float = 0.0
    skip_filtered: bool = True


class LinearLogprobFunction(torch.autograd.Function):
    """token_logps = log_softmax(hidden @ weight.T + bias)[labels], 0 on ignored rows.

    Naive torch equivalent (which this avoids materialising):
        torch.log_softmax(hidden.float() @ weight.float().T + bias, -1).gather(1, labels[:, None])[:, 0]

    The caller has already applied autocast's casts (see functional._cast_like_linear); autocast is switched off
    inside, else the torch path's fp32 matmuls would be cast back down to 16-bit.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, params: LinearLogprobParams):
        with torch.autocast(hidden.device.type, enabled=False):
            if params.impl == "triton":
                token_logps, max_logit, log_norm = linear_logprob_fwd_triton(
                    hidden, weight, labels, bias, params.ignore_index,
                    device_blocks("forward", hidden.device, hidden.dtype),
                )
            else:
                token_logps, max_logit, log_norm = linear_logprob_fwd_torch(
                    hidden, weight, labels, bias, params.ignore_index, params.chunk_size
                )
        ctx.save_for_backward(hidden, weight, bias, labels, max_logit, log_norm)
        ctx.params = params
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):
        hidden, weight, bias, labels, max_logit, log_norm = ctx.saved_tensors
        params: LinearLogprobParams = ctx.params
        needs_grad = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if grad_token_logps is None or not any(needs_grad):
            return None, None, None, None, None
        with torch.autocast(hidden.device.type, enabled=False):
            if params.impl == "triton":
                d_hidden, d_weight, d_bias = linear_logprob_bwd_triton(
                    grad_token_logps, hidden, weight, labels, bias, max_logit, log_norm, params.ignore_index,
                    device_blocks("backward", hidden.device, hidden.dtype), needs_grad, None, params.filter_eps,
                    params.skip_filtered,
                )
            else:
                d_hidden, d_weight, d_bias = linear_logprob_bwd_torch(
                    grad_token_logps, hidden, weight, labels, bias, max_logit, log_norm, params.ignore_index,
                    params.chunk_size, needs_grad, params.filter_eps,
                )
        return d_hidden, d_weight, d_bias, None, None

"""Autograd wrapper of the weighted DAMA sigmoid loss: the gradient reaches the policy log-probs only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dama_loss_torch import dama_loss_bwd_torch, dama_loss_fwd_torch
from .dama_loss_triton import dama_loss_bwd_triton, dama_loss_fwd_triton


@dataclass(frozen=True)
class DamaLossParams:
    """impl is "triton" or "torch" (already resolved)."""

    impl: str


class DamaSigmoidLossFunction(torch.autograd.Function):
    """loss = sum(mask * -log sigmoid(beta * z)) / num_selected, z = (pc - pr) - (rc - rr).

    Inputs: policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, base_beta, mask (P,) in one compute dtype,
    num_selected a 0-dim tensor. Outputs: loss, losses (both differentiable w.r.t. the policy log-probs), and
    margins, chosen_rewards, rejected_rewards (not differentiable).
    """

    @staticmethod
    def forward(ctx, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, base_beta, mask, num_selected,
                params: DamaLossParams):
        forward_impl = dama_loss_fwd_triton if params.impl == "triton" else dama_loss_fwd_torch
        loss, losses, margins, chosen_rewards, rejected_rewards, d_losses_d_margin = forward_impl(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, base_beta, mask, num_selected
        )
        ctx.save_for_backward(mask, num_selected, d_losses_d_margin)
        ctx.params = params
        ctx.mark_non_differentiable(margins, chosen_rewards, rejected_rewards)
        return loss, losses, margins, chosen_rewards, rejected_rewards

    @staticmethod
    def backward(ctx, grad_loss, grad_losses, _grad_margins, _grad_chosen_rewards, _grad_rejected_rewards):
        mask, num_selected, d_losses_d_margin = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros((), dtype=d_losses_d_margin.dtype, device=d_losses_d_margin.device)
        backward_impl = dama_loss_bwd_triton if ctx.params.impl == "triton" else dama_loss_bwd_torch
        d_chosen, d_rejected = backward_impl(grad_loss, grad_losses, mask, num_selected, d_losses_d_margin)
        return d_chosen, d_rejected, None, None, None, None, None, None, None

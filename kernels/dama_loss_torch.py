"""PyTorch path of the weighted DAMA sigmoid loss; same contract as the Triton kernels in dama_loss_triton.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dama_loss_fwd_torch(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: torch.Tensor,
    base_beta: torch.Tensor,
    mask: torch.Tensor,
    num_selected: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Every tensor input is (P,) in the compute dtype except num_selected, a 0-dim tensor.

    Returns (loss (), losses, margins, chosen_rewards, rejected_rewards, d_losses_d_margin), all (P,) but loss.
    """
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    margins = chosen_logratio - rejected_logratio
    x = beta * margins
    losses = F.softplus(-x)
    d_losses_d_margin = -beta * torch.sigmoid(-x)
    loss = (mask * losses).sum() / num_selected
    return loss, losses, margins, base_beta * chosen_logratio, base_beta * rejected_logratio, d_losses_d_margin


def dama_loss_bwd_torch(
    grad_loss: torch.Tensor,
    grad_losses: torch.Tensor | None,
    mask: torch.Tensor,
    num_selected: torch.Tensor,
    d_losses_d_margin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d_policy_chosen (P,), d_policy_rejected (P,)) in the compute dtype."""
    grad_per_pair = grad_loss * mask / num_selected
    if grad_losses is not None:
        grad_per_pair = grad_per_pair + grad_losses
    d_margin = grad_per_pair * d_losses_d_margin
    return d_margin, -d_margin

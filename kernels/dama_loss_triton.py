"""Triton kernels of the weighted DAMA sigmoid loss: per-pair temperature, selection mask, global normalisation.

Per pair i, with x = beta_i * z_i and z_i the implicit reward margin:
    losses_i = -log sigmoid(x) = softplus(-x) = max(-x, 0) + log1p(exp(-|x|))
    d losses_i / d z_i = -beta_i * sigmoid(-x),  sigmoid(-x) = (x >= 0 ? e : 1) / (1 + e),  e = exp(-|x|)
Both forms stay finite for any |x|. The forward also writes that derivative, so the backward is one fused multiply.
Each program reduces its block of mask * losses to one partial sum; the host adds the partials (deterministic) and
divides by the number of selected pairs, which a data-parallel caller gives as the global count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import LOSS_BLOCK, KernelLaunch


@triton.jit
def _dama_loss_fwd_kernel(
    # pointers
    policy_chosen_ptr,
    policy_rejected_ptr,
    ref_chosen_ptr,
    ref_rejected_ptr,
    beta_ptr,
    base_beta_ptr,
    mask_ptr,
    losses_ptr,
    margins_ptr,
    chosen_rewards_ptr,
    rejected_rewards_ptr,
    d_losses_d_margin_ptr,
    partial_sums_ptr,
    # sizes
    num_pairs,
    # meta
    BLOCK: tl.constexpr,
):
    block = tl.program_id(0)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < num_pairs
    policy_chosen = tl.load(policy_chosen_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    policy_rejected = tl.load(policy_rejected_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    ref_chosen = tl.load(ref_chosen_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    ref_rejected = tl.load(ref_rejected_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    base_beta = tl.load(base_beta_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    mask = tl.load(mask_ptr + offsets, mask=ok, other=0.0).to(tl.float32)

    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    margins = chosen_logratio - rejected_logratio
    x = beta * margins
    e = tl.exp(-tl.abs(x))
    # log1p(e): log(1.0 + e) alone keeps only the bits of e above 1's ulp, a relative error up to 1e-3 on the small
    # losses of well-separated pairs. Scaling by e / (u - 1) undoes the rounding of u = 1 + e; u - 1 == 0 means e is
    # below half an ulp of 1, where log1p(e) = e (the inner where only keeps that lane from dividing by zero).
    u = 1.0 + e
    kept = u - 1.0
    log1p_e = tl.where(kept == 0.0, e, tl.log(u) * (e / tl.where(kept == 0.0, 1.0, kept)))
    losses = tl.maximum(-x, 0.0) + log1p_e
    sigmoid_neg_x = tl.where(x >= 0, e, 1.0) / (1.0 + e)

    tl.store(losses_ptr + offsets, losses, mask=ok)
    tl.store(margins_ptr + offsets, margins, mask=ok)
    tl.store(chosen_rewards_ptr + offsets, base_beta * chosen_logratio, mask=ok)
    tl.store(rejected_rewards_ptr + offsets, base_beta * rejected_logratio, mask=ok)
    tl.store(d_losses_d_margin_ptr + offsets, -beta * sigmoid_neg_x, mask=ok)
    tl.store(partial_sums_ptr + block, tl.sum(tl.where(ok, mask * losses, 0.0), axis=0))


@triton.jit
def _dama_loss_bwd_kernel(
    # pointers
    grad_loss_ptr,
    grad_losses_ptr,
    mask_ptr,
    num_selected_ptr,
    d_losses_d_margin_ptr,
    d_policy_chosen_ptr,
    d_policy_rejected_ptr,
    # sizes
    num_pairs,
    # meta
    HAS_GRAD_LOSSES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < num_pairs
    grad_loss = tl.load(grad_loss_ptr).to(tl.float32)
    num_selected = tl.load(num_selected_ptr).to(tl.float32)
    mask = tl.load(mask_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    grad_per_pair = grad_loss * mask / num_selected
    if HAS_GRAD_LOSSES:
        grad_per_pair += tl.load(grad_losses_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    d_margin = grad_per_pair * tl.load(d_losses_d_margin_ptr + offsets, mask=ok, other=0.0)
    tl.store(d_policy_chosen_ptr + offsets, d_margin, mask=ok)
    tl.store(d_policy_rejected_ptr + offsets, -d_margin, mask=ok)


def dama_loss_fwd_launch(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: torch.Tensor,
    base_beta: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[KernelLaunch, list[torch.Tensor], torch.Tensor]:
    """The forward launch, its five (P,) fp32 outputs (losses, margins, chosen_rewards, rejected_rewards,
    d_losses_d_margin) and its per-program partial sums of mask * losses."""
    num_pairs = policy_chosen.shape[0]
    num_blocks = triton.cdiv(num_pairs, LOSS_BLOCK)
    outputs = [torch.empty(num_pairs, dtype=torch.float32, device=policy_chosen.device) for _ in range(5)]
    partial_sums = torch.empty(num_blocks, dtype=torch.float32, device=policy_chosen.device)
    inputs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, base_beta, mask)
    names = ("policy_chosen_ptr", "policy_rejected_ptr", "ref_chosen_ptr", "ref_rejected_ptr", "beta_ptr",
             "base_beta_ptr", "mask_ptr", "losses_ptr", "margins_ptr", "chosen_rewards_ptr", "rejected_rewards_ptr",
             "d_losses_d_margin_ptr")
    arguments = dict(zip(names, (*inputs, *outputs), strict=True))
    arguments.update(partial_sums_ptr=partial_sums, num_pairs=num_pairs, BLOCK=LOSS_BLOCK)
    return KernelLaunch(kernel=_dama_loss_fwd_kernel, grid=(num_blocks,), arguments=arguments), outputs, partial_sums


def dama_loss_fwd_triton(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: torch.Tensor,
    base_beta: torch.Tensor,
    mask: torch.Tensor,
    num_selected: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward kernel. Every tensor input is (P,) except num_selected, a 0-dim tensor.

    Returns (loss (), losses, margins, chosen_rewards, rejected_rewards, d_losses_d_margin), fp32, all (P,) but loss.
    """
    launch, outputs, partial_sums = dama_loss_fwd_launch(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, base_beta, mask
    )
    launch.run()
    loss = partial_sums.sum() / num_selected
    return (loss, *outputs)


def dama_loss_bwd_launch(
    grad_loss: torch.Tensor,
    grad_losses: torch.Tensor | None,
    mask: torch.Tensor,
    num_selected: torch.Tensor,
    d_losses_d_margin: torch.Tensor,
) -> tuple[KernelLaunch, torch.Tensor, torch.Tensor]:
    """The backward launch and its two (P,) fp32 outputs (d_policy_chosen, d_policy_rejected)."""
    num_pairs = mask.shape[0]
    d_policy_chosen = torch.empty(num_pairs, dtype=torch.float32, device=mask.device)
    d_policy_rejected = torch.empty_like(d_policy_chosen)
    arguments = dict(
        grad_loss_ptr=grad_loss.reshape(1),
        grad_losses_ptr=grad_losses if grad_losses is not None else d_losses_d_margin,  # unread without them
        mask_ptr=mask,
        num_selected_ptr=num_selected.reshape(1),
        d_losses_d_margin_ptr=d_losses_d_margin,
        d_policy_chosen_ptr=d_policy_chosen,
        d_policy_rejected_ptr=d_policy_rejected,
        num_pairs=num_pairs,
        HAS_GRAD_LOSSES=grad_losses is not None,
        BLOCK=LOSS_BLOCK,
    )
    launch = KernelLaunch(kernel=_dama_loss_bwd_kernel, grid=(triton.cdiv(num_pairs, LOSS_BLOCK),), arguments=arguments)
    return launch, d_policy_chosen, d_policy_rejected


def dama_loss_bwd_triton(
    grad_loss: torch.Tensor,
    grad_losses: torch.Tensor | None,
    mask: torch.Tensor,
    num_selected: torch.Tensor,
    d_losses_d_margin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns (d_policy_chosen (P,), d_policy_rejected (P,)), fp32."""
    launch, d_policy_chosen, d_policy_rejected = dama_loss_bwd_launch(
        grad_loss, grad_losses, mask, num_selected, d_losses_d_margin
    )
    launch.run()
    return d_policy_chosen, d_policy_rejected

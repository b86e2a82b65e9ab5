"""Reference implementations: the specification of every fused op, written the obvious way.

They materialise the full (N, V) logits, so they are for tests and benchmarks only. Every function computes in the
dtype given by `compute_dtype` (float64 by default), which makes them the ground truth the kernels are measured against.
Autograd through them gives the reference gradients.

Shape letters: N tokens, H hidden size, V vocabulary, S sequences, P pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[label] per token, 0 where label == ignore_index.

    Shapes: hidden (N, H), weight (V, H), labels (N,), bias (V,) -> (N,) in `compute_dtype`.
    """
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T  # (N, V)
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    supervised = labels != ignore_index
    safe_labels = torch.where(supervised, labels, torch.zeros_like(labels))
    picked = logits.log_softmax(dim=-1).gather(1, safe_labels.long().unsqueeze(1)).squeeze(1)  # (N,)
    return torch.where(supervised, picked, torch.zeros_like(picked))


def reference_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Sum of the token log-probs of each sequence.

    Shapes: hidden (N, H), weight (V, H), labels (N,), seq_ids (N,) in [0, S), bias (V,) -> (S,) in `compute_dtype`.
    """
    token_logps = reference_token_logps(hidden, weight, labels, bias, ignore_index, compute_dtype)
    sums = torch.zeros(num_seqs, dtype=compute_dtype, device=hidden.device)
    return sums.index_add(0, seq_ids.long(), token_logps)


def reference_filtered_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    grad_token_logps: torch.Tensor,
    filter_eps: float,
    tile_rows: int,
    tile_cols: int,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float64,
    vocab_order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Gradients of sum(grad_token_logps * token_logps) with gradient filtering, from the full logits.

    d_logits = g * (onehot - softmax), g = 0 on ignored rows; the (tile_rows x tile_cols) tiles counted from (0, 0)
    in which every |onehot - softmax| of a row with g != 0 is below filter_eps are set to zero (filter_eps = 0: none).
    With vocab_order (V,), a tile's columns are the words vocab_order[col : col + tile_cols] instead of col onwards.

    Shapes: hidden (N, H), weight (V, H), labels (N,), bias (V,) or None, grad_token_logps (N,) -> (d_hidden (N, H),
    d_weight (V, H), d_bias (V,)) in `compute_dtype`, and the number of filtered tiles.
    """
    h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
    logits = h @ w.T  # (N, V)
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    supervised = labels != ignore_index
    safe_labels = torch.where(supervised, labels, torch.zeros_like(labels)).long()
    grad = torch.where(supervised, grad_token_logps.to(compute_dtype), 0.0)
    unscaled = F.one_hot(safe_labels, logits.shape[1]).to(compute_dtype) - logits.softmax(dim=-1)
    d_logits = grad[:, None] * unscaled
    filtered = 0
    order = torch.arange(logits.shape[1]) if vocab_order is None else vocab_order.cpu().long()
    for row in range(0, logits.shape[0], tile_rows):
        for col in range(0, logits.shape[1], tile_cols):
            words = order[col : col + tile_cols].to(logits.device)
            tile = unscaled[row : row + tile_rows, words]
            deciding = tile[grad[row : row + tile_rows] != 0]
            if filter_eps > 0 and (deciding.numel() == 0 or deciding.abs().max() < filter_eps):
                d_logits[row : row + tile_rows, words] = 0
                filtered += 1
    return d_logits @ w, d_logits.T @ h, d_logits.sum(dim=0), filtered


def reference_dama_sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: torch.Tensor | float,
    mask: torch.Tensor | None = None,
    num_selected: torch.Tensor | float | None = None,
    base_beta: torch.Tensor | float | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weighted DPO sigmoid loss with a per-pair temperature.

    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected); losses = -log sigmoid(beta * z);
    loss = sum(mask * losses) / num_selected, num_selected = max(sum(mask), 1) unless given.
    Rewards are base_beta * (policy - ref), detached. The gradient reaches the policy log-probs only.

    Shapes: every input (P,) (beta and base_beta may be floats) -> (loss (), losses (P,), margins (P,),
    chosen_rewards (P,), rejected_rewards (P,)), all in `compute_dtype`.
    """
    policy_chosen = policy_chosen_logps.to(compute_dtype)
    policy_rejected = policy_rejected_logps.to(compute_dtype)
    ref_chosen = ref_chosen_logps.detach().to(compute_dtype)
    ref_rejected = ref_rejected_logps.detach().to(compute_dtype)
    beta = torch.as_tensor(beta, dtype=compute_dtype, device=policy_chosen.device).detach()
    base_beta = beta if base_beta is None else torch.as_tensor(base_beta, dtype=compute_dtype).detach()
    if mask is None:
        mask = torch.ones_like(policy_chosen)
    mask = mask.detach().to(compute_dtype)
    if num_selected is None:
        num_selected = mask.sum().clamp(min=1)
    num_selected = torch.as_tensor(num_selected, dtype=compute_dtype).detach()

    margins = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -F.logsigmoid(beta * margins)
    loss = (mask * losses).sum() / num_selected
    chosen_rewards = (base_beta * (policy_chosen - ref_chosen)).detach()
    rejected_rewards = (base_beta * (policy_rejected - ref_rejected)).detach()
    return loss, losses, margins.detach(), chosen_rewards, rejected_rewards

"""The DAMA weighting maths as pure functions: tensors in, tensors out, no state (paper Eq. 6, 8-14 and 15-16).

Notation (docs/method.md): A (N,) the detached reward margins of the global batch, R the running margin, S the
pairs the outlier filter selects, delta (P,) the per-pair data hardness and delta_bar its dataset mean. Everything is
computed in float64: these are a few scalars per pair, and float64 keeps the running statistics free of drift.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

Variant = Literal["release", "paper"]
VARIANTS: tuple[str, ...] = get_args(Variant)
# floor(keep_ratio * N) must not lose a pair to rounding: 0.57 * 100 is 56.99999999999999 in floating point.
_FLOOR_TOLERANCE = 1e-9


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _check_selected(values: torch.Tensor, selected: torch.Tensor) -> None:
    if values.shape != selected.shape or selected.dtype != torch.bool:
        raise ValueError(
            f"selected must be a bool tensor of shape {tuple(values.shape)}, got {selected.dtype} "
            f"{tuple(selected.shape)}"
        )
    if not bool(selected.any()):
        raise ValueError("selected has no True entry; the filter always keeps at least one pair")


def alpha_data(hardness: torch.Tensor, hardness_mean: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-aware factor alpha_D,i = sigmoid(delta_i) / sigmoid(delta_bar)  (paper Eq. 6).

    A NaN hardness means "no hardness for this pair": its alpha_D is 1 (the pair keeps the base beta).

    Shapes: hardness (P,) float, NaN where missing; hardness_mean a finite float.
    Returns (alpha (P,) float64, num_missing () int64).
    """
    if hardness.dim() != 1 or not hardness.dtype.is_floating_point:
        raise ValueError(f"hardness must be a 1-D float tensor (NaN where missing), got {hardness.dtype} "
                         f"{tuple(hardness.shape)}")
    if not math.isfinite(hardness_mean):
        raise ValueError(f"hardness_mean must be finite, got {hardness_mean}")
    hardness = hardness.detach().double()
    missing = torch.isnan(hardness)  # (P,)
    alpha = torch.sigmoid(hardness) / torch.sigmoid(torch.tensor(hardness_mean, dtype=torch.float64))
    alpha = torch.where(missing, torch.ones_like(alpha), alpha)
    return alpha, missing.sum()


def filter_weights(margins: torch.Tensor, running_margin: torch.Tensor | float, width: float) -> torch.Tensor:
    """Gaussian outlier-filter weights around the running margin (docs/method.md section 4).

        w_j = exp(-1/2 ((A_j - R) / width)^2)
    returned divided by max_j w_j (computed as exp(-1/2 (d_j^2 - min d^2)) with d = (A - R) / width). The draw only
    needs weights up to a common factor, and this one keeps the nearest pair at weight 1: the raw w underflows to
    0 for every pair once all margins lie ~38 widths from R, which late in training they can.

    Shapes: margins (N,); running_margin a float or 0-dim tensor. Returns (N,) float64 in [0, 1]; NaN where a margin
    or R is NaN, which select_pairs treats as degenerate.
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    distance_sq = ((margins.detach().double() - torch.as_tensor(running_margin, dtype=torch.float64)) / width) ** 2
    return torch.exp(-0.5 * (distance_sq - distance_sq.min()))


def num_to_keep(num_pairs: int, keep_ratio: float) -> int:
    """K = floor(keep_ratio * N), the number of pairs the filter keeps (docs/method.md section 4)."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")
    return math.floor(keep_ratio * num_pairs + _FLOOR_TOLERANCE)


def select_pairs(
    weights: torch.Tensor, keep_ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, bool]:
    """Outlier filter draw: K = floor(keep_ratio * N) distinct indices, drawn with probability ∝ w (paper Eq. 8-14).

    Every rank must pass a generator in the same state (seeded from the same (seed, step)) and the same weights, so
    that the draw is identical everywhere. Degenerate cases select every pair and report fallback=True: N < 2,
    K == 0, a weight that is negative or not finite, or fewer than K positive weights (including a zero sum), for
    which a draw without replacement is undefined.

    Shapes: weights (N,) float on the generator's device. Returns (selected (N,) bool, fallback).
    """
    if weights.dim() != 1:
        raise ValueError(f"weights must be 1-D (N,), got shape {tuple(weights.shape)}")
    num_pairs = weights.shape[0]
    num_keep = num_to_keep(num_pairs, keep_ratio)
    select_all = torch.ones(num_pairs, dtype=torch.bool, device=weights.device)
    if num_pairs < 2 or num_keep == 0:
        return select_all, True
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        return select_all, True
    if int((weights > 0).sum()) < num_keep:
        return select_all, True
    indices = torch.multinomial(weights, num_keep, replacement=False, generator=generator)  # (K,)
    selected = torch.zeros(num_pairs, dtype=torch.bool, device=weights.device)
    selected[indices] = True
    return selected, False


def alpha_model(
    margins: torch.Tensor, selected: torch.Tensor, running_margin: torch.Tensor | float, variant: str
) -> torch.Tensor:
    """Model-aware factor alpha_M, one scalar for the global batch (paper Eq. 8-14; docs/method.md 6).

        release: alpha_M = mean_{j in S} sigmoid(A_j) / sigmoid(R)
        paper:   alpha_M = sigmoid(mean_{j in S} A_j) / sigmoid(R)
    R is the running margin BEFORE this step's update.

    Shapes: margins (N,); selected (N,) bool with at least one True; running_margin float or 0-dim.
    Returns () float64.
    """
    _check_variant(variant)
    margins = margins.detach().double()
    _check_selected(margins, selected)
    if variant == "release":
        batch_statistic = torch.sigmoid(margins[selected]).mean()
    else:
        batch_statistic = torch.sigmoid(margins[selected].mean())
    return batch_statistic / torch.sigmoid(torch.as_tensor(running_margin, dtype=torch.float64))


def combined_beta(
    beta: float, alpha_data: torch.Tensor, alpha_model: torch.Tensor | float, beta_min: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair temperature beta_C,i = max(beta * alpha_D,i * alpha_M, beta_min)  (paper Eq. 15).

    Shapes: alpha_data (P,); alpha_model float or 0-dim. Returns (beta_c (P,) float64, num_clamped () int64), where
    num_clamped counts the pairs whose product fell below beta_min.
    """
    product = beta * alpha_data.detach().double() * torch.as_tensor(alpha_model, dtype=torch.float64)  # (P,)
    clamped = product < beta_min
    return torch.where(clamped, torch.full_like(product, beta_min), product), clamped.sum()


def ema_target_terms(margins: torch.Tensor, selected: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of the margins the running margin moves towards (paper Eq. 8-14; docs/method.md 6).

        release: the target is the mean over all pairs of A;  paper: the mean over the selected pairs S.
    Returned as (sum, count) rather than the mean so that the terms of several micro-batches add up to the target
    of their optimizer step: target = sum / count.

    Shapes: margins (N,); selected (N,) bool. Returns (sum () float64, count () int64).
    """
    _check_variant(variant)
    margins = margins.detach().double()
    if variant == "release":
        return margins.sum(), torch.tensor(margins.shape[0], device=margins.device)
    _check_selected(margins, selected)
    return margins[selected].sum(), selected.sum()


def ema_update(running: torch.Tensor | float, target: torch.Tensor | float, gamma: float) -> torch.Tensor:
    """R <- gamma * R + (1 - gamma) * target  (docs/method.md section 4). Returns () float64."""
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    running = torch.as_tensor(running, dtype=torch.float64)
    return gamma * running + (1 - gamma) * torch.as_tensor(target, dtype=torch.float64, device=running.device)

"""DamaLoss: the DAMA objective over a data-parallel global batch, with its running state (paper Eq. 1-2, 8-16).

One forward, on every rank:
  1. gather the detached per-pair quantities of all ranks (log-ratios, log-probs, alpha_D, ...) in GLOBAL rank order;
  2. draw the outlier filter once for the global batch, from a CPU generator seeded with (filter_seed, step), so
     every rank computes the same mask without a broadcast;
  3. alpha_M from the running margin R of the PREVIOUS step, beta_C per pair, then the loss of this rank's pairs;
  4. in training mode, record the step; the running statistics move after this micro-batch (ema_update=
     "micro_batch") or when the trainer calls end_optimizer_step() (ema_update="optimizer_step").
Every rank holds the same gathered data, so the state and the metrics are identical on every rank and equal to those
of one process holding the whole global batch.

Loss convention under data parallelism: a rank's `loss` is sum_local(mask * losses) / global_count, so the SUM of
the ranks' losses is the loss of the global batch and each rank's backward gives the exact gradient for its own
pairs. Engines that AVERAGE gradients over ranks (DDP, DeepSpeed, FSDP, and so the HF Trainer) divide that sum by
the world size: call backward on `output.loss_for_ddp` (= loss * world_size) there.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dama.errors import DamaError
from dama.method.config import DamaMethodConfig
from dama.method.distributed import all_gather_cat, get_rank
from dama.method.weighting import (
    alpha_data,
    alpha_model,
    combined_beta,
    ema_target_terms,
    ema_update,
    filter_weights,
    select_pairs,
)
from dama_kernels import dama_sigmoid_loss

logger = logging.getLogger(__name__)

# Columns of the per-pair table gathered from every rank; "selected" holds -1 where the caller injected no mask.
_COLUMNS = ("chosen_logratio", "rejected_logratio", "policy_chosen", "policy_rejected", "alpha_data", "missing",
            "selected")
_COL = {name: index for index, name in enumerate(_COLUMNS)}
# Running statistics, all start at 0 like R (docs/method.md section 4); the std and loss statistics are only logged.
_RUNNING = ("running_margin", "running_margin_std", "running_loss_mean", "running_loss_std")
# Totals since the start of training. num_steps counts training forwards (one filter draw each, and the draw's seed),
# num_updates the moves of the running statistics; the others count pairs (or draws, for filter_fallbacks).
_COUNTERS = ("num_steps", "num_updates", "filter_fallbacks", "beta_clamped", "missing_hardness")
# Sums over the micro-batches recorded since the last update of the running statistics.
_PENDING_SUMS = ("pending_target_sum", "pending_margin_sum", "pending_margin_sq_sum", "pending_loss_sum",
                 "pending_loss_sq_sum")
_PENDING_COUNTS = ("pending_target_count", "pending_pairs")


@dataclass
class DamaLossResult:
    """What DamaLoss.forward returns; P is this rank's number of pairs.

    loss () this rank's share of the global loss (see the module docstring); losses (P,) -log sigmoid(beta_C * z)
    with gradients, unmasked; beta (P,) beta_C; alpha_data (P,); alpha_model (); mask (P,) bool, the pairs the filter
    kept; margins, chosen_rewards, rejected_rewards (P,) detached, rewards with the base beta; num_selected () the
    number of selected pairs in the GLOBAL batch; metrics: 0-dim detached tensors, identical on every rank.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    beta: torch.Tensor
    alpha_data: torch.Tensor
    alpha_model: torch.Tensor
    mask: torch.Tensor
    margins: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    num_selected: torch.Tensor
    world_size: int
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss_for_ddp(self) -> torch.Tensor:
        """loss * world_size: the loss to backpropagate when the engine averages gradients over ranks."""
        return self.loss * self.world_size


def draw_seed(filter_seed: int, step: int) -> int:
    """Seed of the filter's draw at `step`, a hash of (filter_seed, step).

    Hashed rather than packed into bits: torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so
    `filter_seed << 32 | step` would ignore filter_seed altogether.
    """
    digest = hashlib.blake2b(f"dama-filter:{filter_seed}:{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class DamaLoss(nn.Module):
    """The DAMA loss with its running state; with data_aware and model_aware off it is plain DPO.

    Args:
        config: the method's options.
        hardness_mean: delta_bar, the mean hardness of the training set from its metadata (or call
            set_hardness_mean later); config.hardness_mean overrides it. Needed only when config.data_aware.

    The state lives in float64 and int64 buffers, so state_dict() holds it and load_state_dict() resumes it exactly.
    Keep the module outside the model that a mixed-precision engine casts: bf16 would ruin the running margin.

    forward changes the state only in training mode (self.training); in eval mode it computes with the current state
    and leaves it untouched. With ema_update="optimizer_step", call end_optimizer_step() after each optimizer step.
    """

    def __init__(self, config: DamaMethodConfig, hardness_mean: float | None = None) -> None:
        super().__init__()
        config.validate_method_options()
        self.config = config
        # NaN marks "not set yet"; the dataset's delta_bar is part of the checkpoint like the running state.
        self.register_buffer("dataset_hardness_mean", torch.tensor(math.nan, dtype=torch.float64))
        for name in (*_RUNNING, *_PENDING_SUMS):
            self.register_buffer(name, torch.zeros((), dtype=torch.float64))
        for name in (*_COUNTERS, *_PENDING_COUNTS):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64))
        if hardness_mean is not None:
            self.set_hardness_mean(hardness_mean)

    def set_hardness_mean(self, hardness_mean: float) -> None:
        """Sets delta_bar from the dataset's metadata (config.hardness_mean, when set, still wins)."""
        if not math.isfinite(hardness_mean):
            raise DamaError(f"hardness_mean must be finite, got {hardness_mean}")
        self.dataset_hardness_mean.fill_(hardness_mean)

    @property
    def hardness_mean(self) -> float | None:
        """The delta_bar in use: config.hardness_mean, else the dataset's, else None."""
        if self.config.hardness_mean is not None:
            return self.config.hardness_mean
        value = float(self.dataset_hardness_mean)
        return None if math.isnan(value) else value

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
        hardness: torch.Tensor | None = None,
        selected: torch.Tensor | None = None,
    ) -> DamaLossResult:
        """The DAMA loss of this rank's pairs, normalised by the number of selected pairs of the global batch.

        Shapes: the four log-probs (P,) float (policy ones carry the gradient); hardness (P,) float, NaN where a pair
        has none, required when config.data_aware; selected (P,) bool replaces the filter's draw (pass it on every
        rank or on none; the global batch must keep at least one pair). Collective: every rank must call it.
        """
        logps = {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
        }
        num_pairs, device = self._check_inputs(logps, selected)
        if self.running_margin.dtype != torch.float64:
            raise ValueError(
                f"DamaLoss state was cast to {self.running_margin.dtype}; keep the module in float64, outside any "
                "model that a mixed-precision engine casts."
            )
        local_alpha, local_missing = self._local_alpha_data(hardness, num_pairs, device)
        chosen_logratio = policy_chosen_logps.detach().double() - ref_chosen_logps.detach().double()  # (P,)
        rejected_logratio = policy_rejected_logps.detach().double() - ref_rejected_logps.detach().double()  # (P,)
        injected = torch.full((num_pairs,), -1.0, dtype=torch.float64, device=device)
        if selected is not None:
            injected = selected.to(device=device, dtype=torch.float64)
        local_rows = torch.stack(
            [chosen_logratio, rejected_logratio, policy_chosen_logps.detach().double(),
             policy_rejected_logps.detach().double(), local_alpha, local_missing.double(), injected],
            dim=1,
        )  # (P, 7)
        rows, sizes = all_gather_cat(local_rows)  # (N, 7)
        start = sum(sizes[: get_rank()])
        local = slice(start, start + num_pairs)

        margins = rows[:, _COL["chosen_logratio"]] - rows[:, _COL["rejected_logratio"]]  # (N,)
        if not bool(torch.isfinite(margins).all()):
            raise ValueError(
                "the reward margins of the global batch are not all finite: the policy or reference log-probs hold "
                "inf/NaN (check the learning rate, the labels and the precomputed reference log-probs)."
            )
        running_margin = self.running_margin.to(device)
        mask, fallback = self._select(margins, rows[:, _COL["selected"]], running_margin)  # (N,)
        if self.config.model_aware:
            alpha_m = alpha_model(margins, mask, running_margin, self.config.variant)
        else:
            alpha_m = torch.ones((), dtype=torch.float64, device=device)
        beta_c, num_clamped = combined_beta(
            self.config.beta, rows[:, _COL["alpha_data"]], alpha_m, self.config.beta_min
        )  # (N,)
        num_selected = mask.sum()
        output = dama_sigmoid_loss(
            *logps.values(),
            beta_c[local],
            mask=mask[local],
            num_selected=num_selected,
            base_beta=self.config.beta,
            impl=self.config.loss_impl,
        )
        num_missing = rows[:, _COL["missing"]].sum().long()
        metrics = self._metrics(rows, margins, mask, alpha_m, beta_c, num_clamped, num_missing, fallback)
        if self.training:
            self._record_step(margins, mask, fallback, num_clamped, num_missing)
        return DamaLossResult(
            loss=output.loss,
            losses=output.losses,
            beta=beta_c[local],
            alpha_data=rows[local, _COL["alpha_data"]],
            alpha_model=alpha_m,
            mask=mask[local],
            margins=output.margins,
            chosen_rewards=output.chosen_rewards,
            rejected_rewards=output.rejected_rewards,
            num_selected=num_selected,
            world_size=len(sizes),
            metrics=metrics,
        )

    @torch.no_grad()
    def end_optimizer_step(self) -> None:
        """Moves the running statistics with every micro-batch recorded since the last update.

        With ema_update="optimizer_step" the trainer calls this once after each optimizer step, on every rank (no
        communication: the recorded sums are already global). R then moves once per step towards the mean over all
        of its micro-batches, and every micro-batch of the step used the same R. With "micro_batch" forward already
        updated after each micro-batch and this does nothing.
        """
        if int(self.pending_pairs) == 0:
            return
        target = self.pending_target_sum / self.pending_target_count
        pairs = self.pending_pairs.double()
        margin_mean = self.pending_margin_sum / pairs
        loss_mean = self.pending_loss_sum / pairs
        # Population std from the first two moments; clamp the rounding error below 0.
        margin_std = (self.pending_margin_sq_sum / pairs - margin_mean**2).clamp(min=0).sqrt()
        loss_std = (self.pending_loss_sq_sum / pairs - loss_mean**2).clamp(min=0).sqrt()
        gamma = self.config.gamma
        for name, value in zip(_RUNNING, (target, margin_std, loss_mean, loss_std), strict=True):
            getattr(self, name).copy_(ema_update(getattr(self, name), value, gamma))
        self.num_updates += 1
        for name in (*_PENDING_SUMS, *_PENDING_COUNTS):
            getattr(self, name).zero_()

    @staticmethod
    def _check_inputs(
        logps: dict[str, torch.Tensor], selected: torch.Tensor | None
    ) -> tuple[int, torch.device]:
        """Returns (P, device) of the log-probs after checking their shapes and the injected mask's."""
        policy_chosen = logps["policy_chosen_logps"]
        if policy_chosen.dim() != 1 or policy_chosen.shape[0] == 0:
            raise ValueError(f"policy_chosen_logps must be (P,) with P >= 1, got shape {tuple(policy_chosen.shape)}")
        num_pairs = policy_chosen.shape[0]
        for name, tensor in logps.items():
            if tensor.shape != (num_pairs,):
                raise ValueError(f"{name} must have shape ({num_pairs},) like policy_chosen_logps, got "
                                 f"{tuple(tensor.shape)}")
        if selected is not None and (selected.dtype != torch.bool or selected.shape != (num_pairs,)):
            raise ValueError(f"selected must be a bool tensor of shape ({num_pairs},), got {selected.dtype} "
                             f"{tuple(selected.shape)}")
        return num_pairs, policy_chosen.device

    def _local_alpha_data(
        self, hardness: torch.Tensor | None, num_pairs: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_D (P,) float64 and the missing-hardness flags (P,) bool of this rank's pairs."""
        if not self.config.data_aware:
            return (torch.ones(num_pairs, dtype=torch.float64, device=device),
                    torch.zeros(num_pairs, dtype=torch.bool, device=device))
        hardness_mean = self.hardness_mean
        if hardness_mean is None:
            raise DamaError(
                "data_aware=True needs the dataset's mean hardness delta_bar: pass hardness_mean= to DamaLoss or call "
                "set_hardness_mean() with the value from the dataset's metadata, set config.hardness_mean, or turn "
                "data_aware off."
            )
        if hardness is None:
            raise DamaError(
                "data_aware=True needs a per-pair hardness tensor (P,): score the dataset offline (dama.hardness) or "
                "turn data_aware off. Use NaN for single pairs without a hardness."
            )
        if hardness.shape != (num_pairs,):
            raise ValueError(f"hardness must have shape ({num_pairs},) like the log-probs, got {tuple(hardness.shape)}")
        hardness = hardness.to(device)
        alpha, _ = alpha_data(hardness, hardness_mean)
        return alpha, torch.isnan(hardness)

    def _select(
        self, margins: torch.Tensor, injected: torch.Tensor, running_margin: torch.Tensor
    ) -> tuple[torch.Tensor, bool]:
        """The global mask (N,) bool and whether the filter fell back to selecting every pair."""
        if bool((injected >= 0).any()):
            if bool((injected < 0).any()):
                raise ValueError("selected was passed on some ranks but not on others: pass it on every rank or none")
            mask = injected > 0
            if not bool(mask.any()):
                raise ValueError("selected keeps no pair of the global batch; keep at least one")
            return mask, False
        if not (self.config.model_aware and self.config.outlier_filter):
            return torch.ones_like(margins, dtype=torch.bool), False
        # The draw runs on the CPU: one generator type on every rank and device, so the same seed gives the same mask.
        weights = filter_weights(margins.cpu(), running_margin.cpu(), self.config.filter_width)  # (N,)
        generator = torch.Generator().manual_seed(draw_seed(self.config.filter_seed, int(self.num_steps)))
        mask, fallback = select_pairs(weights, self.config.keep_ratio, generator)
        return mask.to(margins.device), fallback

    @torch.no_grad()
    def _record_step(
        self, margins: torch.Tensor, mask: torch.Tensor, fallback: bool, num_clamped: torch.Tensor,
        num_missing: torch.Tensor,
    ) -> None:
        # Warn once, on one rank; the count goes on in the state and the metrics.
        if int(num_missing) > 0 and int(self.missing_hardness) == 0 and get_rank() == 0:
            logger.warning("%d pair(s) of this batch have no hardness: they get alpha_D = 1 (counted in "
                           "dama/missing_hardness)", int(num_missing))
        self.num_steps += 1
        self.filter_fallbacks += int(fallback)
        self.beta_clamped += num_clamped.to(self.beta_clamped.device)
        self.missing_hardness += num_missing.to(self.missing_hardness.device)
        # The logged loss statistics track the plain DPO loss with the base beta, -log sigmoid(beta * A).
        base_losses = F.softplus(-self.config.beta * margins)  # (N,)
        target_sum, target_count = ema_target_terms(margins, mask, self.config.variant)
        sums = (target_sum, margins.sum(), (margins**2).sum(), base_losses.sum(), (base_losses**2).sum())
        for name, value in zip(_PENDING_SUMS, sums, strict=True):
            getattr(self, name).add_(value.to(self.running_margin.device))
        self.pending_target_count += target_count.to(self.pending_target_count.device)
        self.pending_pairs += margins.shape[0]
        if self.config.ema_update == "micro_batch":
            self.end_optimizer_step()

    def _metrics(
        self, rows: torch.Tensor, margins: torch.Tensor, mask: torch.Tensor, alpha_m: torch.Tensor,
        beta_c: torch.Tensor, num_clamped: torch.Tensor, num_missing: torch.Tensor, fallback: bool,
    ) -> dict[str, torch.Tensor]:
        """Metrics of the global batch (TRL names for the DPO ones); counts are this step's, R and co. the state used.

        Shapes: rows (N, 7); margins, mask, beta_c (N,). Returns 0-dim float64 tensors.
        """
        chosen_rewards = self.config.beta * rows[:, _COL["chosen_logratio"]]  # (N,)
        rejected_rewards = self.config.beta * rows[:, _COL["rejected_logratio"]]  # (N,)
        alpha_d = rows[:, _COL["alpha_data"]]  # (N,)
        values = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
            "logps/chosen": rows[:, _COL["policy_chosen"]].mean(),
            "logps/rejected": rows[:, _COL["policy_rejected"]].mean(),
            "dama/alpha_data_mean": alpha_d.mean(),
            "dama/alpha_data_min": alpha_d.min(),
            "dama/alpha_data_max": alpha_d.max(),
            "dama/alpha_model": alpha_m,
            "dama/beta_mean": beta_c.mean(),
            "dama/beta_min": beta_c.min(),
            "dama/beta_max": beta_c.max(),
            "dama/beta_clamped": num_clamped,
            "dama/selected": mask.sum(),
            "dama/filter_fallbacks": torch.tensor(float(fallback)),
            "dama/missing_hardness": num_missing,
        }
        values.update({f"dama/{name}": getattr(self, name) for name in _RUNNING})
        return {name: value.detach().to(device=margins.device, dtype=torch.float64).clone()
                for name, value in values.items()}

"""Every option of the DAMA method (docs/method.md section 7), as one dataclass the trainer's arguments inherit from.

The field names avoid those of transformers.TrainingArguments (hence `filter_seed`, not `seed`), so that
`class DamaTrainingArguments(TrainingArguments, DamaMethodConfig)` is a valid dataclass that HfArgumentParser
parses. TrainingArguments.__post_init__ shadows ours in that subclass: its own __post_init__ must call
`self.validate_method_options()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

from dama.errors import DamaError
from dama.options import check_choice
from dama_kernels.functional import IMPLS as LOSS_IMPLS

from .weighting import VARIANTS, Variant

EmaUpdate = Literal["micro_batch", "optimizer_step"]
EMA_UPDATES: tuple[str, ...] = get_args(EmaUpdate)
# The kernels' own tuple (dama_kernels does not import dama); a Literal of a tuple lists its members.
LossImpl = Literal[LOSS_IMPLS]


@dataclass
class DamaMethodConfig:
    # DPO core (paper Eq. 1-2) and the combination (paper Eq. 15-16)
    beta: float = field(
        default=0.1,
        metadata={"help": "Base DPO temperature beta; DAMA scales it per pair by alpha_D * alpha_M. Must be > 0."},
    )
    beta_min: float = field(
        default=1e-3,
        metadata={"help": "Floor of the combined per-pair beta: beta_C = max(beta * alpha_D * alpha_M, beta_min)."},
    )
    variant: Variant = field(
        default="release",
        metadata={
            "help": "Where the paper and the authors' release differ (alpha_M, EMA target): 'release' averages "
            "sigmoid(A) over the selected pairs and updates R with the mean over all pairs; 'paper' takes "
            "sigmoid of the selected mean and updates R with the selected mean."
        },
    )
    average_logps: bool = field(
        default=False,
        metadata={"help": "Use the mean of the response's token log-probs instead of their sum."},
    )
    loss_impl: LossImpl = field(
        default="auto",
        metadata={"help": "Loss implementation: 'auto' (Triton on CUDA, PyTorch otherwise), 'triton' or 'torch'."},
    )
    grad_filter_eps: float | None = field(
        default=None,
        metadata={"help": "Gradient filtering of the fused head's backward: tiles of d_logits whose entries "
                  "abs(onehot - softmax) are all below this are dropped, and on a GPU the gradient products skip them. "
                  "None: the dtype's default (2^-12 for bf16, 2^-15 for fp16, 0 for fp32); 0: off, the exact "
                  "gradient with dense products."},
    )

    # Data-aware strategy (paper Eq. 3-6): alpha_D = sigmoid(hardness) / sigmoid(hardness_mean)
    data_aware: bool = field(
        default=True,
        metadata={"help": "Scale beta per pair by the offline data hardness (alpha_D); off means alpha_D = 1."},
    )
    hardness_mean: float | None = field(
        default=None,
        metadata={"help": "Override of the dataset mean hardness; None takes it from the dataset's metadata."},
    )

    # Model-aware strategy (paper Eq. 8-14): alpha_M from a running mean R of the reward margin
    model_aware: bool = field(
        default=True,
        metadata={"help": "Scale beta by the online model response (alpha_M) and filter outliers; off: alpha_M = 1."},
    )
    outlier_filter: bool = field(
        default=True,
        metadata={"help": "Keep a draw of keep_ratio of the pairs, weighted by closeness of their margin to R. Part "
                  "of the model-aware strategy: with model_aware off every pair is kept, whatever this says."},
    )
    keep_ratio: float = field(
        default=0.8,
        metadata={"help": "Fraction of the global batch the outlier filter keeps: K = floor(keep_ratio * N). (0, 1]."},
    )
    filter_width: float = field(
        default=1.0,
        metadata={"help": "Width of the Gaussian filter weights exp(-((margin - R) / width)^2 / 2). Must be > 0."},
    )
    filter_seed: int = field(
        default=42,
        metadata={"help": "Seed of the outlier filter's draw; each step draws from (filter_seed, step)."},
    )
    gamma: float = field(
        default=0.9,
        metadata={"help": "EMA factor of the running margin: R <- gamma * R + (1 - gamma) * batch mean. [0, 1]."},
    )
    ema_update: EmaUpdate = field(
        default="micro_batch",
        metadata={
            "help": "When the running statistics move with gradient accumulation: after every micro-batch (the "
            "release) or once per optimizer step over all its micro-batches."
        },
    )

    def __post_init__(self) -> None:
        self.validate_method_options()

    def validate_method_options(self) -> None:
        """Raises DamaError naming the first invalid option and its allowed range."""
        check_choice("variant", self.variant, VARIANTS)
        check_choice("ema_update", self.ema_update, EMA_UPDATES)
        check_choice("loss_impl", self.loss_impl, LOSS_IMPLS)
        if self.grad_filter_eps is not None and not (
            isinstance(self.grad_filter_eps, int | float) and not isinstance(self.grad_filter_eps, bool)
            and 0 <= self.grad_filter_eps < math.inf
        ):
            raise DamaError(f"grad_filter_eps must be a number >= 0 (0: off) or None, got {self.grad_filter_eps!r}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise DamaError(f"beta must be a finite number > 0, got {self.beta}")
        # beta_min above beta would clamp even plain DPO (alpha = 1) away from beta.
        if not (0 <= self.beta_min <= self.beta):
            raise DamaError(f"beta_min must lie in [0, beta={self.beta}], got {self.beta_min}")
        if not (0 < self.keep_ratio <= 1):
            raise DamaError(f"keep_ratio must lie in (0, 1], got {self.keep_ratio}")
        if not (math.isfinite(self.filter_width) and self.filter_width > 0):
            raise DamaError(f"filter_width must be a finite number > 0, got {self.filter_width}")
        if not (0 <= self.gamma <= 1):
            raise DamaError(f"gamma must lie in [0, 1], got {self.gamma}")
        if isinstance(self.filter_seed, bool) or not isinstance(self.filter_seed, int) or self.filter_seed < 0:
            raise DamaError(f"filter_seed must be a non-negative int, got {self.filter_seed!r}")
        if self.hardness_mean is not None and not math.isfinite(self.hardness_mean):
            raise DamaError(f"hardness_mean must be a finite float or None (take it from the data), got "
                            f"{self.hardness_mean}")
        self._refuse_options_without_effect()

    def _refuse_options_without_effect(self) -> None:
        """A filter option set away from its default where the filter does not run is refused, not ignored."""
        defaults = {f.name: f.default for f in fields(DamaMethodConfig)}
        filter_options = [n for n in ("keep_ratio", "filter_width", "filter_seed") if getattr(self, n) != defaults[n]]
        if not self.model_aware and filter_options:
            raise DamaError(f"{', '.join(filter_options)} only act with model_aware=true (the outlier filter belongs "
                            "to the model-aware strategy); leave them at their defaults or turn model_aware on")
        if not self.outlier_filter and filter_options:
            raise DamaError(f"{', '.join(filter_options)} only act with outlier_filter=true; leave them at their "
                            "defaults or turn outlier_filter on")


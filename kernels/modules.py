"""Thin module wrapper of the fused sequence log-prob, for models that want it as a layer."""

from __future__ import annotations

import torch
from torch import nn

from .functional import sequence_logps


class LinearSequenceLogps(nn.Module):
    """Sums of label log-probs per packed sequence, straight from hidden states and an lm_head weight.

    Holds no parameters: the weight (and bias) are passed in, so the head stays owned by the model (and can be
    gathered under ZeRO-3 before the call). See dama_kernels.sequence_logps for shapes.
    """

    def __init__(self, ignore_index: int = -100, impl: str = "auto", chunk_size: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.impl = impl
        self.chunk_size = chunk_size

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        seq_ids: torch.Tensor,
        num_seqs: int,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return sequence_logps(
            hidden, weight, labels, seq_ids, num_seqs,
            bias=bias, ignore_index=self.ignore_index, impl=self.impl, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, impl={self.impl!r}, chunk_size={self.chunk_size}"

"""dama_kernels: fused sequence log-probs from hidden states (no (N, V) logits) and the weighted DAMA sigmoid loss."""

from .functional import DamaLossOutput, dama_sigmoid_loss, sequence_logps, sum_per_sequence, token_logps

__all__ = [
    "DamaLossOutput",
    "dama_sigmoid_loss",
    "sequence_logps",
    "sum_per_sequence",
    "token_logps",
]

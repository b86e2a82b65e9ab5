"""Public functions of dama_kernels: validate the inputs, pick an implementation, call the autograd Functions.

impl="auto" runs the Triton kernels on CUDA tensors and the chunked PyTorch path otherwise. impl="triton" on CPU
tensors is accepted only under TRITON_INTERPRET=1 (the Triton interpreter, used by the tests).

Dtypes follow what F.linear does in the same place: under torch.autocast the hidden states, weight and bias enter the
head in the autocast dtype (a custom autograd Function is not autocast-aware by itself, so an fp32 model trained with
--bf16 would otherwise reach the kernels in fp32); outside autocast, fp32 inputs multiply as
torch.get_float32_matmul_precision() allows (see linear_logprob_forward.dot_settings). Softmax arithmetic is fp32.

Value checks (label and sequence ids in range, finite temperatures, a positive normaliser) read tensor values: on a GPU
each is a host sync that stalls the launch queue, so they run on CPU tensors always and on CUDA tensors only with
DAMA_KERNELS_CHECK_VALUES=1 (a debugging switch; the shape, dtype and device checks always run).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from .dama_loss_function import DamaLossParams, DamaSigmoidLossFunction
from .grad_filter import resolve_filter_eps
from .launch_config import running_in_interpreter
from .linear_logprob_function import LinearLogprobFunction, LinearLogprobParams
from .linear_logprob_torch import compute_dtype_for

IMPLS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = (*TRITON_DTYPES, torch.float64)
# Rows per chunk of the torch path when none is given: one chunk of logits then holds about 4M floats (16 MiB fp32).
# Measured on 2 CPU cores at V 32000 (bench/loss_head.py): 16 MiB chunks run as fast as 32 MiB ones; 8 MiB ~20% slower.
CHUNK_ELEMENTS = 1 << 22
CHECK_VALUES_VARIABLE = "DAMA_KERNELS_CHECK_VALUES"


class DamaLossOutput(NamedTuple):
    """loss (); losses, margins, chosen_rewards, rejected_rewards (P,). Only loss and losses carry gradients."""

    loss: torch.Tensor
    losses: torch.Tensor
    margins: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and not running_in_interpreter():
        raise ValueError(
            "impl='triton' needs CUDA tensors. On the CPU use impl='torch' (or 'auto'), or set TRITON_INTERPRET=1 "
            "before triton is imported to run the kernels in the Triton interpreter."
        )
    return impl


def _check_dtype(name: str, tensor: torch.Tensor, impl: str) -> None:
    allowed = TRITON_DTYPES if impl == "triton" else TORCH_DTYPES
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name} has dtype {tensor.dtype}; impl={impl!r} takes {names}. Cast it first.")


def _check_device(reference: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {reference.device}; move them together.")


def checks_values(device: torch.device) -> bool:
    """Whether the value checks run for tensors on `device`: always on the CPU, on a GPU only when asked."""
    return device.type == "cpu" or os.environ.get(CHECK_VALUES_VARIABLE, "0") == "1"


def _check_ids(name: str, ids: torch.Tensor, length: int, upper: int, what: str, allowed: int | None = None) -> None:
    if ids.dim() != 1 or ids.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) to match hidden, got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if not checks_values(ids.device):
        return
    out_of_range = (ids < 0) | (ids >= upper)
    if allowed is not None:
        out_of_range &= ids != allowed
    if bool(out_of_range.any()):
        bad = ids[out_of_range][:5].tolist()
        raise ValueError(f"{name} has values outside [0, {upper}) {what}: first offenders {bad}")


def _cast_like_linear(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Under autocast for the tensors' device type, the inputs in the autocast dtype, as F.linear would take them.

    Autocast casts every floating tensor but float64 (which it leaves alone); the casts are differentiable, so the
    gradients reach the original tensors in their own dtypes.
    """
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float64:
            return tensor
        return tensor.to(dtype)

    return cast(hidden), cast(weight), cast(bias)


def _supervised_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    impl: str,
    chunk_size: int | None,
    grad_filter_eps: float | None,
    gather_supervised: bool,
    skip_filtered_tiles: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validates, then scores only the supervised rows (every row when gather_supervised is False).

    Returns (logps, rows): logps (M,) for the M supervised tokens and rows (M,) their positions in hidden, or
    rows = None when every row was scored (then logps is (N,)).
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (tokens, hidden_size), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be (vocab_size, {hidden.shape[1]}) to match hidden, got {tuple(weight.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_device(hidden, weight=weight, labels=labels, bias=bias)
    impl = _resolve_impl(impl, hidden.device)
    hidden, weight, bias = _cast_like_linear(hidden, weight, bias)
    for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if tensor is not None:
            _check_dtype(name, tensor, impl)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype; cast one of them.")
    vocab_size = weight.shape[0]
    _check_ids("labels", labels, hidden.shape[0], vocab_size, f"other than ignore_index={ignore_index}", ignore_index)
    if chunk_size is None:
        chunk_size = max(16, CHUNK_ELEMENTS // vocab_size)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")

    filter_eps = resolve_filter_eps(grad_filter_eps, hidden.dtype)

    labels = labels.contiguous()
    rows = None
    if gather_supervised:
        # One host sync on a GPU: nonzero must learn M before it can allocate.
        rows = (labels != ignore_index).nonzero().squeeze(1)  # (M,)
        if rows.shape[0] == labels.shape[0]:
            rows = None
        else:
            hidden, labels = hidden.index_select(0, rows), labels.index_select(0, rows)
    params = LinearLogprobParams(ignore_index=ignore_index, impl=impl, chunk_size=chunk_size, filter_eps=filter_eps,
                                 skip_filtered=bool(skip_filtered_tiles))
    if hidden.shape[0] == 0:
        # Empty views keep the graph, so a backward still reaches hidden, weight and bias, with zero gradients.
        anchor = sum(t[:0].sum() for t in (hidden, weight, bias) if t is not None)
        return hidden.new_zeros(0, dtype=compute_dtype_for(hidden.dtype)) + anchor, rows
    return LinearLogprobFunction.apply(hidden, weight, bias, labels, params), rows


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int | None = None,
    grad_filter_eps: float | None = None,
    gather_supervised: bool = True,
    skip_filtered_tiles: bool = True,
) -> torch.Tensor:
    """Log-probability of each token's label under the linear head, without building the (N, V) logits.

    Value: log_softmax(hidden @ weight.T + bias)[label], and 0 where label == ignore_index. Differentiable w.r.t.
    hidden, weight and bias. Only supervised rows are computed. Under torch.autocast the matmul takes its inputs in
    the autocast dtype, as F.linear does.

    Shapes:
        hidden (N, H) fp16/bf16/fp32 (fp64 too with impl="torch"); weight (V, H) same dtype; labels (N,) integer in
        [0, V) or ignore_index; bias (V,) or None -> (N,) fp32 (fp64 for fp64 inputs).
    chunk_size: rows per chunk of the torch path (working memory chunk_size x V); None picks about 4M logits.
    grad_filter_eps: the backward drops each tile of d_logits whose |onehot - softmax| entries are all below it
        (dama_kernels.grad_filter); None picks it from the dtype: 2^-12 for bf16, 2^-15 for fp16, 0 (exact) for
        fp32 and fp64. 0 turns filtering off.
    skip_filtered_tiles: with filtering on, the Triton backward's gradient products skip the filtered tiles (Triton
        kernels over the kept ones, the vocabulary in order of mean logit); False keeps cuBLAS's dense products,
        faster when few tiles are filtered. Either way the filtered entries are dropped; the word order changes
        which tiles are. The torch path's products are dense.
    gather_supervised: True scores only the rows whose label is not ignore_index, which costs a host sync on a GPU to
        find them; False scores every row (ignored ones give 0 and no gradient) without reading the labels, the
        cheaper call when the caller has gathered the supervised rows already.
    """
    logps, rows = _supervised_token_logps(hidden, weight, labels, bias, ignore_index, impl, chunk_size,
                                          grad_filter_eps, gather_supervised, skip_filtered_tiles)
    if rows is None:
        return logps
    return logps.new_zeros(hidden.shape[0]).index_copy(0, rows, logps)


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int | None = None,
    grad_filter_eps: float | None = None,
    gather_supervised: bool = True,
    skip_filtered_tiles: bool = True,
) -> torch.Tensor:
    """Sum of token log-probs per sequence, for tokens of several sequences packed in any order.

    Shapes:
        hidden (N, H); weight (V, H); labels (N,); seq_ids (N,) integer in [0, S); bias (V,) or None
        -> (S,) fp32 (fp64 for fp64 inputs). A sequence with no supervised token gets 0 and a zero gradient.
    Other arguments as in token_logps.
    """
    if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs < 0:
        raise ValueError(f"num_seqs must be a non-negative int, got {num_seqs!r}")
    logps, rows = _supervised_token_logps(hidden, weight, labels, bias, ignore_index, impl, chunk_size,
                                          grad_filter_eps, gather_supervised, skip_filtered_tiles)
    _check_device(hidden, seq_ids=seq_ids)
    _check_ids("seq_ids", seq_ids, hidden.shape[0], num_seqs, f"(num_seqs={num_seqs})")
    if rows is not None:
        seq_ids = seq_ids.index_select(0, rows)
    return sum_per_sequence(logps, seq_ids, num_seqs)


def sum_per_sequence(token_values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Sums (S,) of per-token values (M,) by sequence id, accumulated in float64 and returned in their dtype.

    A response has hundreds of tokens: an fp32 running sum of them drifts by ~1e-3 nats, float64 keeps ~1e-5.
    """
    sums = torch.zeros(num_seqs, dtype=torch.float64, device=token_values.device)
    return sums.index_add(0, seq_ids.long(), token_values.double()).to(token_values.dtype)


def _as_pair_tensor(name: str, value, num_pairs: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float or a (P,) / 0-dim tensor as a detached contiguous (P,) tensor of `dtype`."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{name} has non-finite values")
        return torch.full((num_pairs,), value, dtype=dtype, device=device)  # a fill, no host-to-device copy
    tensor = torch.as_tensor(value, device=device).detach()
    if tensor.dim() == 0:
        tensor = tensor.expand(num_pairs)
    if tensor.shape != (num_pairs,):
        raise ValueError(f"{name} must be a float or have shape ({num_pairs},), got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the log-probs are on {device}; move them together.")
    tensor = tensor.to(dtype).contiguous()
    if checks_values(device) and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} has non-finite values")
    return tensor


def dama_sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: torch.Tensor | float,
    *,
    mask: torch.Tensor | None = None,
    num_selected: torch.Tensor | float | None = None,
    base_beta: torch.Tensor | float | None = None,
    impl: str = "auto",
) -> DamaLossOutput:
    """DPO sigmoid loss with a temperature per pair, a selection mask and an explicit normaliser.

        z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
        losses = -log sigmoid(beta * z);  loss = sum(mask * losses) / num_selected
    num_selected defaults to max(sum(mask), 1); a data-parallel caller passes the global count. Rewards are
    base_beta * (policy - ref) (base_beta defaults to beta). The gradient reaches the policy log-probs only, never
    beta, mask or the reference log-probs; margins and rewards are detached.

    Shapes: the four log-probs (P,), any float dtype; beta and base_beta floats or (P,); mask (P,) bool or float.
    Returns DamaLossOutput(loss (), losses, margins, chosen_rewards, rejected_rewards (P,)), fp32 (fp64 for fp64
    inputs on the torch path).
    """
    logps = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    if policy_chosen_logps.dim() != 1 or policy_chosen_logps.shape[0] == 0:
        raise ValueError(f"policy_chosen_logps must be (P,) with P >= 1, got {tuple(policy_chosen_logps.shape)}")
    num_pairs, device = policy_chosen_logps.shape[0], policy_chosen_logps.device
    impl = _resolve_impl(impl, device)
    for name, tensor in logps.items():
        if tensor.shape != (num_pairs,):
            raise ValueError(
                f"{name} must have shape ({num_pairs},) like policy_chosen_logps, got {tuple(tensor.shape)}"
            )
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but policy_chosen_logps is on {device}")
        _check_dtype(name, tensor, "torch")
    wants_fp64 = impl == "torch" and any(t.dtype == torch.float64 for t in logps.values())
    dtype = torch.float64 if wants_fp64 else torch.float32

    beta = _as_pair_tensor("beta", beta, num_pairs, dtype, device)
    base_beta = beta if base_beta is None else _as_pair_tensor("base_beta", base_beta, num_pairs, dtype, device)
    mask = torch.ones(num_pairs, dtype=dtype, device=device) if mask is None else (
        _as_pair_tensor("mask", mask, num_pairs, dtype, device)
    )
    if num_selected is None:
        num_selected = mask.sum().clamp(min=1)
    elif isinstance(num_selected, int | float) and not isinstance(num_selected, bool):
        if not num_selected > 0:
            raise ValueError(f"num_selected must be a positive scalar, got {num_selected}")
        num_selected = torch.full((), num_selected, dtype=dtype, device=device)
    num_selected = torch.as_tensor(num_selected, device=device).detach().to(dtype)
    if num_selected.dim() != 0 or (checks_values(device) and not bool(num_selected > 0)):
        raise ValueError(f"num_selected must be a positive scalar, got {num_selected}")
    return DamaLossOutput(
        *DamaSigmoidLossFunction.apply(
            policy_chosen_logps.to(dtype).contiguous(),
            policy_rejected_logps.to(dtype).contiguous(),
            ref_chosen_logps.detach().to(dtype).contiguous(),
            ref_rejected_logps.detach().to(dtype).contiguous(),
            beta,
            base_beta,
            mask,
            num_selected,
            DamaLossParams(impl=impl),
        )
    )

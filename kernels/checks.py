"""Correctness checks of the kernels, shared by the test suite and `dama selftest`.

Each check runs one public op of dama_kernels on fresh random inputs of a case, with outputs poisoned before the call
(an element the op forgets to write comes out NaN), and compares its values and gradients with the float64 reference
(dama_kernels.reference) by a three-way criterion:

    max |ours - gold| <= 2 max |baseline - gold| + tolerance * max |gold|

where gold is the reference in float64 and baseline the same reference in fp32, its gradients rounded to the input
dtype like ours (what a careful same-precision implementation gets). Outputs computed and returned in fp32 are also
held to FP32_DIRECT against gold, except on ill-conditioned cases (near-tied logits in the hundreds, where the fp32
rounding of the logits alone moves the softmax). TOLERANCES is the only tolerance table.

A check returns Comparisons; `require` turns failed ones into an AssertionError (tests), `dama selftest` tabulates them.
Shape letters: N tokens, H hidden size, V vocabulary, S sequences, P pairs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from .functional import dama_sigmoid_loss, sequence_logps, token_logps
from .launch_config import float32_matmul_precision
from .reference import reference_dama_sigmoid_loss, reference_sequence_logps, reference_token_logps


@dataclass(frozen=True)
class Tolerance:
    """Error allowed on top of the baseline's, relative to max |gold| (gradients are often far below 1, so the
    scale is not clamped at 1: a 16-bit tolerance against 1 would let a gradient of the wrong size through).

    value: outputs, which the kernels compute in fp32 whatever the input dtype (log-probs, losses, margins);
    grad: gradients, returned in the input dtype (16-bit ones also go through 16-bit d_logits on a GPU).
    """

    value: float
    grad: float


TOLERANCES = {
    torch.float64: Tolerance(value=1e-10, grad=1e-10),
    torch.float32: Tolerance(value=2e-6, grad=2e-6),
    torch.float16: Tolerance(value=2e-6, grad=2e-3),
    torch.bfloat16: Tolerance(value=2e-6, grad=1.6e-2),
}
# Direct bound on fp32 outputs against float64, relative to max |gold|.
FP32_DIRECT = 2e-5


@dataclass(frozen=True)
class Comparison:
    """One compared quantity: its largest error against gold and what was allowed (an exact check has 0 / inf)."""

    what: str
    error: float
    allowed: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error <= self.allowed

    def __str__(self) -> str:
        if self.detail:
            return f"{self.what}: {self.detail}"
        return f"{self.what}: max error {self.error:.3e}, allowed {self.allowed:.3e}"


def expect(what: str, condition: bool, detail: str) -> Comparison:
    """An exact check (dtype, zeros where nothing is supervised); `detail` says what was expected."""
    return Comparison(what, 0.0 if condition else math.inf, 0.0, "" if condition else detail)


def compare_to_gold(actual: torch.Tensor, gold: torch.Tensor, baseline: torch.Tensor, tolerance: float, what: str,
                    direct: bool = True) -> Comparison:
    """The three-way criterion of the module docstring; `direct` adds the fp32 bound on fp32 outputs."""
    if actual.shape != gold.shape:
        return Comparison(what, math.inf, 0.0, f"shape {tuple(actual.shape)} != {tuple(gold.shape)}")
    if not bool(torch.isfinite(actual).all()):
        return Comparison(what, math.inf, 0.0, "non-finite values (an element left unwritten?)")
    # An all-zero gold (nothing supervised) is held to the tolerance itself.
    scale = (gold.abs().max().item() if gold.numel() else 0.0) or 1.0
    error = (actual.double() - gold).abs().max().item() if gold.numel() else 0.0
    baseline_error = (baseline.double() - gold).abs().max().item() if gold.numel() else 0.0
    allowed = 2 * baseline_error + tolerance * scale
    if direct and actual.dtype == torch.float32:
        allowed = min(allowed, FP32_DIRECT * scale)
    return Comparison(what, error, allowed)


def require(comparisons: list[Comparison]) -> None:
    """Raise AssertionError naming every failed comparison."""
    failed = [str(c) for c in comparisons if not c.ok]
    assert not failed, "; ".join(failed)


@contextlib.contextmanager
def poisoned_allocations():
    """Within the block, torch.empty / torch.empty_like return NaN-filled float tensors (-1 for integers).

    Outputs the code under test allocates this way and then forgets to write show up as NaN.
    """
    original_empty, original_empty_like = torch.empty, torch.empty_like

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.fill_(float("nan") if tensor.dtype.is_floating_point else -1)

    def empty(*args, **kwargs):
        return poison(original_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(original_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = original_empty, original_empty_like


@dataclass(frozen=True)
class LogprobCase:
    """Inputs of token_logps / sequence_logps: N x H hidden states, a V x H head with logits of spread
    `logit_scale`, a fraction of the labels set to ignore_index. favoured_words > 0 concentrates the softmax and
    every label on the first favoured_words words (a bias of FAVOURED_BIAS on them), as a trained head's softmax is
    concentrated: most tiles of the backward's d_logits are then filtered in 16-bit."""

    name: str
    num_tokens: int
    hidden_size: int
    vocab_size: int
    logit_scale: float = 1.0
    ignored_fraction: float = 0.25
    ignore_index: int = -100
    with_bias: bool = True
    favoured_words: int = 0

    @property
    def well_conditioned(self) -> bool:
        return self.logit_scale < 100

    @property
    def multiply_adds(self) -> int:
        return self.num_tokens * self.hidden_size * self.vocab_size

    def __str__(self) -> str:
        return f"{self.name} ({self.num_tokens}x{self.hidden_size}x{self.vocab_size})"


# Interpreter blocks are 64 rows x 128 vocabulary columns x 64 hidden, GPU blocks up to 128 x 128 x 64: the sizes sit
# below, above and between multiples of both.
LOGPROB_CASES = (
    LogprobCase("single_token", 1, 16, 33),
    LogprobCase("odd_sizes", 47, 123, 507),
    LogprobCase("narrow_hidden", 123, 47, 130),
    LogprobCase("block_tails", 150, 70, 300),
    LogprobCase("ignored_tokens", 70, 40, 150, ignored_fraction=0.5, ignore_index=3, with_bias=False),
    LogprobCase("peaked", 90, 32, 300, logit_scale=30.0),
    LogprobCase("large_logits", 90, 32, 300, logit_scale=300.0),
    LogprobCase("concentrated", 150, 40, 1000, favoured_words=100),
    LogprobCase("llava_7b_head", 37, 4096, 32064),
)
# Extra logit of the favoured words: the others' probabilities fall to about 1e-8, below the bf16 and fp16 thresholds.
FAVOURED_BIAS = 12.0


@dataclass(frozen=True)
class LogprobInputs:
    hidden: torch.Tensor  # (N, H)
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)
    labels: torch.Tensor  # (N,)


def make_logprob_inputs(case: LogprobCase, dtype: torch.dtype, device: torch.device | str) -> LogprobInputs:
    hidden = torch.randn(case.num_tokens, case.hidden_size, device=device)
    weight = torch.randn(case.vocab_size, case.hidden_size, device=device) * (case.logit_scale / case.hidden_size**0.5)
    bias = torch.randn(case.vocab_size, device=device) if case.with_bias or case.favoured_words else None
    labels = torch.randint(0, case.favoured_words or case.vocab_size, (case.num_tokens,), device=device)
    if case.favoured_words:
        bias[: case.favoured_words] += FAVOURED_BIAS
    labels[torch.rand(case.num_tokens, device=device) < case.ignored_fraction] = case.ignore_index
    return LogprobInputs(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), labels)


def packed_seq_ids(num_tokens: int, device: torch.device | str) -> tuple[torch.Tensor, int]:
    """(seq_ids (N,), S): a one-token sequence and up to three longer ones, tokens shuffled across sequences."""
    num_seqs = min(4, num_tokens)
    if num_seqs == 1:
        return torch.zeros(num_tokens, dtype=torch.long, device=device), 1
    seq_ids = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(num_tokens - 1) % (num_seqs - 1) + 1])
    return seq_ids[torch.randperm(num_tokens)].to(device), num_seqs


def _leaves(inputs: LogprobInputs, round_to_tf32: bool = False) -> list[torch.Tensor | None]:
    tensors = (inputs.hidden, inputs.weight, inputs.bias)
    if round_to_tf32:
        tensors = (tensors[0].detach().clone(), tensors[1].detach().clone(), tensors[2])
        tensors = (_tf32(tensors[0]), _tf32(tensors[1]), tensors[2])
    return [None if t is None else t.detach().requires_grad_(True) for t in tensors]


def _tf32(tensor: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to TF32's 10 explicit mantissa bits (nearest, ties to even): the operands tensor cores
    multiply in TF32 mode. The fp32 baseline is computed from them, since a matmul library may or may not pick a TF32
    kernel for a given shape."""
    bits = tensor.contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def _compare_logprob_op(name, case, dtype, inputs, ours_fn, reference_fn, num_outputs, device,
                        fp32_precision) -> tuple[list[Comparison], torch.Tensor]:
    """Values and gradients of `ours_fn(hidden, weight, bias)` against `reference_fn(..., compute_dtype)`; also
    returns ours. Ours and the fp32 baseline run under `fp32_precision` (TF32 for both with "high" on a GPU)."""
    grad_out = torch.randn(num_outputs, device=device)  # grad_output != 1
    tolerance = TOLERANCES[dtype]
    leaves = _leaves(inputs)
    with float32_matmul_precision(fp32_precision), poisoned_allocations():
        out = ours_fn(*leaves)
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)
    results = {}
    for compute_dtype in (torch.float64, torch.float32):
        tf32_baseline = compute_dtype == torch.float32 and dtype == torch.float32 and fp32_precision != "highest"
        ref_leaves = _leaves(inputs, round_to_tf32=tf32_baseline)
        with float32_matmul_precision(fp32_precision):
            ref_out = reference_fn(*ref_leaves, compute_dtype)
            ref_grads = torch.autograd.grad(ref_out, [t for t in ref_leaves if t is not None],
                                            grad_out.to(compute_dtype))
        if compute_dtype == torch.float32:
            ref_grads = [g.to(dtype) for g in ref_grads]
        results[compute_dtype] = (ref_out, ref_grads)
    (gold, gold_grads), (base, base_grads) = results[torch.float64], results[torch.float32]
    # TF32 products round the inputs to 10 bits: only the baseline term (on TF32-rounded inputs) can bound them.
    direct = case.well_conditioned and fp32_precision == "highest"
    comparisons = [
        expect(f"{name} dtype", out.dtype == torch.float32, f"returned {out.dtype}, expected float32"),
        compare_to_gold(out, gold, base, tolerance.value, name, direct),
    ]
    grad_names = [g for g, t in zip(("d_hidden", "d_weight", "d_bias"), leaves, strict=True) if t is not None]
    for grad_name, grad, gold_grad, base_grad in zip(grad_names, grads, gold_grads, base_grads, strict=True):
        what = f"{name} {grad_name}"
        comparisons.append(expect(f"{what} dtype", grad.dtype == dtype, f"returned {grad.dtype}, expected {dtype}"))
        comparisons.append(compare_to_gold(grad, gold_grad, base_grad, tolerance.grad, what, direct))
    return comparisons, out.detach()


def check_token_logps(case: LogprobCase, dtype: torch.dtype, impl: str, device: torch.device | str,
                      chunk_size: int | None = None, fp32_precision: str = "highest") -> list[Comparison]:
    """token_logps: values, d_hidden, d_weight, d_bias, and exact zeros on ignored rows.

    fp32_precision: torch.set_float32_matmul_precision while ours and the fp32 baseline run ("high": TF32).
    """
    inputs = make_logprob_inputs(case, dtype, device)
    labels, ignore_index = inputs.labels, case.ignore_index

    def ours(hidden, weight, bias):
        return token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index, impl=impl,
                           chunk_size=chunk_size)

    def reference(hidden, weight, bias, compute_dtype):
        return reference_token_logps(hidden, weight, labels, bias, ignore_index, compute_dtype)

    comparisons, out = _compare_logprob_op("token_logps", case, dtype, inputs, ours, reference, case.num_tokens,
                                           device, fp32_precision)
    ignored = labels == ignore_index
    comparisons.append(expect("token_logps ignored rows", bool((out[ignored] == 0).all()), "not exactly 0"))
    return comparisons


def check_sequence_logps(case: LogprobCase, dtype: torch.dtype, impl: str, device: torch.device | str,
                         fp32_precision: str = "highest") -> list[Comparison]:
    """sequence_logps over packed, shuffled sequences (one of a single token): values and gradients.

    fp32_precision: as in check_token_logps.
    """
    inputs = make_logprob_inputs(case, dtype, device)
    seq_ids, num_seqs = packed_seq_ids(case.num_tokens, device)
    labels, ignore_index = inputs.labels, case.ignore_index

    def ours(hidden, weight, bias):
        return sequence_logps(hidden, weight, labels, seq_ids, num_seqs, bias=bias, ignore_index=ignore_index,
                              impl=impl)

    def reference(hidden, weight, bias, compute_dtype):
        return reference_sequence_logps(hidden, weight, labels, seq_ids, num_seqs, bias, ignore_index, compute_dtype)

    return _compare_logprob_op("sequence_logps", case, dtype, inputs, ours, reference, num_seqs, device,
                               fp32_precision)[0]


@dataclass(frozen=True)
class LossCase:
    """Inputs of dama_sigmoid_loss: P pairs of sequence log-probs of real size (tens to hundreds of nats).

    beta: a float, or None for a random temperature per pair; mask: "bool", "float" or None; num_selected: the
    data-parallel global count, or None for the local one; grad_loss scales the loss's gradient, grad_losses adds a
    random gradient on the per-pair losses.
    """

    name: str
    num_pairs: int
    beta: float | None = None
    mask: str | None = "bool"
    num_selected: float | None = None
    base_beta: float | None = 0.1
    grad_loss: float = 1.7
    grad_losses: bool = True

    def __str__(self) -> str:
        return f"{self.name} (P={self.num_pairs})"


LOSS_CASES = (
    LossCase("one_pair", 1),
    LossCase("odd_pairs", 37),
    LossCase("many_pairs", 2500),  # more than two kernel blocks of 1024
    LossCase("scalar_beta", 29, beta=0.1, mask=None, base_beta=None, grad_loss=1.0, grad_losses=False),
    LossCase("global_normaliser", 16, beta=0.25, mask="float", num_selected=40.0, base_beta=None, grad_loss=-0.5,
             grad_losses=False),
)
LOSS_OUTPUTS = ("loss", "losses", "margins", "chosen_rewards", "rejected_rewards")


def check_dama_sigmoid_loss(case: LossCase, dtype: torch.dtype, impl: str,
                            device: torch.device | str) -> list[Comparison]:
    """dama_sigmoid_loss: its five outputs and the gradients w.r.t. both policy log-probs."""
    num_pairs = case.num_pairs
    logps = [(torch.randn(num_pairs, device=device) * 20 - 100).to(dtype) for _ in range(4)]
    beta = torch.rand(num_pairs, device=device) * 0.3 + 1e-3 if case.beta is None else case.beta
    kwargs = {"base_beta": case.base_beta, "num_selected": case.num_selected}
    if case.mask is not None:
        mask = torch.rand(num_pairs, device=device) < 0.7
        kwargs["mask"] = mask if case.mask == "bool" else mask.float()
    grad_loss = torch.tensor(case.grad_loss, device=device)
    grad_losses = torch.randn(num_pairs, device=device) if case.grad_losses else torch.zeros(num_pairs, device=device)

    results = {}
    for name in ("ours", "gold", "base"):
        policy = [t.detach().clone().requires_grad_(True) for t in logps[:2]]
        if name == "ours":
            with poisoned_allocations():
                out = list(dama_sigmoid_loss(*policy, *logps[2:], beta, impl=impl, **kwargs))
                objective = out[0] * grad_loss + (out[1] * grad_losses).sum()
                grads = torch.autograd.grad(objective, policy)
        else:
            compute_dtype = torch.float64 if name == "gold" else torch.float32
            out = list(reference_dama_sigmoid_loss(*policy, *logps[2:], beta, compute_dtype=compute_dtype, **kwargs))
            objective = out[0] * grad_loss + (out[1] * grad_losses.to(compute_dtype)).sum()
            grads = [g if name == "gold" else g.to(dtype) for g in torch.autograd.grad(objective, policy)]
        results[name] = (out, grads)

    (ours, ours_grads), (gold, gold_grads), (base, base_grads) = (results[k] for k in ("ours", "gold", "base"))
    tolerance = TOLERANCES[dtype]
    comparisons = []
    for name, value, gold_value, base_value in zip(LOSS_OUTPUTS, ours, gold, base, strict=True):
        comparisons.append(compare_to_gold(value, gold_value, base_value, tolerance.value, name))
    for name, grad, gold_grad, base_grad in zip(("d_policy_chosen", "d_policy_rejected"), ours_grads, gold_grads,
                                                base_grads, strict=True):
        comparisons.append(expect(f"{name} dtype", grad.dtype == dtype, f"returned {grad.dtype}, expected {dtype}"))
        comparisons.append(compare_to_gold(grad, gold_grad, base_grad, tolerance.grad, name))
    return comparisons

"""Loss-head benchmark: hidden states -> DPO sigmoid loss, forward + backward, the providers side by side.

Providers
  naive  full logits -> log_softmax -> gather -> per-sequence sums -> DPO sigmoid loss, as LLaVA DPO trainers do it,
         over every position of the padded (2P, T) batch.
  liger  liger-kernel's chunked fused-linear DPO (LigerFusedLinearDPOFunction, the Function behind
         LigerFusedLinearDPOLoss) with its defaults: one pair per chunk, summed log-probs, eager (compiled=False).
         Chosen and rejected are stacked as (2P, T, H) with labels -100 where unsupervised. The reference log-probs
         are an input, as for the other providers, instead of liger's no-grad head pass over reference hidden states
         (a fourth matmul the others would not pay).
  dama   dama_kernels.sequence_logps over the packed (N, H) tokens (it scores only the supervised rows), then
         dama_kernels.dama_sigmoid_loss; impl="auto": chunked torch on the CPU, Triton on CUDA. Gradient filtering at
         the dtype's default threshold: in 16-bit the backward's two gradient products are then Triton kernels over
         the d_logits tiles kept.
  dama_exact  dama with grad_filter_eps=0: no filtering, cuBLAS gradient products. Run for 16-bit inputs only (in
         fp32 it is dama), so that one run shows what filtering and the kept-tile products gain or cost.

Regimes (P = 4 pairs, S = 8 sequences, V = 32000)
  a  every token supervised: sequences of T = 1024 tokens, N = 8192.
  b  LLaVA-like: 576 image + 60 prompt tokens unsupervised, then 150 response tokens supervised; N = 6288, 1200
     supervised.

Each case (provider, regime, H) runs in a fresh process of this module (--worker), so that its peak RSS is its own:
one warm-up forward + backward, then --repeats timed ones, of which the median is reported. Working memory is the peak
of tensor bytes allocated during forward + backward, not counting the inputs and the gradients returned
(bench/memory.py); on the CPU it is read during the warm-up (under the profiler), on CUDA over the timed steps.
Useful TFLOP/s counts 6 x supervised tokens x H x V per step, whatever a provider computes beyond that; on a GPU,
% peak compares it with a large matmul in the same dtype timed in the same run.

Inputs (--logits), the same for every provider given the seed; no bias, as LLaVA's head has none
  flat    the default, so that figures stay comparable with earlier runs: random hidden states and a weight scaled so
          that logits have unit spread, uniform labels. The softmax is nearly uniform over the 32000 words: mean
          entropy 9.87 nats, mean label log-prob -10.8 to -11.0.
  peaked  like a trained head's: logit[n, v] = log_prior[v] + a per-row Gaussian part of spread 5, where the Zipf
          word-frequency prior log_prior[v] = -1.1 log rank(v) (ranks a seeded permutation of the word ids) enters
          through one hidden coordinate, hidden[..., 0] = 1 and weight[:, 0] = log_prior, and the other H - 1
          coordinates give the per-row part. Each label is drawn from its row's softmax (on the run's device), and the
          reference log-probs are the policy's own sequence log-probs plus noise of spread sqrt(T), so the DPO
          margins stay moderate. Measured in float64 on 256 supervised rows (seed 0) at H 256, 1024 and 4096 in both
          regimes: mean entropy 2.36-2.60 nats, mean label log-prob -2.26 to -2.64. At H 256 a row's most likely
          word holds 46% of its mass on average, and the 100 most frequent words 18% (and 17% of the labels).
The run prints the mean entropy and label log-prob of each regime and shape's inputs, and the record of its first
provider holds them (entropy_nats, label_logp).
Drawing the peaked labels multiplies before the RSS is read, so a peaked run's RSS+ leaves out the first matmul's
one-off costs (BLAS buffers, threads) that a flat run counts: dama's RSS+ up to about 90 MiB less at H 256 on the
CPU. Compare RSS+ within one kind of inputs; the working memory (tensor bytes) is the same for both.

Gradient filtering: dama's backward filters d_logits tiles at the default threshold of the dtype
(dama_kernels.grad_filter: 2^-12 in bf16, none in fp32); "filtered" is the share of tiles it filtered in the untimed
step. Neither kind of input lets it filter whole tiles: a row's softmax has about 170 (flat) or 105 (peaked) words at
or above 2^-12, spread over the vocabulary, so a 128 x 256 tile holds about 170 or 105 such entries. Counted in fp32
on 512 rows (H 256 and 4096, seeds 0 and 1), 0 of 500 tiles of 128 x 256 and 0 of 2000 of 64 x 128 fell below 2^-12
with either. The shares a bf16 run on the CPU reports (regime b, H 256: 4.0% flat, 10.3% peaked) are the torch path's
short tiles: 3-row tiles at the end of each 131-row chunk.

Output: a table (ratios are a row over naive's and liger's; RSS+ is peak RSS over the RSS with the inputs built),
dama's working memory at N and 2N tokens (regime a, H 256; it should not grow), the targets met or missed, and the
records as JSON in --output.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from dama_kernels import dama_sigmoid_loss, sequence_logps
from dama_kernels.functional import CHUNK_ELEMENTS
from dama_kernels.grad_filter import count_filtered_tiles, default_filter_eps

from .dtypes import DTYPES
from .environment import REPO_ROOT, git_state
from .memory import PeakReading, current_rss_bytes, peak_rss_bytes, track_peak

PROVIDERS = ("naive", "liger", "dama", "dama_exact")
REGIMES = {"a": {"prefix_len": 0, "response_len": 1024}, "b": {"prefix_len": 576 + 60, "response_len": 150}}
SHAPE_SETS = {"quick": (256,), "cpu": (256, 1024), "all": (256, 1024, 4096)}
VOCAB_SIZE = 32000
NUM_PAIRS = 4
BETA = 0.1
IGNORE_INDEX = -100
# liger's default: each chunk holds one chosen and one rejected sequence at full length.
LIGER_CHUNK_PAIRS = 1
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "loss_head.json"
MIB = 1 << 20
LOGITS = {
    "flat": "random hidden states and weight, logits of unit spread: the softmax is nearly uniform over the words "
            "(today's figures)",
    "peaked": "like a trained head's: a Zipf word-frequency prior plus a per-row part, each label drawn from its row's "
              "softmax (mean entropy about 2.5 nats)",
}
# Peaked logits: logit[n, v] = log_prior[v] + (a per-row Gaussian part of spread PEAKED_ROW_SPREAD), where the prior of
# the word of frequency rank r is r^-ZIPF_EXPONENT. Ranks are a seeded permutation of the word ids: a tokenizer's ids
# do not follow frequency, so frequent words are spread over the vocabulary tiles rather than packed into the first.
ZIPF_EXPONENT = 1.1
# Chosen for a mean entropy of about 2.5 nats per token (spreads 4.5 and 6 give 2.8 and 1.9).
PEAKED_ROW_SPREAD = 5.0
# hidden[..., 0] holds this constant and weight[:, 0] the log-prior over it, so the prior enters through the matmul.
PRIOR_COORDINATE = 1.0
# Rows of logits formed at once when drawing the labels. Their two (C, V) fp32 buffers are one 62.5 MiB block at
# V 32000: above glibc's largest mmap threshold (32 MiB), so it goes back to the system when freed instead of staying
# in the heap, where a provider's step would reuse it and read a smaller RSS+; and below the RSS that a step adds.
LABEL_DRAW_ROWS = 256
# The softmax summary of each case: supervised rows sampled, and words per float64 block of the weight.
SUMMARY_ROWS = 256
SUMMARY_WORDS_PER_BLOCK = 4096


@dataclass(frozen=True)
class Case:
    """One measurement. Every sequence is prefix_len unsupervised tokens followed by response_len supervised ones."""

    provider: str
    regime: str
    hidden_size: int
    dtype: str = "fp32"
    vocab_size: int = VOCAB_SIZE
    num_pairs: int = NUM_PAIRS
    prefix_len: int = 0
    response_len: int = 1024
    purpose: str = "comparison"
    logits: str = "flat"
    # Whether this case's record carries the softmax summary of its inputs, which every provider shares: the first case
    # of each regime and shape does.
    summarise: bool = False

    @property
    def num_seqs(self) -> int:
        return 2 * self.num_pairs

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.response_len

    @property
    def tokens(self) -> int:
        return self.num_seqs * self.seq_len

    @property
    def supervised_tokens(self) -> int:
        return self.num_seqs * self.response_len


def regime_case(provider: str, regime: str, hidden_size: int, dtype: str, length_scale: int = 1,
                logits: str = "flat") -> Case:
    """The case of a regime; length_scale multiplies the supervised length (the N -> 2N memory check)."""
    layout = REGIMES[regime]
    return Case(
        provider=provider, regime=regime, hidden_size=hidden_size, dtype=dtype, prefix_len=layout["prefix_len"],
        response_len=layout["response_len"] * length_scale,
        purpose="comparison" if length_scale == 1 else "n_scaling", logits=logits,
    )


@dataclass
class LossInputs:
    """hidden (S, T, H) and weight (V, H) require grad; labels (S, T), -100 where unsupervised; seq_ids (S*T,) the
    sequence of each packed token; ref_chosen_logps, ref_rejected_logps (P,) fixed. Chosen sequences come first."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    seq_ids: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor


def _flat_inputs(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """hidden (S, T, H), weight (V, H), labels (S, T), ref_logps (S,): fp32 on the CPU, logits of unit spread."""
    num_seqs, seq_len, hidden_size, vocab_size = case.num_seqs, case.seq_len, case.hidden_size, case.vocab_size
    hidden = torch.randn(num_seqs, seq_len, hidden_size, generator=gen)
    # Scaled so that logits have unit spread; the softmax is then far from one-hot.
    weight = torch.randn(vocab_size, hidden_size, generator=gen) / math.sqrt(hidden_size)
    labels = torch.randint(0, vocab_size, (num_seqs, seq_len), generator=gen)
    labels[:, : case.prefix_len] = IGNORE_INDEX
    # Near what a head of unit-spread logits gives (about -log V per token), with the spread of a sum of such terms.
    ref_logps = -case.response_len * (math.log(vocab_size) + 0.5) + math.sqrt(case.response_len) * torch.randn(
        num_seqs, generator=gen
    )
    return hidden, weight, labels, ref_logps


def _draw_labels(hidden: torch.Tensor, weight: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each row's label drawn from its own softmax by inverting the CDF at the row's uniform.

    hidden (N, H) and weight (V, H) fp32, uniforms (N,) fp32 in [0, 1), on one device -> labels (N,) int64 and their
    log-probs (N,) float64.
    """
    num_rows, vocab_size = hidden.shape[0], weight.shape[0]
    labels = torch.empty(num_rows, dtype=torch.int64, device=hidden.device)
    label_logps = torch.empty(num_rows, dtype=torch.float64, device=hidden.device)
    # Written in place: fresh blocks per chunk would be kept by the C allocator and swell the RSS.
    logits, cdf = torch.empty(2, min(LABEL_DRAW_ROWS, num_rows), vocab_size, device=hidden.device)  # (C, V) each
    for start in range(0, num_rows, LABEL_DRAW_ROWS):
        rows = slice(start, min(start + LABEL_DRAW_ROWS, num_rows))
        count = rows.stop - rows.start
        torch.matmul(hidden[rows], weight.T, out=logits[:count])
        row_max = logits[:count].amax(-1, keepdim=True)  # (C, 1)
        torch.sub(logits[:count], row_max, out=cdf[:count]).exp_().cumsum_(-1)
        total = cdf[:count, -1:]  # (C, 1) the softmax's normaliser over exp(row_max)
        drawn = torch.searchsorted(cdf[:count], uniforms[rows, None] * total).clamp_(max=vocab_size - 1)  # (C, 1)
        labels[rows] = drawn.squeeze(1)
        label_logps[rows] = (logits[:count].gather(1, drawn) - row_max - total.log()).squeeze(1).double()
    return labels, label_logps


def _peaked_inputs(case: Case, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """hidden (S, T, H), weight (V, H) fp32 on `device`, labels (S, T), ref_logps (S,) on the CPU: logits
    log_prior[v] + a per-row part of spread PEAKED_ROW_SPREAD, labels drawn from the rows' softmax (on `device`)."""
    num_seqs, seq_len, hidden_size, vocab_size = case.num_seqs, case.seq_len, case.hidden_size, case.vocab_size
    if hidden_size < 2:
        raise ValueError(f"peaked logits need hidden_size >= 2 (one coordinate carries the prior), got {hidden_size}")
    ranks = torch.randperm(vocab_size, generator=gen) + 1  # (V,) frequency rank of each word
    log_prior = -ZIPF_EXPONENT * ranks.double().log()  # (V,)
    hidden = torch.randn(num_seqs, seq_len, hidden_size, generator=gen)
    hidden[..., 0] = PRIOR_COORDINATE
    # The other H - 1 coordinates give each row's own part: Gaussian over the words, of spread PEAKED_ROW_SPREAD.
    weight = torch.randn(vocab_size, hidden_size, generator=gen) * (PEAKED_ROW_SPREAD / math.sqrt(hidden_size - 1))
    weight[:, 0] = log_prior / PRIOR_COORDINATE
    uniforms = torch.rand(num_seqs * case.response_len, generator=gen)
    noise = torch.randn(num_seqs, generator=gen, dtype=torch.float64)
    hidden, weight = hidden.to(device), weight.to(device)
    supervised_hidden = hidden[:, case.prefix_len :].reshape(-1, hidden_size)  # (S * response_len, H)
    drawn, label_logps = _draw_labels(supervised_hidden, weight, uniforms.to(device))
    labels = torch.full((num_seqs, seq_len), IGNORE_INDEX)
    labels[:, case.prefix_len :] = drawn.view(num_seqs, case.response_len).cpu()
    seq_logps = label_logps.view(num_seqs, case.response_len).sum(-1).cpu()  # (S,)
    # The policy's own sequence log-probs plus the spread of a sum of per-token terms: the DPO margins stay moderate.
    ref_logps = (seq_logps + math.sqrt(case.response_len) * noise).float()
    return hidden, weight, labels, ref_logps


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> LossInputs:
    """The inputs of case.logits, the same for every provider given the seed. Peaked labels are drawn on `device`, so
    its rounding may change a few of them from one kind of device to another."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    if case.logits == "flat":
        hidden, weight, labels, ref_logps = _flat_inputs(case, gen)
    elif case.logits == "peaked":
        hidden, weight, labels, ref_logps = _peaked_inputs(case, device, gen)
    else:
        raise ValueError(f"logits must be one of {', '.join(LOGITS)}, got {case.logits!r}")
    return LossInputs(
        hidden=hidden.to(device, dtype).requires_grad_(),
        weight=weight.to(device, dtype).requires_grad_(),
        labels=labels.to(device),
        seq_ids=torch.arange(case.num_seqs, device=device).repeat_interleave(case.seq_len),
        ref_chosen_logps=ref_logps[: case.num_pairs].to(device),
        ref_rejected_logps=ref_logps[case.num_pairs :].to(device),
    )


def softmax_summary(inputs: LossInputs, rows: int = SUMMARY_ROWS) -> dict:
    """Mean entropy (nats) and mean label log-prob of the softmax that the inputs give, in float64 over up to `rows`
    supervised tokens spread evenly over the batch: what gradient filtering depends on."""
    hidden_size = inputs.hidden.shape[-1]
    supervised = (inputs.labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    picked = supervised[torch.linspace(0, len(supervised) - 1, min(rows, len(supervised))).round().long()]
    hidden = inputs.hidden.detach().reshape(-1, hidden_size)[picked].double()  # (R, H)
    logits = torch.cat([hidden @ block.double().T
                        for block in inputs.weight.detach().split(SUMMARY_WORDS_PER_BLOCK)], dim=1)  # (R, V)
    log_probs = logits.log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    label_logps = log_probs.gather(1, inputs.labels.reshape(-1)[picked, None]).squeeze(1)
    return {"entropy_nats": entropy.mean().item(), "label_logp": label_logps.mean().item(),
            "summary_rows": len(picked)}


def _dpo_sigmoid_loss(seq_logps: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    """seq_logps (S,), chosen first -> mean over pairs of -log sigmoid(beta * margin)."""
    num_pairs = inputs.ref_chosen_logps.shape[0]
    chosen_logratios = seq_logps[:num_pairs] - inputs.ref_chosen_logps
    rejected_logratios = seq_logps[num_pairs:] - inputs.ref_rejected_logps
    return -F.logsigmoid(BETA * (chosen_logratios - rejected_logratios)).mean()


def naive_loss(inputs: LossInputs) -> torch.Tensor:
    """The full-logits loss head of a DPO trainer."""
    logits = inputs.hidden @ inputs.weight.T  # (S, T, V)
    # Trainers upcast before the softmax so that 16-bit models get fp32 log-probs; a no-op in fp32.
    log_probs = logits.float().log_softmax(dim=-1)  # (S, T, V)
    supervised = inputs.labels != IGNORE_INDEX
    safe_labels = torch.where(supervised, inputs.labels, 0)
    token_logps = log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (S, T)
    return _dpo_sigmoid_loss((token_logps * supervised).sum(-1), inputs)


@functools.cache
def _liger_dpo_function() -> type[torch.autograd.Function]:
    """Imported on first use: liger-kernel is optional, and a failed import must only skip its provider."""
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction
    from liger_kernel.chunked_loss.fused_linear_preference import LigerFusedLinearPreferenceBase

    class LigerDPOWithRefLogps(LigerFusedLinearDPOFunction):
        """liger's chunked DPO with precomputed reference log-probs, handed to each chunk's loss in turn."""

        @staticmethod
        def preference_loss_fn(chosen_logps, rejected_logps, full_target, ref_chunks=None, **loss_kwargs):
            ref_chosen_logps, ref_rejected_logps = next(ref_chunks)
            return LigerFusedLinearDPOFunction.preference_loss_fn(
                chosen_logps, rejected_logps, full_target, ref_chosen_logps, ref_rejected_logps, **loss_kwargs
            )

        @classmethod
        def forward(cls, ctx, hidden, weight, target, ref_chosen_logps, ref_rejected_logps):
            # The base class cuts the pairs into this many chunks with torch.chunk and scores them once each, in
            # order (eager mode), so the same cut of the reference log-probs lines up with them.
            num_chunks = max(1, hidden.shape[0] // (2 * LIGER_CHUNK_PAIRS))
            chosen_chunks, rejected_chunks = ref_chosen_logps.chunk(num_chunks), ref_rejected_logps.chunk(num_chunks)
            ref_chunks = iter(zip(chosen_chunks, rejected_chunks, strict=True))
            return LigerFusedLinearPreferenceBase.forward(
                cls=cls, ctx=ctx, _input=hidden, weight=weight, target=target, chunk_size=LIGER_CHUNK_PAIRS,
                ignore_index=IGNORE_INDEX, beta=BETA, compute_nll_loss=False, compiled=False, use_ref_model=False,
                average_log_prob=False, ref_chunks=ref_chunks, loss_type="sigmoid",
            )

        @staticmethod
        def backward(ctx, *grad_output):
            # liger's base backward takes the tuple of output gradients as one argument.
            grad_hidden, grad_weight = LigerFusedLinearPreferenceBase.backward(ctx, grad_output)[:2]
            return grad_hidden, grad_weight, None, None, None

    return LigerDPOWithRefLogps


def liger_loss(inputs: LossInputs) -> torch.Tensor:
    """liger-kernel's chunked DPO over the stacked (2P, T, H) batch."""
    loss, _ = _liger_dpo_function().apply(
        inputs.hidden, inputs.weight, inputs.labels, inputs.ref_chosen_logps, inputs.ref_rejected_logps
    )
    return loss


def dama_loss(inputs: LossInputs, grad_filter_eps: float | None = None) -> torch.Tensor:
    """The fused head: sequence log-probs of the supervised tokens, then the DAMA sigmoid loss (uniform beta).
    grad_filter_eps as sequence_logps takes it (None: the dtype's default)."""
    num_seqs, seq_len, hidden_size = inputs.hidden.shape
    seq_logps = sequence_logps(
        inputs.hidden.reshape(num_seqs * seq_len, hidden_size), inputs.weight, inputs.labels.reshape(-1),
        inputs.seq_ids, num_seqs, grad_filter_eps=grad_filter_eps,
    )  # (S,)
    num_pairs = num_seqs // 2
    return dama_sigmoid_loss(
        seq_logps[:num_pairs], seq_logps[num_pairs:], inputs.ref_chosen_logps, inputs.ref_rejected_logps, BETA
    ).loss


LOSSES = {"naive": naive_loss, "liger": liger_loss, "dama": dama_loss,
          "dama_exact": functools.partial(dama_loss, grad_filter_eps=0.0)}


def _provider_notes(case: Case, device: torch.device) -> str:
    if case.provider == "liger":
        return f"eager, {LIGER_CHUNK_PAIRS} pair per chunk"
    if case.provider.startswith("dama"):
        eps = default_filter_eps(DTYPES[case.dtype]) if case.provider == "dama" else 0.0
        filtering = f"gradient filter eps 2^{math.log2(eps):.0f}" if eps else "no gradient filter"
        if device.type == "cuda":
            return f"impl=triton, {filtering}"
        return f"impl=torch, {max(16, CHUNK_ELEMENTS // case.vocab_size)} rows per chunk, {filtering}"
    return "full logits"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _case_fields(case: Case) -> dict:
    return {
        "provider": case.provider, "regime": case.regime, "purpose": case.purpose, "H": case.hidden_size,
        "V": case.vocab_size, "pairs": case.num_pairs, "seq_len": case.seq_len, "tokens": case.tokens,
        "supervised_tokens": case.supervised_tokens, "dtype": case.dtype, "logits": case.logits, "time_s": None,
        "peak_bytes": None,
    }


def run_case(case: Case, repeats: int, device: torch.device) -> dict:
    """Measures one case in this process and returns its record (without ratios or the environment)."""
    inputs = make_inputs(case, device)
    loss_fn = LOSSES[case.provider]
    params = (inputs.hidden, inputs.weight)

    def clear_grads() -> None:
        for param in params:
            param.grad = None

    def step() -> torch.Tensor:
        clear_grads()
        loss = loss_fn(inputs)
        loss.backward()
        return loss.detach()

    def timed_steps(count: int) -> list[float]:
        times = []
        for _ in range(count):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return times

    def memory_fields(reading: PeakReading) -> dict:
        grads = [param.grad for param in params]
        return {
            "peak_bytes": reading.working_bytes(grads),
            "peak_total_bytes": reading.working_bytes(),
            "grad_bytes": sum(grad.untyped_storage().nbytes() for grad in grads),
        }

    rss_inputs = current_rss_bytes()
    # The backward's filtered d_logits tiles are counted in the untimed step only: counting reads the tile maps.
    if device.type == "cuda":
        # Triton compiles and autotunes on the first call, so the peak is read over the timed steps.
        with count_filtered_tiles() as tiles:
            loss = step()
        clear_grads()  # else the warm-up's gradients sit in the baseline and their reallocation is not counted
        with track_peak(device) as reading:
            times = timed_steps(max(repeats, 1))
        memory = memory_fields(reading)
    else:
        with track_peak(device) as reading, count_filtered_tiles() as tiles:
            loss = step()  # also the warm-up: the profiler slows it, and its time is not used
        # Read now: the outputs left out must be this step's gradients.
        memory = memory_fields(reading)
        times = timed_steps(repeats)
    rss_peak = peak_rss_bytes()
    # After the readings: its float64 blocks must not count in the peaks.
    summary = softmax_summary(inputs) if case.summarise else {}
    time_s = statistics.median(times) if repeats > 0 else None
    useful_flops = 6 * case.supervised_tokens * case.hidden_size * case.vocab_size
    return {
        **_case_fields(case),
        "status": "ok",
        "time_s": time_s,
        "times_s": times[:repeats],
        "tflops": useful_flops / time_s / 1e12 if time_s else None,
        **memory,
        "rss_peak_bytes": rss_peak,
        "rss_extra_bytes": rss_peak - rss_inputs,
        "loss": loss.item(),
        # dama's backward only (the others filter nothing): d_logits tiles filtered of those computed in one step.
        "filtered_tiles": tiles.skipped if tiles.total else None,
        "tiles": tiles.total or None,
        "filtered_tile_share": tiles.skipped_share,
        **summary,
        "notes": _provider_notes(case, device),
        "device": device.type,
        "device_name": _device_name(device),
    }


def run_isolated(case: Case, repeats: int) -> dict:
    """run_case in a fresh process of this module; a failure becomes a skipped record with the reason."""
    command = [sys.executable, "-m", "bench.loss_head", "--worker", json.dumps(asdict(case)), "--repeats", str(repeats)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    # The last stderr line of a Python failure is the exception; the profiler's own chatter comes before it.
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit status {done.returncode}"
    return {**_case_fields(case), "status": "skipped", "reason": f"{case.provider} failed: {reason}"}


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 20) -> float:
    """Best rate of a large square matmul: the practical peak the loss head's matmuls are measured against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats + 1):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def _ratio(record: dict, peer: dict | None, key: str) -> float | None:
    if peer is None or peer.get(key) is None or record.get(key) is None:
        return None
    return record[key] / peer[key]


def add_ratios(records: list[dict]) -> None:
    """Adds record["ratios"]: time and working memory over naive's and liger's for the same regime and shape."""
    measured = [r for r in records if r["status"] == "ok" and r["purpose"] == "comparison"]
    ok = {(r["provider"], r["regime"], r["H"]): r for r in measured}
    for record in records:
        if record["purpose"] != "comparison":
            continue
        ratios = {}
        for peer_name in ("naive", "liger"):
            peer = ok.get((peer_name, record["regime"], record["H"]))
            ratios[f"time_vs_{peer_name}"] = _ratio(record, peer, "time_s")
            ratios[f"peak_vs_{peer_name}"] = _ratio(record, peer, "peak_bytes")
        record["ratios"] = ratios


# Targets set for the CPU in fp32: (ratio key, limit, label).
TARGETS = {
    "a": [("peak_vs_naive", 0.05, "working memory <= 5% of naive"), ("time_vs_naive", 1.3, "time <= 1.3x naive")],
    "b": [
        ("time_vs_naive", 0.5, ">= 2x faster than naive"),
        ("time_vs_liger", 0.5, ">= 2x faster than liger"),
        ("peak_vs_naive", 0.05, "working memory <= 5% of naive"),
        ("peak_vs_liger", 0.05, "working memory <= 5% of liger"),
    ],
}


def add_targets(records: list[dict]) -> None:
    """Adds record["targets"] to each measured dama comparison record: value, limit and whether it is met."""
    for record in records:
        if record["provider"] != "dama" or record["status"] != "ok" or record["purpose"] != "comparison":
            continue
        record["targets"] = [
            {"target": label, "ratio": key, "value": record["ratios"][key], "limit": limit,
             "met": None if record["ratios"][key] is None else record["ratios"][key] <= limit}
            for key, limit, label in TARGETS[record["regime"]]
        ]


def environment() -> dict:
    """Versions and the commit, stored in every record."""
    try:
        liger_version = version("liger-kernel")
    except PackageNotFoundError:
        liger_version = None

    return {
        "torch": torch.__version__, "triton": triton.__version__, "liger_kernel": liger_version,
        "python": platform.python_version(), **git_state(),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(records: list[dict]) -> str:
    """One row per provider, grouped by regime and shape; ratios are this row over naive's and liger's."""
    gpu = any(r.get("device") == "cuda" for r in records)
    header = ["regime", "H", "tokens", "superv", "provider", "time s", "/naive", "/liger", "work MiB", "/naive",
              "/liger", "RSS+ MiB", "TFLOP/s"] + (["% peak"] if gpu else []) + ["filtered"]
    rows = [header]
    for r in records:
        if r["purpose"] != "comparison":
            continue
        ratios = r.get("ratios", {})
        if r["status"] != "ok":
            rows.append([r["regime"], str(r["H"]), str(r["tokens"]), str(r["supervised_tokens"]), r["provider"],
                         f"skipped: {r['reason']}"])
            continue
        row = [r["regime"], str(r["H"]), str(r["tokens"]), str(r["supervised_tokens"]), r["provider"],
               _fmt(r["time_s"], ".3f"), _fmt(ratios.get("time_vs_naive"), ".2f"),
               _fmt(ratios.get("time_vs_liger"), ".2f"), f"{r['peak_bytes'] / MIB:.1f}",
               _fmt(ratios.get("peak_vs_naive"), ".3f"), _fmt(ratios.get("peak_vs_liger"), ".3f"),
               f"{r['rss_extra_bytes'] / MIB:.0f}", _fmt(r["tflops"], ".3f")]
        if gpu:
            row.append(_fmt(r.get("peak_fraction") and 100 * r["peak_fraction"], ".0f"))
        share = r.get("filtered_tile_share")
        row.append("-" if share is None else f"{100 * share:.1f}%")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows if i < len(row) and len(row) == len(header)) for i in range(len(header))]
    # A skipped row is shorter: its reason fills the cells from the time onwards.
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=False)) for row in rows)


def format_inputs(records: list[dict]) -> str:
    """The softmax of the inputs per regime and shape (the same for every provider): mean entropy, label log-prob."""
    summaries = {}
    for r in records:
        if r["status"] == "ok" and "entropy_nats" in r:
            summaries.setdefault((r["regime"], r["H"]), r)
    if not summaries:
        return ""
    rows = next(iter(summaries.values()))["summary_rows"]
    lines = [f"Softmax of the inputs (float64, {rows} supervised rows per case): mean entropy, mean label log-prob"]
    lines += [f"  regime {regime}, H {hidden_size}: {r['entropy_nats']:.2f} nats, {r['label_logp']:.2f}"
              for (regime, hidden_size), r in summaries.items()]
    return "\n".join(lines)


def format_targets(records: list[dict]) -> str:
    lines = ["Targets (set for the CPU in fp32):"]
    for r in records:
        for target in r.get("targets", []):
            value = "-" if target["value"] is None else f"{target['value']:.3f}"
            verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
            lines.append(f"  regime {r['regime']}, H {r['H']}: {target['target']}: ratio {value} "
                         f"(limit {target['limit']}) -> {verdict}")
    return "\n".join(lines)


def format_scaling(records: list[dict]) -> str:
    """dama's working memory at N and 2N tokens in regime a: it should not grow with N."""
    by_tokens = {r["tokens"]: r for r in records if r["provider"] == "dama" and r["regime"] == "a"
                 and r["H"] == 256 and r["status"] == "ok"}
    if len(by_tokens) < 2:
        return ""
    parts = [f"N={tokens}: {r['peak_bytes'] / MIB:.1f} MiB" for tokens, r in sorted(by_tokens.items())]
    return "dama working memory, regime a, H 256: " + ", ".join(parts)


def plan_cases(hidden_sizes: tuple[int, ...], regimes: list[str], providers: list[str], dtype: str,
               logits: str = "flat") -> list[Case]:
    if not default_filter_eps(DTYPES[dtype]):  # nothing is filtered by default: dama_exact would repeat dama
        providers = [p for p in providers if p != "dama_exact"]
    cases = [replace(regime_case(p, regime, h, dtype, logits=logits), summarise=p == providers[0])
             for h in hidden_sizes for regime in regimes for p in providers]
    if 256 in hidden_sizes and "a" in regimes and "dama" in providers:
        cases.append(regime_case("dama", "a", 256, dtype, length_scale=2, logits=logits))
    return cases


def _hidden_sizes(shapes: str, quick: bool, on_gpu: bool) -> tuple[int, ...]:
    if shapes is None:
        shapes = "quick" if quick else ("all" if on_gpu else "cpu")
    if shapes in SHAPE_SETS:
        return SHAPE_SETS[shapes]
    try:
        return tuple(int(h) for h in shapes.split(","))
    except ValueError:
        choices = ", ".join(SHAPE_SETS)
        raise SystemExit(f"--shapes takes {choices} or hidden sizes like 256,1024; got {shapes!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loss_head", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="H 256 only and 1 timed step per case: the CPU smoke run of `make bench QUICK=1`, under "
                             "2 minutes on 2 cores")
    parser.add_argument("--shapes", default=None,
                        help="hidden sizes H (V is 32000): 'quick' (256), 'cpu' (256,1024), 'all' (256,1024,4096; "
                             "4096 is LLaVA-1.5-7B) or a comma list such as 256,1024. Default: 'cpu' on the CPU, "
                             "'all' on a GPU, 'quick' with --quick")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                        help="implementations to run (default: all three)")
    parser.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), default=sorted(REGIMES),
                        help="a: every token supervised, N = 8192; b: LLaVA-like, only 150 of 786 tokens per "
                             "sequence supervised (default: both)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed forward + backward steps after the warm-up; the median is reported "
                             "(default 3, 1 with --quick)")
    parser.add_argument("--logits", choices=list(LOGITS), default="flat",
                        help="the softmax the inputs give, which decides how many of dama's d_logits tiles gradient "
                             "filtering drops: " + "; ".join(f"{name}: {text}" for name, text in LOGITS.items())
                             + " (default flat)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of hidden states and weight (default fp32 on the CPU, bf16 on a GPU)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"JSON file for the records (default {DEFAULT_OUTPUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--worker", metavar="CASE_JSON", default=None,
                        help="internal: measure the one case given as JSON in this process and print its record as "
                             "JSON; the main run starts one such process per case so that peak RSS is per case")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 0:
        parser.error("--repeats must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if args.worker is not None:
        print(json.dumps(run_case(Case(**json.loads(args.worker)), repeats, device)))
        return

    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    cases = plan_cases(_hidden_sizes(args.shapes, args.quick, device.type == "cuda"), args.regimes,
                       args.providers, dtype, args.logits)
    started = time.perf_counter()
    records = []
    for index, case in enumerate(cases, 1):
        # The N -> 2N check needs only the memory reading, which the warm-up step gives.
        record = run_isolated(case, repeats if case.purpose == "comparison" else 0)
        records.append(record)
        shown = "skipped" if record["status"] != "ok" else f"{_fmt(record['time_s'], '.3f')} s, " + (
            f"{record['peak_bytes'] / MIB:.1f} MiB")
        print(f"[{index}/{len(cases)}] {case.provider} regime {case.regime} H {case.hidden_size} "
              f"N {case.tokens}: {shown}", file=sys.stderr, flush=True)
    if device.type == "cuda":
        peak = matmul_peak_tflops(device, DTYPES[dtype])
        for record in records:
            record["matmul_peak_tflops"] = peak
            record["peak_fraction"] = record.get("tflops") and record["tflops"] / peak
    add_ratios(records)
    add_targets(records)
    env = environment()
    records = [{**record, **env} for record in records]

    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial_path = args.output.with_name(args.output.name + ".tmp")
    partial_path.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(partial_path, args.output)

    print(f"Loss head, {args.logits} logits: {LOGITS[args.logits]}")
    print(format_table(records))
    for extra in (format_inputs(records), format_scaling(records)):
        if extra:
            print(extra)
    print(format_targets(records))
    print(f"{len(cases)} cases in {time.perf_counter() - started:.0f} s on {device.type} ({dtype}, "
          f"{args.logits} logits); "
          f"torch {env['torch']}, triton {env['triton']}, liger-kernel {env['liger_kernel']}, "
          f"commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}; records in {args.output}")


if __name__ == "__main__":
    main()

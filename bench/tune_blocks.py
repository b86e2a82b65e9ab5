"""Block-size sweep of the fused linear log-prob kernels on the GPU at hand (needs CUDA).

At a shape of LLaVA-1.5-7B's head (H 4096, V 32064) it times, per candidate tile configuration, the forward kernel
alone and, separately, the backward's d_logits kernel, both on one chunk of rows and inside the whole backward (chunks
of d_logits kernel + cuBLAS d_hidden and d_weight). With the default backward blocks it also times the whole backward
at several chunk heights. Side by side in the same run: the chunked torch path, a chunked cuBLAS head written the
usual way (bf16 logits, separate softmax) and the full-logits head. Rates are useful TFLOP/s: 2 N H V for the forward
and for the d_logits kernel, 4 N H V for a backward (its recomputation of the logits is not counted), against a large
matmul in the same dtype timed in the same run. Each Triton record carries its error against the torch path (fp32
maths). A configuration that does not compile or launch on this device is reported with the reason. The blocks the
launchers pick on this device (dama_kernels.launch_config.linear_logprob_blocks) are always swept, marked "<- launcher".

Output: a table per (dtype, N) and the records as JSON in --output.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import triton
import triton.testing

from dama_kernels.functional import CHUNK_ELEMENTS
from dama_kernels.launch_config import LinearLogprobBlocks, linear_logprob_blocks
from dama_kernels.linear_logprob_backward import (
    backward_chunk_rows,
    linear_logprob_bwd_triton,
    linear_logprob_d_logits_triton,
)
from dama_kernels.linear_logprob_forward import linear_logprob_fwd_triton
from dama_kernels.linear_logprob_torch import linear_logprob_bwd_torch, linear_logprob_fwd_torch

from .dtypes import DTYPES
from .environment import REPO_ROOT, git_state

IGNORE_INDEX = -100
FORWARD_CANDIDATES = [
    LinearLogprobBlocks(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3),
    LinearLogprobBlocks(block_n=128, block_v=128, block_h=64, num_warps=4, num_stages=3),
    LinearLogprobBlocks(block_n=128, block_v=256, block_h=64, num_warps=8, num_stages=3),
    LinearLogprobBlocks(block_n=64, block_v=256, block_h=64, num_warps=4, num_stages=4),
    LinearLogprobBlocks(block_n=128, block_v=128, block_h=128, num_warps=8, num_stages=2),
    LinearLogprobBlocks(block_n=256, block_v=128, block_h=64, num_warps=8, num_stages=3),
    LinearLogprobBlocks(block_n=64, block_v=128, block_h=64, num_warps=4, num_stages=4),
    LinearLogprobBlocks(block_n=128, block_v=64, block_h=64, num_warps=4, num_stages=4),
    LinearLogprobBlocks(block_n=64, block_v=64, block_h=64, num_warps=4, num_stages=3),
]
# The d_logits kernel is a plain GEMM whose epilogue is elementwise and a store, with no reduction across the tile
# as in the forward: the shapes of Triton's Hopper matmul configurations, deeper pipelines included.
BACKWARD_CANDIDATES = [
    LinearLogprobBlocks(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3),
    LinearLogprobBlocks(block_n=128, block_v=128, block_h=64, num_warps=4, num_stages=4),
    LinearLogprobBlocks(block_n=128, block_v=256, block_h=64, num_warps=8, num_stages=3),
    LinearLogprobBlocks(block_n=256, block_v=128, block_h=64, num_warps=8, num_stages=3),
    LinearLogprobBlocks(block_n=128, block_v=256, block_h=32, num_warps=8, num_stages=4),
    LinearLogprobBlocks(block_n=128, block_v=128, block_h=128, num_warps=8, num_stages=2),
    LinearLogprobBlocks(block_n=64, block_v=256, block_h=64, num_warps=4, num_stages=4),
    LinearLogprobBlocks(block_n=128, block_v=64, block_h=64, num_warps=4, num_stages=4),
]
# Chunk heights of the whole backward, around the default (2048 rows at V 32064 in 16-bit).
CHUNK_ROWS = [1024, 2048, 4096, 8192]
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "tune_blocks.json"


def matmul_peak_tflops(dtype: torch.dtype, size: int = 8192) -> float:
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    return 2 * size**3 / triton.testing.do_bench(lambda: a @ b, return_mode="median") / 1e9


def make_inputs(num_tokens: int, hidden_size: int, vocab_size: int, dtype: torch.dtype, device: torch.device):
    hidden = torch.randn(num_tokens, hidden_size, device=device).to(dtype)  # (N, H)
    weight = (torch.randn(vocab_size, hidden_size, device=device) / math.sqrt(hidden_size)).to(dtype)  # (V, H)
    labels = torch.randint(0, vocab_size, (num_tokens,), device=device)  # (N,)
    grad = torch.randn(num_tokens, device=device)  # (N,)
    return hidden, weight, labels, grad


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def full_logits_ms(hidden, weight, labels, grad) -> tuple[float, float]:
    """Forward and forward + backward of log_softmax(h @ W.T).gather, the naive head."""
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()

    def forward():
        return torch.log_softmax((hidden @ weight.T).float(), -1).gather(1, labels[:, None])[:, 0]

    def forward_backward():
        hidden.grad = weight.grad = None
        forward().backward(grad)

    return time_ms(forward), time_ms(forward_backward)


CUBLAS_CHUNK_ROWS = 4096


def cublas_chunked_ms(hidden, weight, labels, grad) -> tuple[float, float]:
    """The chunked head as a GPU trainer would write it with cuBLAS: input-dtype matmuls over row chunks, fp32
    softmax, d_logits rounded to the input dtype (the alternative to a fused backward kernel)."""

    def forward():
        out = []
        for start in range(0, hidden.shape[0], CUBLAS_CHUNK_ROWS):
            logits = (hidden[start:start + CUBLAS_CHUNK_ROWS] @ weight.T).float()
            out.append(logits.gather(1, labels[start:start + CUBLAS_CHUNK_ROWS, None])[:, 0] - logits.logsumexp(-1))
        return torch.cat(out)

    def backward():
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], CUBLAS_CHUNK_ROWS):
            rows = slice(start, start + CUBLAS_CHUNK_ROWS)
            d_logits = (hidden[rows] @ weight.T).float().softmax(-1).neg_()
            d_logits.scatter_add_(1, labels[rows, None], torch.ones_like(d_logits[:, :1]))
            d_logits = (d_logits * grad[rows, None]).to(hidden.dtype)
            d_hidden[rows] = d_logits @ weight
            d_weight.add_((d_logits.T @ hidden[rows]).float())
        return d_hidden, d_weight

    return time_ms(forward), time_ms(backward)


def candidates_for(kind: str, candidates: list[LinearLogprobBlocks], dtype: torch.dtype,
                   device: torch.device) -> list[tuple[LinearLogprobBlocks, bool]]:
    """The launchers' pick for `kind` on this device first, then the other candidates; True marks the pick."""
    pick = linear_logprob_blocks(kind, torch.cuda.get_device_capability(device), dtype)
    return [(blocks, blocks == pick) for blocks in dict.fromkeys([pick, *candidates])]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def sweep(dtype_name: str, num_tokens: int, hidden_size: int, vocab_size: int, peak: float,
          device: torch.device) -> list[dict]:
    dtype = DTYPES[dtype_name]
    hidden, weight, labels, grad = make_inputs(num_tokens, hidden_size, vocab_size, dtype, device)
    fwd_flops, bwd_flops = 2 * num_tokens * hidden_size * vocab_size, 4 * num_tokens * hidden_size * vocab_size
    common = {"dtype": dtype_name, "N": num_tokens, "H": hidden_size, "V": vocab_size, "matmul_peak_tflops": peak}
    records = []

    def record(name: str, fwd_ms: float | None, bwd_ms: float | None, **extra) -> None:
        records.append({
            **common, "provider": name, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
            "fwd_tflops": fwd_ms and fwd_flops / fwd_ms / 1e9, "bwd_tflops": bwd_ms and bwd_flops / bwd_ms / 1e9,
            **extra,
        })

    def failed(name: str, error: Exception, **fields) -> None:
        # An out-of-resources launch is a result of the sweep, not a failure of it.
        record(name, None, None, **fields, error=f"{type(error).__name__}: {str(error)[:200]}")

    torch_chunk = max(16, CHUNK_ELEMENTS // vocab_size)
    needs = (True, True, False)
    reference = linear_logprob_fwd_torch(hidden, weight, labels, None, IGNORE_INDEX, torch_chunk)
    ref_logps, max_logit, log_norm = reference
    ref_d_hidden, ref_d_weight, _ = linear_logprob_bwd_torch(
        grad, hidden, weight, labels, None, max_logit, log_norm, IGNORE_INDEX, torch_chunk, needs)

    def backward(blocks: LinearLogprobBlocks, chunk_rows: int | None = None):
        return linear_logprob_bwd_triton(grad, hidden, weight, labels, None, max_logit, log_norm, IGNORE_INDEX,
                                         blocks, needs, chunk_rows=chunk_rows)

    def backward_errors(blocks: LinearLogprobBlocks, chunk_rows: int | None = None) -> dict:
        d_hidden, d_weight, _ = backward(blocks, chunk_rows)
        return {"d_hidden_rel_err_vs_torch": relative_error(d_hidden, ref_d_hidden),
                "d_weight_rel_err_vs_torch": relative_error(d_weight, ref_d_weight)}

    for blocks, launcher_pick in candidates_for("forward", FORWARD_CANDIDATES, dtype, device):
        fields = {"blocks": blocks.__dict__, "launcher_pick": launcher_pick}
        try:
            token_logps, _, _ = linear_logprob_fwd_triton(hidden, weight, labels, None, IGNORE_INDEX, blocks)
            fields["max_abs_err_vs_torch"] = (token_logps - ref_logps).abs().max().item()
            fwd_ms = time_ms(lambda b=blocks: linear_logprob_fwd_triton(hidden, weight, labels, None, IGNORE_INDEX, b))
            record("triton_forward", fwd_ms, None, **fields)
        except Exception as error:
            failed("triton_forward", error, **fields)

    # The d_logits kernel alone, on the first chunk of rows the backward would launch it on.
    rows = min(num_tokens, backward_chunk_rows(vocab_size, dtype))
    d_logits = torch.empty((rows, vocab_size), dtype=dtype, device=device)
    for blocks, launcher_pick in candidates_for("backward", BACKWARD_CANDIDATES, dtype, device):
        fields = {"blocks": blocks.__dict__, "launcher_pick": launcher_pick, "d_logits_rows": rows}
        try:
            fields |= backward_errors(blocks)
            d_logits_ms = time_ms(lambda b=blocks: linear_logprob_d_logits_triton(
                d_logits, hidden[:rows], weight, labels[:rows], None, max_logit[:rows], log_norm[:rows], grad[:rows],
                IGNORE_INDEX, b))
            d_logits_flops = 2 * rows * hidden_size * vocab_size
            fields |= {"d_logits_ms": d_logits_ms, "d_logits_tflops": d_logits_flops / d_logits_ms / 1e9}
            record("triton_backward", None, time_ms(lambda b=blocks: backward(b)), **fields)
        except Exception as error:
            failed("triton_backward", error, **fields)

    default_blocks = linear_logprob_blocks("backward", torch.cuda.get_device_capability(device), dtype)
    for chunk_rows in [c for c in CHUNK_ROWS if c <= num_tokens]:
        fields = {"blocks": default_blocks.__dict__, "chunk_rows": chunk_rows}
        try:
            fields |= backward_errors(default_blocks, chunk_rows)
            record("triton_backward_chunks", None, time_ms(lambda c=chunk_rows: backward(default_blocks, c)), **fields)
        except Exception as error:
            failed("triton_backward_chunks", error, **fields)

    fwd_ms = time_ms(lambda: linear_logprob_fwd_torch(hidden, weight, labels, None, IGNORE_INDEX, torch_chunk))
    bwd_ms = time_ms(lambda: linear_logprob_bwd_torch(
        grad, hidden, weight, labels, None, max_logit, log_norm, IGNORE_INDEX, torch_chunk, needs))
    record("torch_chunked", fwd_ms, bwd_ms, chunk_rows=torch_chunk)
    fwd_ms, bwd_ms = cublas_chunked_ms(hidden, weight, labels, grad)
    record("cublas_chunked_16bit", fwd_ms, bwd_ms, chunk_rows=CUBLAS_CHUNK_ROWS)
    naive_fwd, naive_fwd_bwd = full_logits_ms(hidden, weight, labels, grad)
    record("full_logits", naive_fwd, naive_fwd_bwd - naive_fwd)
    return records


def format_rate(ms: float | None, tflops: float | None, peak: float, label: str) -> str:
    if ms is None:
        return f"{label} {'-':>8}" + " " * 27
    return f"{label} {ms:8.3f} ms {tflops:6.1f} TFLOP/s ({100 * tflops / peak:3.0f}%)"


def format_table(records: list[dict]) -> str:
    lines = []
    for r in records:
        blocks = r.get("blocks")
        name = r["provider"]
        if blocks:
            name += (f" {blocks['block_n']}x{blocks['block_v']}x{blocks['block_h']} w{blocks['num_warps']} "
                     f"s{blocks['num_stages']}")
        if "chunk_rows" in r:
            name += f" C{r['chunk_rows']}"
        if r.get("launcher_pick"):
            name += " <- launcher"
        if r.get("error"):
            lines.append(f"{r['dtype']:>5} N {r['N']:>5}  {name:<42} failed: {r['error'][:90]}")
            continue
        peak = r["matmul_peak_tflops"]
        line = (f"{r['dtype']:>5} N {r['N']:>5}  {name:<42} {format_rate(r['fwd_ms'], r['fwd_tflops'], peak, 'fwd')}  "
                f"{format_rate(r['bwd_ms'], r['bwd_tflops'], peak, 'bwd')}")
        if "d_logits_ms" in r:
            line += f"  {format_rate(r['d_logits_ms'], r['d_logits_tflops'], peak, 'd_logits')}"
        if "d_weight_rel_err_vs_torch" in r:
            line += f"  err dh {r['d_hidden_rel_err_vs_torch']:.1e} dw {r['d_weight_rel_err_vs_torch']:.1e}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tune_blocks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1200, 8192],
                        help="supervised rows N: 1200 is 4 LLaVA pairs of 150-token responses")
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--vocab-size", type=int, default=32064)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.tune_blocks times GPU kernels and needs a CUDA device")
    records = []
    for dtype_name in args.dtypes:
        peak = matmul_peak_tflops(DTYPES[dtype_name])
        print(f"{dtype_name} matmul peak on {torch.cuda.get_device_name()}: {peak:.0f} TFLOP/s", flush=True)
        for num_tokens in args.tokens:
            found = sweep(dtype_name, num_tokens, args.hidden_size, args.vocab_size, peak, torch.device("cuda"))
            print(format_table(found), flush=True)
            records += found
    env = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           **git_state()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps([{**r, **env} for r in records], indent=1) + "\n")


if __name__ == "__main__":
    main()

"""`dama selftest`: check the kernels on this machine before trusting a training run to them.

On every device present (each CUDA device, else the CPU; or those named with --device) it runs the checks of
dama_kernels.checks, the ones the test suite runs: values and gradients of token_logps, sequence_logps and
dama_sigmoid_loss against float64 references, over the case grid (a single token, block tails, ignored tokens, peaked
and large logits, LLaVA-1.5-7B's head at small N) in every dtype the device supports, for the Triton kernels and the
chunked torch path on a GPU (the torch path on a CPU, the Triton interpreter too under TRITON_INTERPRET=1). On a GPU,
"tf32x3" runs fp32 inputs with torch.set_float32_matmul_precision("high"). One timing line per shape compares the
forward + backward of sequence_logps (impl="auto") with the full-logits head. The 16-bit checks run with gradient
filtering at its default thresholds (dama_kernels.grad_filter); a line counts the tiles it filtered.

--compile-only builds every Triton kernel ahead of time for the targets of --arch (no GPU needed) and prints each
kernel's shared memory against the target's limit (dama_kernels.aot_compile).

Prints a table (or JSON with --json) and exits with status 1 if any check fails, naming the case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import triton
import triton.testing

from . import checks
from .aot_compile import PRECISIONS, TARGETS
from .checks import LOGPROB_CASES, LOSS_CASES, Comparison
from .functional import sequence_logps
from .grad_filter import count_filtered_tiles
from .launch_config import KIB, KINDS, linear_logprob_blocks, running_in_interpreter

LOSS_DTYPES = ("fp32", "bf16", "fp16")


def finite_or_none(value: float) -> float | None:
    """JSON has no infinity: an unbounded error or ratio is written as null."""
    return value if value != float("inf") else None


@dataclass
class CheckRecord:
    device: str
    impl: str
    op: str
    case: str
    precision: str
    comparisons: list[Comparison] = field(default_factory=list)
    error: str = ""
    tiles_filtered: int = 0  # d_logits tiles the backward filtered (dama_kernels.grad_filter), of tiles_total
    tiles_total: int = 0

    @property
    def ok(self) -> bool:
        return not self.error and all(c.ok for c in self.comparisons)

    @property
    def worst_ratio(self) -> float:
        """Largest error / allowed over the comparisons: at most 1 passes."""
        ratios = [c.error / c.allowed if c.allowed else (0.0 if c.ok else float("inf")) for c in self.comparisons]
        return max(ratios, default=0.0) if not self.error else float("inf")

    def failure(self) -> str:
        where = f"{self.device} {self.impl} {self.op} {self.case} {self.precision}"
        if self.error:
            return f"{where}: {self.error}"
        return f"{where}: " + "; ".join(str(c) for c in self.comparisons if not c.ok)

    def as_json(self) -> dict:
        return {
            "device": self.device, "impl": self.impl, "op": self.op, "case": self.case, "precision": self.precision,
            "ok": self.ok, "worst_ratio": finite_or_none(self.worst_ratio), "error": self.error,
            "tiles_filtered": self.tiles_filtered, "tiles_total": self.tiles_total,
            "comparisons": [{"what": c.what, "error": finite_or_none(c.error), "allowed": c.allowed, "ok": c.ok,
                             "detail": c.detail} for c in self.comparisons],
        }


def device_precisions(device: torch.device) -> list[str]:
    """Names from aot_compile.PRECISIONS this device runs: TF32 and bf16 tiles need sm_80 or newer on a GPU."""
    if device.type != "cuda":
        return ["fp32", "bf16", "fp16"]
    if torch.cuda.get_device_capability(device) >= (8, 0):
        return ["fp32", "tf32x3", "bf16", "fp16"]
    return ["fp32", "fp16"]


def device_impls(device: torch.device) -> list[str]:
    return ["triton", "torch"] if device.type == "cuda" or running_in_interpreter() else ["torch"]


def run_check(record: CheckRecord, check, *args, **kwargs) -> CheckRecord:
    try:
        record.comparisons = check(*args, **kwargs)
    except Exception as error:  # a check that crashes (a kernel that fails to build or launch) is a failed check
        last = traceback.extract_tb(error.__traceback__)[-1]
        record.error = f"{type(error).__name__}: {str(error).strip()[:300]} ({last.filename}:{last.lineno})"
    return record


def correctness_records(device: torch.device, case_names: set[str] | None, progress) -> list[CheckRecord]:
    records = []
    for impl in device_impls(device):
        for case in LOGPROB_CASES:
            if case_names and case.name not in case_names:
                continue
            for precision in device_precisions(device):
                dtype, fp32_precision = PRECISIONS[precision]
                for op, check in (("token_logps", checks.check_token_logps),
                                  ("sequence_logps", checks.check_sequence_logps)):
                    record = CheckRecord(str(device), impl, op, str(case), precision)
                    with count_filtered_tiles() as tiles:
                        records.append(run_check(record, check, case, dtype, impl, device,
                                                 fp32_precision=fp32_precision))
                    record.tiles_filtered, record.tiles_total = tiles.skipped, tiles.total
                    progress(record)
        for case in LOSS_CASES:
            if case_names and case.name not in case_names:
                continue
            for precision in LOSS_DTYPES:
                if precision not in device_precisions(device):
                    continue
                record = CheckRecord(str(device), impl, "dama_sigmoid_loss", str(case), precision)
                records.append(run_check(record, checks.check_dama_sigmoid_loss, case, PRECISIONS[precision][0],
                                         impl, device))
                progress(record)
    return records


def time_ms(fn, device: torch.device) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on a GPU, wall clock over a few runs on the CPU."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()  # warm-up
    times = []
    while len(times) < 3 or (len(times) < 20 and sum(times) < 1.0):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def timing_record(device: torch.device, case) -> dict:
    """Forward + backward of sequence_logps (impl="auto") and of the full-logits head on the same inputs."""
    precision = "bf16" if device.type == "cuda" and "bf16" in device_precisions(device) else "fp32"
    inputs = checks.make_logprob_inputs(case, PRECISIONS[precision][0], device)
    seq_ids, num_seqs = checks.packed_seq_ids(case.num_tokens, device)
    hidden, weight = (t.detach().requires_grad_(True) for t in (inputs.hidden, inputs.weight))
    labels, ignore_index, bias = inputs.labels, case.ignore_index, inputs.bias
    supervised = labels != ignore_index
    safe_labels = torch.where(supervised, labels, 0)

    def ours():
        logps = sequence_logps(hidden, weight, labels, seq_ids, num_seqs, bias=bias, ignore_index=ignore_index)
        torch.autograd.grad(logps.sum(), (hidden, weight))

    def full_logits():
        logits = torch.nn.functional.linear(hidden, weight, bias).float()  # (N, V)
        token = logits.log_softmax(-1).gather(1, safe_labels[:, None])[:, 0] * supervised
        logps = torch.zeros(num_seqs, device=device).index_add(0, seq_ids, token)
        torch.autograd.grad(logps.sum(), (hidden, weight))

    ours_ms, full_ms = time_ms(ours, device), time_ms(full_logits, device)
    useful_flops = 6 * int(supervised.sum()) * case.hidden_size * case.vocab_size
    return {"device": str(device), "case": str(case), "precision": precision, "ours_ms": ours_ms,
            "full_logits_ms": full_ms, "ours_tflops": useful_flops / ours_ms / 1e9}


def timed(device: torch.device, case) -> dict:
    """timing_record, or the error that stopped it (the checks report the kernel's failure; the run goes on)."""
    try:
        return timing_record(device, case)
    except Exception as error:  # reported on the timing line instead of ending the run before the table
        return {"device": str(device), "case": str(case), "error": f"{type(error).__name__}: {str(error)[:200]}"}


def device_header(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device}: {'Triton interpreter and ' if running_in_interpreter() else ''}chunked torch path"
    capability = torch.cuda.get_device_capability(device)
    blocks = []
    for precision in ("bf16", "fp32"):
        dtype = PRECISIONS[precision][0]
        chosen = [linear_logprob_blocks(kind, capability, dtype) for kind in KINDS]
        shown = " / ".join(f"{b.block_n}x{b.block_v}x{b.block_h} w{b.num_warps} s{b.num_stages}" for b in chosen)
        blocks.append(f"{precision} {shown}")
    return (f"{device}: {torch.cuda.get_device_name(device)}, sm_{capability[0]}{capability[1]}; blocks forward / "
            f"backward: {'; '.join(blocks)}")


def format_checks(records: list[CheckRecord]) -> str:
    """One row per (device, impl, op, case), one column per precision: the worst error / allowed (<= 1 passes)."""
    precisions = [p for p in PRECISIONS if any(r.precision == p for r in records)]
    rows: dict[tuple, dict[str, CheckRecord]] = {}
    for record in records:
        rows.setdefault((record.device, record.impl, record.op, record.case), {})[record.precision] = record
    header = f"{'device':<8} {'impl':<7} {'op':<18} {'case':<34}" + "".join(f"{p:>9}" for p in precisions)
    lines = [header, "-" * len(header)]
    for (device, impl, op, case), cells in rows.items():
        line = f"{device:<8} {impl:<7} {op:<18} {case:<34}"
        for precision in precisions:
            record = cells.get(precision)
            cell = "-" if record is None else f"{record.worst_ratio:.2f}" if record.ok else "FAIL"
            line += f"{cell:>9}"
        lines.append(line)
    return "\n".join(lines)


def format_filtering(records: list[CheckRecord]) -> str:
    """One line: per precision, the d_logits tiles the log-prob checks' backwards filtered at the default thresholds."""
    parts = []
    for precision in PRECISIONS:
        chosen = [r for r in records if r.precision == precision and r.tiles_total]
        if chosen:
            filtered, total = sum(r.tiles_filtered for r in chosen), sum(r.tiles_total for r in chosen)
            parts.append(f"{precision} {filtered} of {total} ({100 * filtered / total:.0f}%)")
    return "gradient filtering, d_logits tiles filtered in the checks above: " + ", ".join(parts) if parts else ""


def format_timing(timing: dict) -> str:
    if "error" in timing:
        return f"timing {timing['device']:<8} {timing['case']:<34} failed: {timing['error']}"
    speedup = timing["full_logits_ms"] / timing["ours_ms"]
    return (f"timing {timing['device']:<8} {timing['case']:<34} {timing['precision']}: sequence_logps fwd+bwd "
            f"{timing['ours_ms']:9.3f} ms ({timing['ours_tflops']:.3g} TFLOP/s useful), full logits "
            f"{timing['full_logits_ms']:9.3f} ms: {speedup:.2f}x the full-logits speed")


def format_compile(records: list[dict]) -> str:
    header = (f"{'kernel':<28} {'target':<6} {'prec':<6} {'variant':<18} {'blocks':<18} {'shared KiB':>16} "
              f"{'regs':>5} {'stack B':>7} {'tensor cores':>12}  status")
    lines = [header, "-" * len(header)]
    for r in records:
        shared = "-" if r["shared_bytes"] is None else (
            f"{r['shared_bytes'] / KIB:.0f} / {r['shared_limit_bytes'] / KIB:.0f}")
        registers = "-" if r["registers"] is None else str(r["registers"])
        stack = "-" if r["stack_bytes"] is None else str(r["stack_bytes"])
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        lines.append(f"{r['kernel']:<28} {r['target']:<6} {r['precision']:<6} {r['variant']:<18} {r['blocks']:<18} "
                     f"{shared:>16} {registers:>5} {stack:>7} {r['tensor_cores']:>12}  {status}")
    return "\n".join(lines)


def compile_only(args) -> int:
    targets = args.arch.split(",")
    if running_in_interpreter():
        # The interpreter replaced the kernels with Python stand-ins when triton was imported: compile in a process
        # that starts without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [sys.executable, "-m", "dama_kernels.selftest", *compile_only_argv(args)]
        return subprocess.run(command, env=env).returncode
    from .aot_compile import compile_targets

    started = time.perf_counter()
    records = compile_targets(targets, args.jobs)
    failed = [r for r in records if r["status"] == "failed"]
    skipped = [r for r in records if r["status"] == "skipped"]
    if args.json:
        print(json.dumps({"triton": triton.__version__, "records": records}, indent=1))
    else:
        print(f"ahead-of-time compile with triton {triton.__version__} for {', '.join(targets)}")
        print(format_compile(records))
        print(f"{len(records) - len(failed) - len(skipped)} compiled and within limits, {len(failed)} failed, "
              f"{len(skipped)} skipped, in {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


def compile_only_argv(args) -> list[str]:
    """The command line of a compile-only run, for the child process that runs it without the interpreter."""
    command = ["--compile-only", "--arch", args.arch]
    if args.jobs:
        command += ["--jobs", str(args.jobs)]
    return command + (["--json"] if args.json else [])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dama selftest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", action="append", default=None,
                        help="device to check (repeatable), e.g. cuda:1 or cpu; default: every CUDA device, else cpu")
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names to run (default: all): "
                             + ", ".join(c.name for c in (*LOGPROB_CASES, *LOSS_CASES)))
    parser.add_argument("--no-timing", action="store_true", help="skip the timing lines")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: a fresh one)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--compile-only", action="store_true",
                        help="only compile every Triton kernel for the --arch targets (no GPU needed)")
    parser.add_argument("--arch", default=",".join(TARGETS), help=f"targets for --compile-only, among {list(TARGETS)}")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU core)")
    args = parser.parse_args(argv)
    unknown = [t for t in args.arch.split(",") if t not in TARGETS]
    if unknown:
        parser.error(f"unknown --arch {unknown}; choose from {', '.join(TARGETS)}")
    known_cases = {c.name for c in (*LOGPROB_CASES, *LOSS_CASES)}
    if args.cases:
        unknown = set(args.cases.split(",")) - known_cases
        if unknown:
            parser.error(f"unknown --cases {sorted(unknown)}; choose from {', '.join(sorted(known_cases))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_only:
        return compile_only(args)
    devices = [torch.device(d) for d in args.device] if args.device else (
        [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [torch.device("cpu")])
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    case_names = set(args.cases.split(",")) if args.cases else None
    say = (lambda *_: None) if args.json else print
    say(f"dama selftest: torch {torch.__version__}, triton {triton.__version__}, seed {seed}")

    def progress(record: CheckRecord) -> None:
        if not args.json:
            print(f"  {'ok  ' if record.ok else 'FAIL'} {record.device} {record.impl} {record.op} {record.case} "
                  f"{record.precision}", file=sys.stderr, flush=True)

    records, timings = [], []
    for device in devices:
        say(device_header(device))
        # Triton launches on the current CUDA device, so it must be the one the tensors live on.
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            records += correctness_records(device, case_names, progress)
            if not args.no_timing:
                timings += [timed(device, case) for case in LOGPROB_CASES if not case_names or case.name in case_names]
    failed_checks = [r for r in records if not r.ok]
    failures = [r.failure() for r in failed_checks]
    failures += [f"{t['device']} timing {t['case']}: {t['error']}" for t in timings if "error" in t]
    if args.json:
        print(json.dumps({"seed": seed, "torch": torch.__version__, "triton": triton.__version__,
                          "checks": [r.as_json() for r in records], "timings": timings, "failures": failures},
                         indent=1))
    else:
        print(format_checks(records))
        filtering = format_filtering(records)
        if filtering:
            print(filtering)
        for timing in timings:
            print(format_timing(timing))
        for failure in failures:
            print(f"FAILED {failure}")
        print(f"{len(records) - len(failed_checks)} of {len(records)} checks passed (seed {seed})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

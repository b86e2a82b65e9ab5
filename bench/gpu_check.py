"""One prepared check of the whole project on one GPU, within 9 3/4 minutes on an H100 or H200 (bench/gpu_check.sh).

Runs, in order, each in its own process with its share of the time budget:
  1. `dama selftest`: the kernels' values and gradients against float64 references on this GPU;
  2. the CUDA tests of packed attention (PyTorch's varlen kernel, and flash-attn's when installed, against the float64
     reference; the policy's forward and backward with host syncs made errors);
  3. `python -m bench.loss_head --shapes 4096`: the fused head (with gradient filtering and without, dama_exact)
     against the full-logits head and liger's at H 4096, on inputs whose softmax is flat (loss_head_<gpu>.json,
     comparable with earlier runs);
  4. the same with `--logits peaked` (loss_head_peaked_<gpu>.json), liger aside: inputs whose softmax is like a
     trained head's, on which the share of d_logits tiles that the backward's gradient filtering drops is measured;
  5. `python -m bench.kept_products`: one chunk of the filtered backward's two gradient products, cuBLAS's dense
     matmuls against the Triton products over the kept d_logits tiles at kept shares 1.0 down to 0.1, giving the
     share below which the Triton ones are faster (kept_products_<gpu>.json); alternative blocks while time is left;
  6. `python -m bench.end_to_end` at LLaVA-1.5-7B's width (hidden 4096, MLP 11008, 32 heads, V 32064, 576 image
     tokens, bf16, 4 pairs per step) with 8 decoder layers: dama_prefix_shared, dama (packed), padded_full_logits,
     dama_dpo and trl_dpo, reporting pairs/s, tokens/s, peak CUDA memory and model FLOP utilisation against the bf16
     matmul peak measured in the same run.
Records go to OUTPUT_DIR/<name>_<gpu>.json (gpu: the device's name in short, e.g. h200), every step's output to
OUTPUT_DIR/gpu_check_<gpu>.log, the summary to OUTPUT_DIR/gpu_check_<gpu>.json; the end prints a table of the steps,
the end-to-end table, the targets, and what was skipped and why.

Environment: the stock PyTorch image plus the project's pure-Python dependencies (README, "Installing into an existing
CUDA environment"); missing optional packages (trl, liger-kernel, flash-attn) skip their parts with the reason.
--dry-run runs the CPU-possible parts on a tiny shape (argument handling, the end-to-end records, the summary), so
that `make test` checks the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .end_to_end_report import format_table, format_targets
from .environment import REPO_ROOT, git_state

DEFAULT_OUTPUT_DIR = REPO_ROOT / "bench" / "results"
BUDGET_S = 585
# LLaVA-1.5-7B's width (hidden 4096, head dim 128: 32 heads; MLP 11008 follows from the hidden size), 8 layers.
END_TO_END_GPU = ["--device", "cuda", "--dtype", "bf16", "--hidden-size", "4096", "--head-dim", "128",
                  "--vocab-size", "32064", "--layers", "8", "--pairs", "4", "--rounds", "1"]
# The dry run: the same code on a shape the CPU runs in seconds.
END_TO_END_DRY = ["--device", "cpu", "--hidden-size", "32", "--layers", "1", "--pairs", "2", "--vocab-size", "503",
                  "--rounds", "1", "--warmup", "0", "--steps", "1", "--threads", "1",
                  "--providers", "dama_prefix_shared", "trl_dpo"]


@dataclass
class Step:
    """One part of the check: its command, its share of the budget, the records it writes."""

    name: str
    command: list[str]
    timeout_s: int
    records: Path | None = None
    status: str = "pending"
    reason: str = ""
    seconds: float = 0.0
    tail: list[str] = field(default_factory=list)


def gpu_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200': the short name in the records' file names."""
    words = [w for w in re.split(r"[^a-z0-9]+", device_name.lower()) if w and w not in ("nvidia", "tesla", "geforce")]
    return words[0] if words else "gpu"


def plan(args: argparse.Namespace, gpu: str) -> list[Step]:
    """The steps of a run, with their commands and time shares."""
    out = args.output_dir
    python = sys.executable
    if args.dry_run:
        records = out / f"end_to_end_{gpu}.json"
        return [Step("end_to_end", [python, "-m", "bench.end_to_end", *END_TO_END_DRY, "--output", str(records)],
                     args.budget_s, records)]
    return [
        Step("selftest", [python, "-m", "dama.cli", "selftest", "--device", "cuda", "--json"], 75,
             out / f"selftest_{gpu}.json"),
        Step("attention_tests", [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                 "tests/test_attention_kernels.py", "tests/test_step_syncs.py"], 90),
        Step("loss_head", [python, "-m", "bench.loss_head", "--shapes", "4096", "--output",
                           str(out / f"loss_head_{gpu}.json")], 100, out / f"loss_head_{gpu}.json"),
        # Shorter: the Triton kernels are compiled and cached by the step before.
        Step("loss_head_peaked", [python, "-m", "bench.loss_head", "--shapes", "4096", "--logits", "peaked",
                                  "--providers", "naive", "dama", "dama_exact",
                                  "--output", str(out / f"loss_head_peaked_{gpu}.json")], 75,
             out / f"loss_head_peaked_{gpu}.json"),
        # Alternative blocks are started only within 20 s of torch being imported (each takes about 3 s: two
        # compiles and ten timings), so that the run ends within its share; what it measured is on file after every
        # stage.
        Step("kept_products", [python, "-m", "bench.kept_products", "--time-limit-s", "20", "--output",
                               str(out / f"kept_products_{gpu}.json")], 35, out / f"kept_products_{gpu}.json"),
        Step("end_to_end", [python, "-m", "bench.end_to_end", *END_TO_END_GPU, "--warmup", "2", "--steps",
                            str(args.steps), "--output", str(out / f"end_to_end_{gpu}.json")], 210,
             out / f"end_to_end_{gpu}.json"),
    ]


DRY_RUN_SKIPS = {
    "selftest": "dry run: the kernels' GPU checks need CUDA",
    "attention_tests": "dry run: the attention kernels' tests need CUDA (make test runs their CPU parts)",
    "loss_head": "dry run: --shapes 4096 is sized for a GPU",
    "loss_head_peaked": "dry run: --shapes 4096 is sized for a GPU",
    "kept_products": "dry run: a chunk of LLaVA-1.5-7B's head is sized for a GPU (make test runs its --dry-run)",
}


def run_step(step: Step, log, remaining_s: float) -> None:
    """Runs one step within min(its share, the time left), logging its output; sets its status."""
    timeout = min(step.timeout_s, remaining_s)
    if timeout < 10:
        step.status, step.reason = "skipped", "no time left in the budget"
        return
    started = time.perf_counter()
    log.write(f"\n===== {step.name}: {' '.join(step.command)}\n")
    log.flush()
    try:
        done = subprocess.run(step.command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        step.status, step.reason = "timed out", f"stopped after {timeout:.0f} s"
        step.tail = output.splitlines()[-5:]
        log.write(output)
    else:
        log.write(done.stdout + done.stderr)
        step.tail = (done.stdout + done.stderr).splitlines()[-5:]
        if done.returncode == 0:
            step.status = "ok"
        else:
            step.status, step.reason = "failed", f"exit status {done.returncode}"
        if step.name == "selftest" and step.records is not None:
            step.records.write_text(done.stdout)
    step.seconds = time.perf_counter() - started


def skipped_parts(steps: list[Step]) -> list[str]:
    """What was not measured, and why: skipped steps, providers and tests the steps' own outputs name."""
    lines = [f"{s.name}: {s.reason}" for s in steps if s.status in ("skipped", "timed out", "failed")]
    for step in steps:
        if step.name == "end_to_end" and step.records is not None and step.records.exists():
            for record in json.loads(step.records.read_text()):
                if record["status"] != "ok":
                    lines.append(f"end_to_end {record['provider']}: {record['reason']}")
        lines += [f"{step.name}: {line.removeprefix('SKIPPED ')}" for line in step.tail if line.startswith("SKIPPED")]
    return lines


def format_steps(steps: list[Step]) -> str:
    rows = ["| step | status | seconds | note |", "|---|---|---|---|"]
    for step in steps:
        note = step.reason or (step.tail[-1] if step.tail else "")
        rows.append(f"| {step.name} | {step.status} | {step.seconds:.0f} | {note} |")
    return "\n".join(rows)


def write_summary(path: Path, gpu: str, steps: list[Step], skipped: list[str], dry_run: bool) -> None:
    """The run's summary record, written atomically."""
    summary = {"gpu": gpu, "dry_run": dry_run, "steps": [asdict(s) | {"command": " ".join(s.command),
                                                                      "records": s.records and str(s.records)}
                                                         for s in steps],
               "skipped": skipped, **git_state()}
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(partial, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help=f"folder of the records and the log (default {DEFAULT_OUTPUT_DIR.relative_to(REPO_ROOT)})")
    parser.add_argument("--gpu", default=None,
                        help="short GPU name in the file names (default: from the device's name, e.g. h200)")
    parser.add_argument("--steps", type=int, default=4,
                        help="timed end-to-end steps per provider after 2 warm-up steps (default 4)")
    parser.add_argument("--budget-s", type=int, default=BUDGET_S,
                        help=f"time budget of the whole check in seconds (default {BUDGET_S})")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: run the CPU-possible parts on a tiny shape (what make test runs)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.budget_s < 60:
        parser.error(f"--steps must be >= 1 and --budget-s >= 60, got {args.steps} and {args.budget_s}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch here; run it on a GPU machine, or with --dry-run to "
              "check the script on the CPU", file=sys.stderr)
        return 1
    gpu = args.gpu or ("cpu-dry-run" if args.dry_run else gpu_slug(torch.cuda.get_device_name()))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    steps = plan(args, gpu)
    started = time.perf_counter()
    with open(args.output_dir / f"gpu_check_{gpu}.log", "w") as log:
        for step in steps:
            run_step(step, log, args.budget_s - (time.perf_counter() - started))
            print(f"{step.name}: {step.status} ({step.seconds:.0f} s){' ' + step.reason if step.reason else ''}",
                  file=sys.stderr, flush=True)
    if args.dry_run:
        steps = [Step(name, [], 0, status="skipped", reason=reason) for name, reason in DRY_RUN_SKIPS.items()] + steps
    skipped = skipped_parts(steps)
    write_summary(args.output_dir / f"gpu_check_{gpu}.json", gpu, steps, skipped, args.dry_run)

    print(format_steps(steps))
    end_to_end = next(s for s in steps if s.name == "end_to_end")
    if end_to_end.records is not None and end_to_end.records.exists():
        records = json.loads(end_to_end.records.read_text())
        print(format_table(records))
        print(format_targets(records))
    print("skipped:" if skipped else "skipped: nothing")
    for line in skipped:
        print(f"- {line}")
    print(f"{time.perf_counter() - started:.0f} s of a {args.budget_s} s budget; records and log in {args.output_dir}")
    return 0 if all(s.status in ("ok", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())

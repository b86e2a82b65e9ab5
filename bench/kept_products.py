"""At what share of kept d_logits tiles do the filtered backward's Triton products beat cuBLAS's dense ones?

The decision it informs: with gradient filtering (filter_eps > 0, the default for 16-bit inputs), the fused head's
backward can multiply only the d_logits tiles the filter kept, with two Triton kernels
(dama_kernels.linear_logprob_kept_tiles), or run the two dense cuBLAS matmuls, which cost as much for a zero tile as
for any other. The Triton products win once enough tiles are filtered and lose where nearly every tile is kept, as on
the flat and peaked inputs of bench/loss_head.py. DamaTrainer counts the filtered tiles of each logging window and
has the next window skip them from dama_kernels.grad_filter.KEPT_PRODUCTS_MIN_SHARE on (set to 0.5 without a
measurement); one minus the crossover kept share measured here is the value it should take.

What is measured, on one chunk of LLaVA-1.5-7B's head (C = backward_chunk_rows(V, dtype) rows, 2048 for bf16;
H 4096, V 32064): for each kept share s (--shares), a random tile map over the d_logits kernel's tiles on this GPU
(128 x 256 on sm_90 with 16-bit inputs, 128 x 128 elsewhere) with exactly round(s x tiles) tiles kept, drawn with
--seed, and random d_logits (C, V) zero in the filtered tiles. Side by side, on the same operands:
  cublas            d_hidden = torch.mm(d_logits, W, out=...), d_weight = torch.mm(d_logits.T, h, out=...): the
                    backward's unfiltered products, under its fp32 partial sums;
  kept              kept_tiles(tile map), then the Triton d_hidden and d_weight over the kept tiles with the
                    launcher's blocks (dama_kernels.launch_config.kept_product_blocks), the vocabulary in its order;
  kept_vocab_order  the same through a vocabulary order (a random permutation), as the backward runs them: it always
                    passes one when it filters. This is the variant the conclusion is drawn from;
  kept_candidate    the same with each of a few alternative blocks (bench.kept_products_timing.CANDIDATE_BLOCKS); one
                    that does not build or launch here is reported skipped with the reason.
Each part (kept_tiles, d_hidden, d_weight) is timed alone with triton.testing.do_bench (median, L2 cleared before each
call) and a variant's time is their sum. Reported per share and variant: the times, the ratio to cuBLAS's time,
useful TFLOP/s (4 C H V x kept share / time: the work that is not multiplying zeros) and, for the Triton products,
the largest error against cuBLAS's result relative to its largest entry (both round fp32 sums once to the dtype, so
16-bit results agree within a unit or so in the last place), so that a fast but wrong kernel shows. The last line,
"conclusion:", gives the crossover: the share where the ratio of kept_vocab_order to cuBLAS crosses 1.0, interpolated
linearly between the two shares measured around it; the line before it, the same for the fastest blocks measured at
each share. The exit status is 1 if the launcher's blocks failed to build or launch (recorded with the reason).

Records go to --output as JSON (the run's shape, tile map, blocks, versions, git commit, records and conclusion),
rewritten after each stage so that a run stopped from outside keeps what it measured: every share's cuBLAS and
launcher records first, then the candidates one by one, which --time-limit-s can cut short.

Without CUDA, --dry-run runs the same code at a tiny shape (C 150, H 40, V 300) under the Triton interpreter, with the
interpreter's blocks and time.perf_counter instead of do_bench: its times say nothing, its records and errors show
that the code runs and agrees with torch (what bench/test_kept_products.py checks).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .dtypes import DTYPES
from .environment import REPO_ROOT, git_state

DEFAULT_SHARES = (1.0, 0.75, 0.5, 0.25, 0.1)
# LLaVA-1.5-7B's head.
HIDDEN_SIZE, VOCAB_SIZE = 4096, 32064
# (C, H, V) of --dry-run: larger than the interpreter's blocks and not multiples of them, so edge tiles are masked.
DRY_RUN_SHAPE = (150, 40, 300)
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_OUTPUT = RESULTS_DIR / "kept_products.json"
# Kept apart, so that a dry run never replaces a GPU run's records.
DEFAULT_DRY_RUN_OUTPUT = RESULTS_DIR / "kept_products_dry_run.json"
DECIDING_VARIANT = "kept_vocab_order"


def crossover_share(points: list[tuple[float, float]]) -> float | None:
    """The share at which the ratio kept/cuBLAS crosses 1.0, from (share, ratio) points: linear between the two
    shares around the crossing, the first one met going down from the largest share; None if no two neighbours lie
    on either side of 1.0."""
    ordered = sorted(points, reverse=True)
    for (share_high, ratio_high), (share_low, ratio_low) in itertools.pairwise(ordered):
        if (ratio_high - 1.0) * (ratio_low - 1.0) <= 0 and ratio_high != ratio_low:
            return share_low + (1.0 - ratio_low) * (share_high - share_low) / (ratio_high - ratio_low)
    return None


def ratio_points(records: list[dict], variant: str) -> list[tuple[float, float]]:
    """(share, ratio to cuBLAS) of one variant's timed records."""
    return [(r["share"], r["ratio_vs_cublas"]) for r in records if r["variant"] == variant and r["status"] == "ok"]


def fastest_points(records: list[dict]) -> list[tuple[float, float]]:
    """(share, lowest ratio to cuBLAS) over the Triton variants that run through the vocabulary order."""
    best: dict[float, float] = {}
    for share, ratio in ratio_points(records, DECIDING_VARIANT) + ratio_points(records, "kept_candidate"):
        best[share] = min(ratio, best.get(share, ratio))
    return sorted(best.items())


def describe_crossover(points: list[tuple[float, float]], label: str) -> str:
    """One line on where the Triton products of `label` beat cuBLAS, from (share, ratio) points."""
    if not points:
        return f"{label}: nothing measured"
    ordered = sorted(points, reverse=True)
    ends = ", ".join(f"{ratio:.2f}x cuBLAS's time at share {share:g}" for share, ratio in dict.fromkeys(
        (ordered[0], ordered[-1])))
    crossing = crossover_share(points)
    if crossing is not None:
        below = next((ratio for share, ratio in ordered if share < crossing), ordered[-1][1]) < 1.0
        return (f"crossover at a kept share of {crossing:.2f}: {label} beat cuBLAS {'below' if below else 'above'} "
                f"it ({ends})")
    if all(ratio < 1.0 for _, ratio in points):
        return f"no crossover: {label} beat cuBLAS at every share measured ({ends})"
    return f"no crossover: cuBLAS beats {label} at every share measured ({ends})"


def conclusions(records: list[dict]) -> dict:
    """The run's conclusion (the launcher's blocks through the vocabulary order, as the backward runs them) and the
    same for the fastest blocks measured at each share, None without timed candidates."""
    timed_candidates = any(r["variant"] == "kept_candidate" and r["status"] == "ok" for r in records)
    return {
        "conclusion": describe_crossover(ratio_points(records, DECIDING_VARIANT),
                                         "the kept-tile products (launcher's blocks, vocabulary order)"),
        "crossover_share": crossover_share(ratio_points(records, DECIDING_VARIANT)),
        "conclusion_fastest_blocks": describe_crossover(fastest_points(records),
                                                        "the fastest blocks measured at each share")
        if timed_candidates else None,
        "crossover_share_fastest_blocks": crossover_share(fastest_points(records)) if timed_candidates else None,
    }


def _blocks_text(record: dict) -> str:
    if record.get("candidate"):
        return record["candidate"]
    if not record.get("blocks"):
        return "-"
    texts = [f"{b['block_out']}x{b['block_hidden']}x{b['block_k']} w{b['num_warps']} s{b['num_stages']}"
             for b in record["blocks"].values()]
    return texts[0] if len(set(texts)) == 1 else " / ".join(texts)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(records: list[dict]) -> str:
    """One row per share and variant; a record not timed once per variant and blocks, with its reason."""
    header = (f"{'share':>5} {'kept tiles':>11}  {'variant':<16} {'blocks (d_hidden / d_weight)':<34} "
              f"{'lists ms':>8} {'d_hidden':>8} {'d_weight':>8} {'total ms':>8} {'/cuBLAS':>7} {'TFLOP/s':>7} "
              f"{'err d_hidden':>12} {'err d_weight':>12}")
    lines, untimed = [header], set()
    for r in records:
        if r["status"] != "ok":
            if (r["variant"], _blocks_text(r)) not in untimed:
                untimed.add((r["variant"], _blocks_text(r)))
                lines.append(f"{'':>5} {'':>11}  {r['variant']:<16} {_blocks_text(r):<34} {r['status']}: "
                             f"{r['reason']}")
            continue
        errors = [f"{r[key]:12.1e}" if key in r else f"{'-':>12}" for key in ("d_hidden_rel_err", "d_weight_rel_err")]
        lines.append(f"{r['share']:5.2f} {r['tiles_kept']:>5}/{r['tiles']:<5}  {r['variant']:<16} "
                     f"{_blocks_text(r):<34} {_ms(r.get('kept_tiles_ms')):>8} {_ms(r['d_hidden_ms']):>8} "
                     f"{_ms(r['d_weight_ms']):>8} {_ms(r['ms']):>8} {r['ratio_vs_cublas']:7.2f} "
                     f"{r['useful_tflops']:7.1f} {' '.join(errors)}")
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    """Written whole or not at all: a run stopped mid-write keeps the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(partial, path)


def parse_shares(values: list[str], parser: argparse.ArgumentParser) -> list[float]:
    shares = []
    for value in values:
        try:
            share = float(value)
        except ValueError:
            parser.error(f"--shares takes numbers in (0, 1], got {value!r}")
        if not 0.0 < share <= 1.0:
            parser.error(f"--shares must lie in (0, 1] (the share of d_logits tiles kept), got {value}")
        shares.append(share)
    if len(set(shares)) != len(shares):
        parser.error(f"--shares lists a share twice: {' '.join(values)}")
    return shares


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.kept_products", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shares", nargs="+", default=[str(s) for s in DEFAULT_SHARES], metavar="SHARE",
                        help="shares of d_logits tiles kept, each in (0, 1] (default "
                             f"{' '.join(str(s) for s in DEFAULT_SHARES)})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="dtype of hidden states, weight and d_logits (default bf16); C follows from it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tile maps, operands and order (default 0)")
    parser.add_argument("--candidates", type=int, default=None, metavar="K",
                        help="time the first K of the alternative blocks, 0 for none (default all)")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="start no alternative blocks after this many seconds of the run, counted once torch is "
                             "imported; those left are recorded as skipped (cuBLAS and the launcher's blocks are "
                             "always measured)")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"JSON file of the records (default {DEFAULT_OUTPUT.relative_to(REPO_ROOT)}; with "
                             f"--dry-run {DEFAULT_DRY_RUN_OUTPUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"no GPU needed: the same code at C, H, V = {DRY_RUN_SHAPE} under the Triton "
                             "interpreter, timed with time.perf_counter (the tests' run)")
    args = parser.parse_args(argv)
    args.shares = parse_shares(args.shares, parser)
    if args.candidates is not None and args.candidates < 0:
        parser.error(f"--candidates must be >= 0, got {args.candidates}")
    if args.output is None:
        args.output = DEFAULT_DRY_RUN_OUTPUT if args.dry_run else DEFAULT_OUTPUT
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if args.dry_run:
        if "dama_kernels" in sys.modules and not interpreting:
            print("bench.kept_products: --dry-run needs the Triton interpreter, chosen before dama_kernels is "
                  "imported; run it as its own process: python -m bench.kept_products --dry-run", file=sys.stderr)
            return 1
        os.environ["TRITON_INTERPRET"] = "1"
    elif interpreting:
        print("bench.kept_products: TRITON_INTERPRET=1 would run the GPU shape in the interpreter; unset it, or add "
              "--dry-run", file=sys.stderr)
        return 1
    elif not torch.cuda.is_available():
        print("bench.kept_products: no CUDA device is visible to torch here; run it on a GPU machine, or with "
              "--dry-run to run it at a tiny shape under the Triton interpreter", file=sys.stderr)
        return 1
    started = time.perf_counter()
    # Imported only now: dama_kernels builds its kernels for the interpreter or the GPU when first imported.
    import triton

    from dama_kernels.linear_logprob_backward import backward_chunk_rows

    from . import kept_products_timing as timing

    dtype = DTYPES[args.dtype]
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        shape = timing.ChunkShape(*DRY_RUN_SHAPE)
    else:
        shape = timing.ChunkShape(backward_chunk_rows(VOCAB_SIZE, dtype), HIDDEN_SIZE, VOCAB_SIZE)
    run_fields = {
        "benchmark": "kept_products", "dry_run": args.dry_run,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "Triton interpreter (CPU)",
        "dtype": args.dtype, "C": shape.rows, "H": shape.hidden_size, "V": shape.vocab_size, "seed": args.seed,
        "timing": ("triton.testing.do_bench median, L2 cleared before each call, "
                   f"warmup {timing.WARMUP_MS} ms, rep {timing.REP_MS} ms" if device.type == "cuda" else
                   f"time.perf_counter, median of {timing.INTERPRETER_CALLS} call(s) per part (Triton interpreter)"),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(), **git_state(),
    }
    payload = {}

    def save(records: list[dict], setup_fields: dict) -> None:
        payload.clear()
        payload.update(**run_fields, **setup_fields, **conclusions(records), records=records)
        write_json(args.output, payload)

    deadline = started + args.time_limit_s if args.time_limit_s is not None else float("inf")
    candidates = timing.CANDIDATE_BLOCKS[: args.candidates]
    timing.run_benchmark(shape, dtype, device, args.shares, args.seed, candidates, deadline, save)

    print(f"Kept-tile products against cuBLAS on {payload['device_name']}, {args.dtype}, C {shape.rows} H "
          f"{shape.hidden_size} V {shape.vocab_size}, d_logits tiles {payload['map_tile'][0]} x "
          f"{payload['map_tile'][1]} ({payload['tile_grid'][0]} x {payload['tile_grid'][1]}); {payload['timing']}")
    print(format_table(payload["records"]))
    print(f"{time.perf_counter() - started:.0f} s; torch {torch.__version__}, triton {triton.__version__}, commit "
          f"{run_fields['git_commit']}{' (dirty)' if run_fields['git_dirty'] else ''}; records in {args.output}")
    if payload["conclusion_fastest_blocks"]:
        print(f"fastest blocks: {payload['conclusion_fastest_blocks']}")
    # Last, so that bench/gpu_check.py's table of steps shows it.
    print(f"conclusion: {payload['conclusion']}")
    return 1 if any(r["status"] == "failed" for r in payload["records"]) else 0


if __name__ == "__main__":
    sys.exit(main())

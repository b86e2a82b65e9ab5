"""`python -m bench.method_comparison --seeds 0 1 2`: DAMA against plain DPO on the demo, over several seeds.

Each seed runs `dama demo` whole (its own world, start model, pairs, both trainings; dama.demo.pipeline) and reads
the held-out figures of the start, DPO and DAMA models from its summary: CHAIR_s, CHAIR_i, object recall (greedy
descriptions of the held-out images, judged against their annotations) and reward accuracy on held-out pairs made
from the start model's own answers. The record (`bench/results/method_comparison.json`) holds every seed's figures,
the mean and sample standard deviation per model and metric, the commit and the wall time; the table is printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.environment import REPO_ROOT, git_state

RESULTS = REPO_ROOT / "bench" / "results" / "method_comparison.json"
MODELS = (("start", "start"), ("dpo", "DPO"), ("dama", "DAMA"))
METRICS = (("chair_s", "CHAIR_s"), ("chair_i", "CHAIR_i"), ("recall", "object recall"),
           ("reward_accuracy", "held-out reward acc"))
# Where each model's figure sits in the demo's summary.json; the start model's reward accuracy is 0 by
# construction (the policy is its own reference, every margin 0), so it is left out.
SUMMARY_KEYS = {
    "start": {"chair_s": "eval_chair_s_before", "chair_i": "eval_chair_i_before",
              "recall": "eval_object_recall_before"},
    "dpo": {"chair_s": "dpo_eval_chair_s", "chair_i": "dpo_eval_chair_i", "recall": "dpo_eval_object_recall",
            "reward_accuracy": "dpo_eval_reward_accuracy"},
    "dama": {"chair_s": "eval_chair_s", "chair_i": "eval_chair_i", "recall": "eval_object_recall",
             "reward_accuracy": "eval_reward_accuracy"},
}


def run_seed(output_dir: Path, seed: int) -> dict:
    """One whole demo at `seed` under `output_dir`; returns its summary."""
    from dama.demo.pipeline import DemoSizes, run_demo

    print(f"[method comparison] seed {seed}", flush=True)
    return run_demo(output_dir, DemoSizes(), seed, [])


def seed_figures(summary: dict) -> dict[str, dict[str, float]]:
    """One demo summary as {model: {metric: value}}."""
    return {model: {metric: summary[key] for metric, key in keys.items()} for model, keys in SUMMARY_KEYS.items()}


def aggregate(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {metric: {"mean", "std"}}} over seeds; std is the sample standard deviation (0 for one seed)."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    for model, keys in SUMMARY_KEYS.items():
        result[model] = {}
        for metric in keys:
            values = [figures[model][metric] for figures in per_seed]
            result[model][metric] = {"mean": statistics.fmean(values),
                                     "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return result


def markdown_table(means: dict[str, dict[str, dict[str, float]]]) -> str:
    """Models as rows, metrics as columns, each cell "mean ± std"; "-" where a model has no such figure."""
    lines = ["| held-out | " + " | ".join(title for _, title in METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|"]
    for model, title in MODELS:
        cells = [f"{means[model][metric]['mean']:.3f} ± {means[model][metric]['std']:.3f}"
                 if metric in means[model] else "-" for metric, _ in METRICS]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.method_comparison",
        description="Run `dama demo` once per seed and compare the start, DPO and DAMA models on the held-out "
        "images (CHAIR_s, CHAIR_i, object recall, held-out reward accuracy): mean and standard deviation over the "
        "seeds, written to bench/results/method_comparison.json and printed as a table.",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="demo seeds (default: 0 1 2)")
    parser.add_argument("--output-dir", default="outputs/method_comparison",
                        help="where each seed's demo writes (seed-N/)")
    parser.add_argument("--results", default=str(RESULTS), help="the JSON record to write (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run at once, each in its own process on one thread (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    started = time.perf_counter()
    folders = [Path(args.output_dir) / f"seed-{seed}" for seed in args.seeds]
    if args.jobs == 1:
        summaries = dict(zip(args.seeds, map(run_seed, folders, args.seeds), strict=True))
    else:
        # Spawned, not forked: each demo starts from a fresh interpreter, as `dama demo` does.
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            summaries = dict(zip(args.seeds, pool.map(run_seed, folders, args.seeds), strict=True))
    per_seed = [seed_figures(summary) for summary in summaries.values()]
    means = aggregate(per_seed)
    table = markdown_table(means)
    record = {**git_state(), "seeds": args.seeds, "mean_std": means,
              "per_seed": {str(seed): figures for seed, figures in zip(args.seeds, per_seed, strict=True)},
              "demo_seconds": {str(seed): summary["total_seconds"] for seed, summary in summaries.items()},
              "wall_seconds": time.perf_counter() - started, "table": table}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{table}\n\nseeds {args.seeds} at commit {record['git_commit']}"
          f"{' (uncommitted changes)' if record['git_dirty'] else ''}; wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

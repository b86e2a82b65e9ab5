"""`dama <command> [args]`: one entry point for every step of the pipeline.

Each command lives in its own module as `main(argv) -> int`; this file only maps names to modules, so that
`dama --help` stays fast (nothing heavy is imported until a command runs).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("dama.demo.pipeline", "the whole pipeline on a tiny LLaVA and synthetic data, on the CPU, in minutes"),
    "train": ("dama.training.train", "align a LLaVA model with DAMA (dama train --config configs/<name>.yaml ...)"),
    "make-demo-data": ("dama.demo.data", "write the synthetic demo preference dataset (RLAIF-V parquet format)"),
    "make-pairs": ("dama.evaluation.make_pairs", "preference pairs from a model's own answers, judged by CHAIR"),
    "hardness": ("dama.offline.hardness", "score each pair's hardness with CLIP (offline, once per dataset)"),
    "precompute-ref": ("dama.offline.reference", "run the reference model over a dataset and store its log-probs"),
    "show-example": ("dama.training.show_example", "show one pair as training sees it: tokens, labels, image tokens"),
    "generate": ("dama.evaluation.generate", "answer {image, question} rows with a trained model (JSONL out)"),
    "eval-chair": ("dama.evaluation.chair", "object hallucination: CHAIR and Object HalBench's figures"),
    "benchmark-prompts": ("dama.evaluation.benchmark_prompts", "turn POPE's or AMBER's questions into generate input"),
    "eval-pope": ("dama.evaluation.pope", "score yes/no answers to POPE's object probes (accuracy, F1 per split)"),
    "eval-amber": ("dama.evaluation.amber", "score AMBER responses (CHAIR, Cover, Hal, Cog; yes/no accuracy and F1)"),
    "eval-report": ("dama.evaluation.report", "several models' benchmark reports in one table (Markdown, CSV)"),
    "selftest": ("dama_kernels.selftest", "check the kernels on this machine against float64 before a training run"),
    "plan": ("dama.planning.plan_command", "predict a training config's peak GPU memory per part, before any run"),
    "export": ("dama.training.export", "fold a LoRA run's adapters into its base model (dama export --merge)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS) if COMMANDS else 0
    lines = ["usage: dama <command> [options]   (dama <command> --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dama: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    return importlib.import_module(module_name).main(rest)


if __name__ == "__main__":
    sys.exit(main())

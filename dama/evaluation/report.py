"""`dama eval-report`: the `--json` reports of `dama eval-chair`, `dama eval-amber` and `dama eval-pope` for several
models, as one table laid out like the hallucination papers' (a row per model; lower is better for the
hallucination rates, higher for Cover, recall and F1), in Markdown and CSV.

Columns: Object HalBench Response Hall and Object Hall; AMBER's generative CHAIR, Cover, Hal, Cog and its
discriminative F1; POPE's F1 for each split found (a split file `coco_pope_random.json` gives "POPE random F1").
Figures are percentages with one decimal; a model without a benchmark gets an empty cell. Each report's benchmark is
recognised by its keys.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dama.command import run_command
from dama.data.formats import atomic_path, read_json_file
from dama.errors import DamaError

# (column, benchmark, path of keys in that benchmark's report)
FIXED_COLUMNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Object HalBench Resp. Hall", "object_halbench", ("response_hall",)),
    ("Object HalBench Obj. Hall", "object_halbench", ("object_hall",)),
    ("AMBER CHAIR", "amber", ("generative", "chair")),
    ("AMBER Cover", "amber", ("generative", "cover")),
    ("AMBER Hal", "amber", ("generative", "hal")),
    ("AMBER Cog", "amber", ("generative", "cog")),
    ("AMBER F1", "amber", ("discriminative", "f1")),
)
POPE_PREFIX = "coco_pope_"


def benchmark_of(report: Mapping[str, Any], path: Path) -> str:
    """"object_halbench", "amber" or "pope", from the report's keys; ValueError for anything else."""
    if "response_hall" in report:
        return "object_halbench"
    if "generative" in report or "discriminative" in report:
        return "amber"
    if "splits" in report:
        return "pope"
    raise DamaError(f"{path} is not a report of dama eval-chair, eval-amber or eval-pope (their --json output)")


def read_model_reports(name: str, paths: Sequence[str | Path]) -> dict[str, Mapping[str, Any]]:
    """One model's reports by benchmark; ValueError for a file that is no report or a benchmark given twice."""
    reports: dict[str, Mapping[str, Any]] = {}
    for path in map(Path, paths):
        report = read_json_file(path, "report")
        if not isinstance(report, dict):
            raise DamaError(f"{path} is not a report of dama eval-chair, eval-amber or eval-pope")
        benchmark = benchmark_of(report, path)
        if benchmark in reports:
            raise DamaError(f"model {name!r} has two {benchmark} reports; give one per benchmark")
        reports[benchmark] = report
    return reports


def _pope_split(name: str) -> str:
    return name[len(POPE_PREFIX):] if name.startswith(POPE_PREFIX) else name


def build_table(models: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the table: figures as percent text with one decimal, "" where a model lacks one."""
    splits: list[str] = []
    for reports in models.values():
        for split in reports.get("pope", {}).get("splits", {}):
            if split not in splits:
                splits.append(split)
    header = ["Model", *(column for column, _, _ in FIXED_COLUMNS), *(f"POPE {_pope_split(s)} F1" for s in splits)]
    rows = []
    for name, reports in models.items():
        cells = [name]
        for _, benchmark, keys in FIXED_COLUMNS:
            value: Any = reports.get(benchmark)
            for key in keys:
                value = value.get(key) if isinstance(value, Mapping) else None
            cells.append(_percent(value))
        pope = reports.get("pope", {}).get("splits", {})
        cells += [_percent(pope.get(split, {}).get("f1")) for split in splits]
        rows.append(cells)
    return header, rows


def _percent(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):.1f}"


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell or "-" for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write(path: str, text: str) -> None:
    with atomic_path(path) as temporary:
        Path(temporary).write_text(text, encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dama eval-report",
        description="Put several models' benchmark reports (the --json files of dama eval-chair, eval-amber and "
        "eval-pope) in one table, a row per model: Object HalBench Response/Object Hall, AMBER CHAIR, Cover, Hal, "
        "Cog and F1, POPE F1 per split. Prints Markdown; --markdown and --csv write files.",
    )
    parser.add_argument("--model", action="append", nargs="+", required=True, metavar=("NAME", "REPORT"),
                        help="a row: the model's name, then its report files (any of the three benchmarks, in any "
                        "order); repeat for each model")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="also write the Markdown table to PATH")
    parser.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action() -> str:
        models: dict[str, dict[str, Mapping[str, Any]]] = {}
        for name, *paths in args.model:
            if not paths:
                raise DamaError(f"--model {name}: give its report files after the name")
            if name in models:
                raise DamaError(f"model {name!r} is given twice; one --model per row")
            models[name] = read_model_reports(name, paths)
        header, rows = build_table(models)
        markdown = to_markdown(header, rows)
        if args.markdown is not None:
            _write(args.markdown, markdown)
        if args.csv is not None:
            _write(args.csv, to_csv(header, rows))
        return markdown.rstrip("\n")

    return run_command("eval-report", action)


if __name__ == "__main__":
    sys.exit(main())

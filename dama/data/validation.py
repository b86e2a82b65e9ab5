"""One row check for every step (`dama hardness`, `dama precompute-ref`, `dama train`), run over the whole input
before the first pair is scored or trained on.

A row is bad, for the reason in quotes, when:
- its question, chosen or rejected text is null, absent or not a string: "missing field";
- its chosen or rejected response is empty or only white space: "empty response";
- (steps that read it) its hardness is present but infinite or not a number: "non-finite hardness" (null or NaN means
  "not scored" and is allowed: the pair gets α_D = 1);
- (training on precomputed reference log-probs) its reference sums are null: "missing reference log-probs", or
  infinite or unreadable: "non-finite reference log-probs";
- its image is missing, does not decode completely, or has more than formats.MAX_IMAGE_PIXELS pixels: "missing
  image", "unreadable image", "image over the pixel limit" (the image is decoded exactly as the readers decode it);
- an earlier step left it out: that step's reason, from the `skipped` list of `<input>.meta.json`. Such a row is
  left out whatever `on_bad_row` says, so that a skip in one step never breaks the next;
- (steps that tokenize) it is longer than max_length and overlong="skip": "over-long" (SkipReport.add_overlong).

on_bad_row="error" stops at the first bad row with its id and reason (BadRowError); "skip" leaves bad rows out and
records them in a SkipReport, which counts them by reason and is written to the step's output folder. An input whose
rows are all bad is an error either way (most often a wrong column or file).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from dama.errors import DamaError
from dama.options import BAD_ROW_POLICIES

from .dataset import PreferenceDataset
from .formats import (
    IMAGE_COLUMNS,
    REF_LOGPS_COLUMNS,
    TEXT_COLUMNS,
    RowImageError,
    default_image_folder,
    load_preference_rows,
    metadata_path,
    open_row_image,
    read_metadata,
)
from .row_check_cache import RowVerdict, cached_verdict
from .row_values import stored_reference

MISSING_FIELD = "missing field"
EMPTY_RESPONSE = "empty response"
BAD_HARDNESS = "non-finite hardness"
MISSING_REFERENCE = "missing reference log-probs"
BAD_REFERENCE = "non-finite reference log-probs"
OVERLONG = "over-long"
UPSTREAM = "left out by an earlier step: "
# Raise when a rule of the check changes: verdicts stored by earlier versions (row_check_cache) are then not reused.
CHECK_RULES_VERSION = 1
# Rows read per batch; their images are decoded on threads (PIL releases the GIL while decoding).
CHECK_BATCH = 64
IMAGE_THREADS = min(8, os.cpu_count() or 1)


class BadRowError(DamaError):
    """A bad row under on_bad_row="error": the message names the row, what is wrong and how to skip such rows."""


@dataclass(frozen=True)
class RowChecks:
    """What a step reads of a row besides its texts and image, and so must be valid."""

    hardness: bool = False
    reference: bool = False


@dataclass
class SkipReport:
    """The rows left out of one input: each {"row_id", "reason", "detail"}, in row order."""

    total: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    _order: dict[str, int] = field(default_factory=dict, repr=False)

    def add(self, row_id: str, reason: str, detail: str) -> None:
        self.skipped.append({"row_id": row_id, "reason": reason, "detail": detail})

    def add_overlong(self, dataset: PreferenceDataset) -> None:
        """Records the pairs `dataset` left out as longer than its max_length (overlong="skip"), in row order."""
        for row_id in dataset.skipped_row_ids:
            self.add(row_id, OVERLONG, f"row {row_id} is longer than max_length={dataset.max_length} tokens")
        self.skipped.sort(key=lambda entry: self._order.get(entry["row_id"], len(self._order)))

    @property
    def row_ids(self) -> set[str]:
        return {entry["row_id"] for entry in self.skipped}

    @property
    def kept(self) -> int:
        return self.total - len(self.skipped)

    def counts(self) -> dict[str, int]:
        """Skipped rows by reason, most frequent first."""
        return dict(Counter(entry["reason"] for entry in self.skipped).most_common())

    def summary(self) -> str:
        """One line: how many rows were left out, by reason."""
        if not self.skipped:
            return f"kept all {self.total} rows"
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.counts().items())
        return f"left out {len(self.skipped)} of {self.total} rows ({reasons})"

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.total, "kept": self.kept, "skipped_count": len(self.skipped),
                "skipped_by_reason": self.counts(), "skipped": list(self.skipped)}


def upstream_skips(input_path: str | Path) -> dict[str, dict[str, Any]]:
    """The rows an earlier pass left out of `input_path`, by their row id in it ({} without metadata beside it)."""
    if not metadata_path(input_path).is_file():
        return {}
    entries = read_metadata(input_path).get("skipped") or []
    return {entry["output_row_id"]: entry for entry in entries if entry.get("output_row_id")}


def _text_problem(record: Mapping[str, Any], checks: RowChecks) -> tuple[str, str] | None:
    """(reason, detail) of what is wrong with a row's cells other than its image, or None."""
    row = f"row {record['row_id']}"
    for name in TEXT_COLUMNS:
        if not isinstance(record.get(name), str):
            return MISSING_FIELD, f"{row} has no {name} text (null, absent or not a string: {record.get(name)!r})"
    for side in ("chosen", "rejected"):
        if not record[side].strip():
            return EMPTY_RESPONSE, f"{row}: its {side} response is empty"
    if checks.hardness and record.get("hardness") is not None:
        try:
            hardness = float(record["hardness"])
        except (TypeError, ValueError):
            return BAD_HARDNESS, f"{row}: its hardness {record['hardness']!r} is not a number"
        if math.isinf(hardness):
            return BAD_HARDNESS, f"{row}: its hardness is {hardness}; a hardness is finite, or null if not scored"
    if checks.reference:
        try:
            sums, means = stored_reference(record)
        except (TypeError, ValueError) as error:
            return BAD_REFERENCE, f"{row}: its reference log-probs cannot be read ({error})"
        if any(math.isnan(value) for value in sums):
            return MISSING_REFERENCE, f"{row} has no reference log-probs (its reference columns are null)"
        if not all(math.isfinite(value) for value in sums) or any(math.isinf(value) for value in means):
            return BAD_REFERENCE, (f"{row}: its reference log-probs are not finite (chosen sum {sums[0]}, rejected "
                                   f"sum {sums[1]}, means {means[0]}, {means[1]})")
    return None


def _inherited(entry: Mapping[str, Any]) -> tuple[str, str]:
    """(reason, detail) of a row an earlier step left out: its reason, and its detail marked as inherited once."""
    reason = entry.get("reason") or "left out by an earlier step"
    detail = entry.get("detail") or reason
    return reason, detail if detail.startswith(UPSTREAM) else f"{UPSTREAM}{detail}"


def _image_problem(cells: Mapping[str, Any], image_folder: Path | None, row_id: str) -> tuple[str, str] | None:
    try:
        open_row_image(cells.get("image"), cells.get("image_path"), image_folder, row_id)
    except RowImageError as error:
        return error.reason, str(error)
    return None


def _check_columns(rows: datasets.Dataset, checks: RowChecks, source: str) -> None:
    if checks.reference and not {"logps", REF_LOGPS_COLUMNS[0]} & set(rows.column_names):
        raise DamaError(
            f"{source} has no reference log-probs (no {REF_LOGPS_COLUMNS[0]} or logps column): run `dama "
            "precompute-ref` on it first, or train with reference: online"
        )


def find_problems(
    rows: datasets.Dataset,
    image_folder: Path | None,
    checks: RowChecks,
    *,
    source: str,
    upstream: Mapping[str, Mapping[str, Any]],
    stop_at_first: bool,
) -> RowVerdict:
    """Check every row of `rows` as the module docstring says, decoding each image (on threads). With stop_at_first,
    stops at the first bad row that no earlier step left out (the verdict is then incomplete)."""
    from tqdm.auto import tqdm

    _check_columns(rows, checks, source)
    verdict = RowVerdict(total=rows.num_rows, problems=[])
    texts = rows.select_columns([c for c in rows.column_names if c not in IMAGE_COLUMNS])
    images = rows.select_columns([c for c in IMAGE_COLUMNS if c in rows.column_names])
    with (ThreadPoolExecutor(IMAGE_THREADS) as pool,
          tqdm(total=rows.num_rows, desc=f"checking {source}", unit="row", disable=None) as progress):
        for start in range(0, rows.num_rows, CHECK_BATCH):
            text_batch, image_batch = texts[start:start + CHECK_BATCH], images[start:start + CHECK_BATCH]
            row_ids = text_batch["row_id"]
            problems: list[Any] = []
            for offset, row_id in enumerate(row_ids):
                if row_id in upstream:
                    problems.append(_inherited(upstream[row_id]))
                    continue
                problem = _text_problem({key: values[offset] for key, values in text_batch.items()}, checks)
                if problem is None:
                    cells = {key: values[offset] for key, values in image_batch.items()}
                    problem = pool.submit(_image_problem, cells, image_folder, row_id)
                problems.append(problem)
            for row_id, problem in zip(row_ids, problems, strict=True):
                if problem is not None and not isinstance(problem, tuple):
                    problem = problem.result()
                if problem is None:
                    continue
                verdict.problems.append([row_id, *problem])
                if stop_at_first and row_id not in upstream:
                    pool.shutdown(cancel_futures=True)
                    verdict.complete = False
                    return verdict
            progress.update(len(row_ids))
    return verdict


def apply_verdict(
    verdict: RowVerdict,
    row_ids: Sequence[str],
    *,
    on_bad_row: str,
    skip_hint: str,
    source: str,
    upstream: Mapping[str, Mapping[str, Any]],
) -> SkipReport:
    """The SkipReport of an input (its `row_ids` in row order) under on_bad_row; BadRowError for the first bad row
    under "error" (rows an earlier step left out aside)."""
    report = SkipReport(total=verdict.total)
    report._order = {row_id: index for index, row_id in enumerate(row_ids)}
    for row_id, reason, detail in verdict.problems:
        if on_bad_row == "error" and row_id not in upstream:
            raise BadRowError(f"{detail}. {skip_hint}")
        report.add(row_id, reason, detail)
    if report.total and not report.kept:
        raise DamaError(f"every row of {source} is bad ({report.summary()}): check that it is the right file, with "
                        "the right columns")
    return report


def _row_ids(rows: datasets.Dataset) -> list[str]:
    """The row_id column as a list, read in one slice (iterating the column reads row by row: seconds for 83k)."""
    return rows.select_columns(["row_id"])[:]["row_id"]


def _check_policy(on_bad_row: str) -> None:
    if on_bad_row not in BAD_ROW_POLICIES:
        raise DamaError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")


def validate_rows(
    rows: datasets.Dataset,
    image_folder: Path | None,
    checks: RowChecks,
    *,
    on_bad_row: str,
    skip_hint: str,
    source: str,
    upstream: Mapping[str, Mapping[str, Any]] | None = None,
) -> SkipReport:
    """Check every row of `rows` (from load_preference_rows) as the module docstring says; returns the SkipReport.

    `skip_hint` ends a BadRowError's message (how to skip bad rows with this step); `source` names the input in
    errors; `upstream` maps row ids an earlier pass left out to its skip entries (`upstream_skips`).
    """
    _check_policy(on_bad_row)
    upstream = upstream or {}
    verdict = find_problems(rows, image_folder, checks, source=source, upstream=upstream,
                            stop_at_first=on_bad_row == "error")
    return apply_verdict(verdict, _row_ids(rows), on_bad_row=on_bad_row, skip_hint=skip_hint, source=source,
                         upstream=upstream)


def keep_rows(rows: datasets.Dataset, report: SkipReport) -> datasets.Dataset:
    """`rows` without those the report left out (row ids unchanged)."""
    if not report.skipped:
        return rows
    left_out = report.row_ids
    return rows.select([index for index, row_id in enumerate(rows["row_id"]) if row_id not in left_out])


@dataclass
class CheckedInput:
    """An input's rows after the row check: the rows kept, the folder their images resolve under, the report."""

    rows: datasets.Dataset
    image_folder: Path
    report: SkipReport

    @property
    def selected_row_ids(self) -> set[str]:
        """The ids of every row read (selected), kept or skipped: what a pass with a selection writes."""
        return set(self.rows["row_id"]) | {entry["row_id"] for entry in self.report.skipped}


def check_input(
    path: str | Path,
    checks: RowChecks,
    *,
    on_bad_row: str,
    skip_hint: str,
    image_folder: str | Path | None = None,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    select: Sequence[str] = (),
) -> CheckedInput:
    """Read an input (load_preference_rows), check every row with the skips of the step before, keep the good ones.

    Images resolve under `image_folder`, by default the input's folder (formats.default_image_folder). The verdict
    on the rows is stored and reused while the input's files and the settings stay the same (row_check_cache).
    """
    _check_policy(on_bad_row)
    folder = Path(image_folder) if image_folder is not None else default_image_folder(path)
    rows = load_preference_rows(path, cache_dir=cache_dir, limit=limit, select=select)
    upstream, source = upstream_skips(path), Path(path).name
    settings = {"checks": asdict(checks), "select": list(select), "limit": limit, "rules": CHECK_RULES_VERSION}
    verdict = cached_verdict(path, rows, folder, settings, lambda: find_problems(
        rows, folder, checks, source=source, upstream=upstream, stop_at_first=on_bad_row == "error"))
    report = apply_verdict(verdict, _row_ids(rows), on_bad_row=on_bad_row, skip_hint=skip_hint, source=source,
                           upstream=upstream)
    return CheckedInput(keep_rows(rows, report), folder, report)

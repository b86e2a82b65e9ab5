"""The protocol every pass over a dataset follows (`dama hardness`, `dama precompute-ref`, `dama generate`, `dama
make-pairs`): plan what to do with the output, score the rows with resumable partial results, write the output and
its metadata atomically.

1. `plan_pass` decides, before anything is loaded, what the pass may do with its output path: start (nothing
   there), resume (a partial file of the same settings), report "already complete" (the output and metadata of this
   very run: same input files, settings and options; `completed_metadata`), or refuse (anything else there) unless
   --overwrite, which discards the partial file at the start and replaces the output when the new one is complete.
2. The pass reads, selects and checks its rows (dama.data.validation for preference rows) and loads its model.
3. `run_pass` scores the rows not yet in `<output>.partial.jsonl` (`PartialResults`: finished rows are appended as
   they are scored, flushed and fsynced; a rerun with the same settings skips them), then writes the output through
   a `PassOutput` and `<output>.meta.json` (both atomically) and removes the partial file.

Rows are named by `dama.data.formats.file_row_id`. A pass over preference rows writes its input in the same format
with its columns added (`DatasetOutput`, given the columns as `AddedColumn`s); with a selection, the selected rows
only. The metadata's `skipped` list gives each left-out row's id in the output too (`output_row_id`), which is how
the next step finds them (dama.data.validation.upstream_skips).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dama.data.formats import (
    atomic_path,
    detect_format,
    file_row_id,
    metadata_path,
    parquet_files,
    read_json_list,
    read_metadata,
    write_json_atomic,
    write_metadata,
)
from dama.errors import DamaError

if TYPE_CHECKING:
    import pyarrow as pa

    from dama.options import PassOptions

# Rows per Arrow record batch when streaming parquet: bounds memory, since each row carries its image bytes.
PARQUET_READ_ROWS = 256


@dataclass(frozen=True)
class AddedColumn:
    """A column a pass adds to every row of its output; a column of the same name in the input is replaced.

    `arrow_type` is the column's type in a parquet output. With `json_text_in_parquet`, parquet holds each value's
    JSON text instead (for values Arrow cannot type, such as a list mixing numbers and lists); a JSON output always
    holds the values themselves.
    """

    name: str
    arrow_type: pa.DataType
    json_text_in_parquet: bool = False

    def arrow_array(self, values: list[Any]) -> pa.Array:
        """One parquet batch of this column: `values` (one per row, None for a null) as an array of `arrow_type`."""
        import pyarrow as pa

        if self.json_text_in_parquet:
            values = [None if value is None else json.dumps(value) for value in values]
        return pa.array(values, type=self.arrow_type)


def write_dataset(
    input_path: str | Path,
    output_path: str | Path,
    columns: Sequence[AddedColumn],
    values_for_row: Callable[[str], Mapping[str, Any]],
    limit: int | None = None,
    keep: Collection[str] | None = None,
) -> None:
    """Write the input rows (the first `limit`; of those, the ids in `keep` when given) plus `columns`, atomically, in
    the input's format.

    `values_for_row(row_id)` gives one row's value of every added column, by column name, and None values for a row
    the pass left out; row ids are those of `load_preference_rows`. Parquet is streamed shard by shard into one
    output file, every input column kept and the added ones last, in the order of `columns`. JSON is written as one
    list; a record keeps its own keys in place and gains the new ones in the order of the mapping `values_for_row`
    returns.
    """
    input_path = Path(input_path)
    if detect_format(input_path) == "json":
        records = read_json_list(input_path)
        records = records if limit is None else records[:limit]
        ids = [file_row_id(input_path, number) for number in range(len(records))]
        kept = [(row_id, record) for row_id, record in zip(ids, records, strict=True) if keep is None or row_id in keep]
        for row_id, record in kept:
            record.update(values_for_row(row_id))
        write_json_atomic(output_path, [record for _, record in kept])
        return
    _write_parquet(input_path, Path(output_path), columns, values_for_row, limit, keep)


def _write_parquet(
    input_path: Path,
    output_path: Path,
    columns: Sequence[AddedColumn],
    values_for_row: Callable[[str], Mapping[str, Any]],
    limit: int | None,
    keep: Collection[str] | None,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = {column.name for column in columns}
    remaining = limit
    with atomic_path(output_path) as temporary:
        writer = None
        try:
            for file in parquet_files(input_path):
                number = 0
                for batch in pq.ParquetFile(file).iter_batches(batch_size=PARQUET_READ_ROWS):
                    if remaining is not None:
                        if remaining <= 0:
                            break
                        batch = batch.slice(0, remaining)
                        remaining -= batch.num_rows
                    table = pa.Table.from_batches([batch])
                    table = table.drop_columns([name for name in table.column_names if name in names])
                    ids = [file_row_id(file, number + i) for i in range(table.num_rows)]
                    number += table.num_rows
                    if keep is not None:
                        mask = [row_id in keep for row_id in ids]
                        table = table.filter(pa.array(mask, type=pa.bool_()))
                        ids = [row_id for row_id, kept in zip(ids, mask, strict=True) if kept]
                    rows = [values_for_row(row_id) for row_id in ids]
                    for column in columns:
                        table = table.append_column(column.name, column.arrow_array([row[column.name] for row in rows]))
                    if writer is None:
                        writer = pq.ParquetWriter(temporary, table.schema)
                    elif table.schema != writer.schema:
                        table = _cast_like(table, writer.schema, file)
                    writer.write_table(table)
            if writer is None:
                # No rows at all: still write a valid, empty file with the input's columns and the added ones.
                schema = pq.ParquetFile(parquet_files(input_path)[0]).schema_arrow
                schema = pa.schema([field for field in schema if field.name not in names])
                for column in columns:
                    schema = schema.append(pa.field(column.name, column.arrow_type))
                writer = pq.ParquetWriter(temporary, schema)
        finally:
            if writer is not None:
                writer.close()


def _cast_like(table: Any, schema: Any, file: Path) -> Any:
    try:
        return table.cast(schema)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise DamaError(
            f"{file.name}: its columns do not match the earlier shards and cannot be cast to them ({error}); "
            "score the shards separately"
        ) from error


def check_output_path(input_path: Path, output_path: Path) -> None:
    """DamaError unless the output is in the input's format and is another file (the passes' --input / --output)."""
    input_format = detect_format(input_path)
    expected = ".parquet" if input_format == "parquet" else ".json"
    if output_path.suffix != expected:
        raise DamaError(f"the input is {input_format}, so the output is too: give an --output ending in {expected}")
    if output_path.resolve() == input_path.resolve():
        raise DamaError("--output must differ from --input: the input is read again while the output is written")


def run_identity(input_path: Path, settings: Mapping[str, Any], **options: Any) -> dict[str, Any]:
    """What makes two runs of a pass the same run: its settings, the options that decide which rows are kept, and
    the input files (path, size, modification time: an input rewritten since gives another run)."""
    files = [input_path] if input_path.is_file() else parquet_files(input_path)
    return {
        "settings": dict(settings),
        **options,
        "input": str(input_path.resolve()),
        "input_files": [[file.name, file.stat().st_size, file.stat().st_mtime_ns] for file in files],
    }


@dataclass(frozen=True)
class OutputPlan:
    """What a pass does with its output: "new", "resume", "complete" (nothing to do) or "replace" (--overwrite)."""

    output_path: Path
    action: str
    identity: dict[str, Any]

    def start(self, step: str) -> None:
        """Called once every start-up check has passed: under "replace", discard the old partial results."""
        if self.action != "replace":
            return
        partial = partial_path(self.output_path)
        if partial.exists():
            partial.unlink()
            print(f"dama {step}: --overwrite: removed {partial}", file=sys.stderr)
        print(f"dama {step}: --overwrite: {self.output_path} and its metadata are replaced when this run completes",
              file=sys.stderr)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    names = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "input_files":
            names.append("the input files (changed since)")
        elif isinstance(old.get(key), Mapping) and isinstance(new.get(key), Mapping):
            names += [f"{key}.{name}: {old[key].get(name)!r} -> {new[key].get(name)!r}"
                      for name in sorted(set(old[key]) | set(new[key])) if old[key].get(name) != new[key].get(name)]
        else:
            names.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return "; ".join(names)


def _partial_settings(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        first = handle.readline()
    try:
        return json.loads(first).get("settings")
    except (ValueError, AttributeError):
        return None


def plan_output(
    output_path: Path, settings: Mapping[str, Any], identity: dict[str, Any], overwrite: bool
) -> OutputPlan:
    """Decide what the pass does with `output_path` (see the module docstring); DamaError when it must refuse.

    Reads only: nothing is removed or written here.
    """
    partial, metadata = partial_path(output_path), metadata_path(output_path)
    if not any(path.exists() for path in (output_path, metadata, partial)):
        return OutputPlan(output_path, "new", identity)
    if overwrite:
        return OutputPlan(output_path, "replace", identity)
    if partial.exists():
        if _partial_settings(partial) == dict(settings):
            return OutputPlan(output_path, "resume", identity)
        raise DamaError(
            f"{partial} holds the partial results of a run with other settings ({_partial_settings(partial)}; now "
            f"{dict(settings)}): rerun with those settings to finish it, or pass --overwrite to start over"
        )
    recorded = None
    if metadata.is_file():
        try:
            recorded = json.loads(metadata.read_text(encoding="utf-8")).get("run")
        except (ValueError, AttributeError):
            recorded = None
    if output_path.exists() and recorded == identity:
        return OutputPlan(output_path, "complete", identity)
    why = (f"another run's output ({_differences(recorded, identity)})" if isinstance(recorded, Mapping)
           else "a file this pass cannot tell is its own (no run record in its metadata)")
    raise DamaError(
        f"{output_path} already holds {why}: choose another --output, or pass --overwrite to replace it"
    )


def partial_path(output_path: str | Path) -> Path:
    """Where a pass keeps its finished rows (`PartialResults`) until its output is written: beside the output."""
    return Path(f"{output_path}.partial.jsonl")


class PartialResults:
    """The append-only JSON-lines file of finished rows that makes a run resumable.

    Line 1 is a header with the run's settings; a rerun with other settings (another CLIP, raw scores) would mix
    incompatible numbers, so it is refused. Each further line is one finished row, keyed by row id and carrying
    the row's fingerprint. Lines are flushed and fsynced per batch; a line torn by a crash is cut off on reopening.
    """

    def __init__(self, path: str | Path, settings: Mapping[str, Any]):
        self.path = Path(path)
        self.settings = dict(settings)
        self.done: dict[str, dict[str, Any]] = {}
        lines = self._complete_lines() if self.path.exists() else []
        if lines:
            self._load(lines)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as handle:
                handle.write(json.dumps({"settings": self.settings}) + "\n")
        # Kept open for the whole run (one append per batch); `close` or leaving the `with` block closes it.
        self._handle = open(self.path, "a", encoding="utf-8")

    def __enter__(self) -> PartialResults:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _complete_lines(self) -> list[str]:
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        if len(complete) != len(raw):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        return complete.decode("utf-8").splitlines()

    def _load(self, lines: list[str]) -> None:
        header = json.loads(lines[0])
        if header.get("settings") != self.settings:
            raise DamaError(
                f"{self.path} holds partial results made with other settings ({header.get('settings')}; now "
                f"{self.settings}). Delete it to start over, or rerun with the same settings to resume."
            )
        for line in lines[1:]:
            record = json.loads(line)
            self.done[record["row_id"]] = record

    def finished(self, row_id: str, fingerprint: str, description: str) -> dict[str, Any] | None:
        """The record of a row an earlier run finished, or None; `description` names the row in the error.

        DamaError when that row then held another pair (another `fingerprint`): the input changed since.
        """
        record = self.done.get(row_id)
        if record is not None and record["fingerprint"] != fingerprint:
            raise DamaError(
                f"{description} differs from the one in {self.path}: the input changed since the interrupted run. "
                "Delete that file to start over."
            )
        return record

    def append(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._handle.write(json.dumps(record) + "\n")
            self.done[record["row_id"]] = record
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


@dataclass
class PassOutcome:
    """What a pass's scoring step returns: the finished record of every scored row by id (new and resumed), the
    rows it left out with their reasons, and how many records came from an earlier run."""

    results: dict[str, dict[str, Any]]
    skipped: list[dict[str, Any]]
    resumed: int

    @property
    def computed(self) -> int:
        """Rows scored by this run (not resumed from an earlier one)."""
        return len(self.results) - self.resumed

    def resume_rows(self, rows: Sequence[Any], partial: PartialResults) -> list[Any]:
        """The rows (each with a `row_id` and a `fingerprint`) that no earlier run finished; the record of each one
        that an earlier run finished joins the results as resumed."""
        pending = []
        for row in rows:
            finished = partial.finished(row.row_id, row.fingerprint, f"row {row.row_id}")
            if finished is None:
                pending.append(row)
            else:
                self.results[row.row_id] = finished
                self.resumed += 1
        return pending


class PassOutput(Protocol):
    """How a pass writes its output from its finished records (atomically: the file appears only complete)."""

    def write(self, output_path: Path, outcome: PassOutcome) -> dict[str, str]:
        """Write the output; returns each written row's id in the output, by its input row id."""
        ...

    def description(self) -> dict[str, Any]:
        """What the metadata says about the output beside the counts: at least input, format and limit."""
        ...


@dataclass(frozen=True)
class DatasetOutput:
    """The input rows (the first `limit`; of those, the ids in `keep` when given) with `columns` added, in the
    input's format (`write_dataset`). `row_values(record)` turns a row's finished record (None for a row left out)
    into its values of `columns`."""

    input_path: Path
    columns: Sequence[AddedColumn]
    row_values: Callable[[Mapping[str, Any] | None], Mapping[str, Any]]
    limit: int | None = None
    keep: Collection[str] | None = None

    def write(self, output_path: Path, outcome: PassOutcome) -> dict[str, str]:
        output_row_ids: dict[str, str] = {}

        def values_for_row(row_id: str) -> Mapping[str, Any]:
            # Called once per output row, in output order: the row's id in the output is its position there.
            output_row_ids[row_id] = file_row_id(output_path, len(output_row_ids))
            return self.row_values(outcome.results.get(row_id))

        # `keep` already holds the selection cut to `limit`; the limit then must not cut the input rows again.
        write_dataset(self.input_path, output_path, self.columns, values_for_row,
                      self.limit if self.keep is None else None, self.keep)
        return output_row_ids

    def description(self) -> dict[str, Any]:
        return {"input": str(self.input_path), "format": detect_format(self.input_path), "limit": self.limit}


def plan_pass(options: PassOptions, settings: Mapping[str, Any], **row_options: Any) -> OutputPlan:
    """Step 1 of the protocol for `options.output`: the run's identity (its settings, the input files, the limit,
    the image folder and `row_options`, the other options that decide which rows are kept) and what to do."""
    image_folder = None if options.image_folder is None else str(Path(options.image_folder).resolve())
    identity = run_identity(Path(options.input), settings, limit=options.limit, image_folder=image_folder,
                            **row_options)
    return plan_output(Path(options.output), settings, identity, options.overwrite)


def completed_metadata(plan: OutputPlan) -> dict[str, Any]:
    """The metadata of an output that is already this run's, complete, marked "already_complete"."""
    return {**read_metadata(plan.output_path), "already_complete": True}


def already_complete_message(output_path: str | Path, metadata: Mapping[str, Any]) -> str:
    """What a pass prints when its output is already complete."""
    return (f"{output_path} is already complete (same input and settings, written {metadata['created']}): "
            "nothing to do; pass --overwrite to compute it again")


def run_pass(
    plan: OutputPlan,
    *,
    step: str,
    settings: Mapping[str, Any],
    score: Callable[[PartialResults], PassOutcome],
    output: PassOutput,
    metadata: Callable[[PassOutcome], Mapping[str, Any]],
) -> dict[str, Any]:
    """Resume, score, write: step 3 of the protocol, into `plan.output_path`.

    `score(partial)` scores the rows not yet in `partial` (appending each finished batch to it) and lists every row
    left out; `output` writes them; `metadata(outcome)` adds the pass's own fields to the metadata written beside
    the output. `settings` must be equal for a rerun to resume. Returns the metadata.
    """
    output_path = plan.output_path
    plan.start(step)
    with PartialResults(partial_path(output_path), settings) as partial:
        outcome = score(partial)
        output_row_ids = output.write(output_path, outcome)
        skipped = [{**entry, "output_row_id": output_row_ids.get(entry["row_id"])} for entry in outcome.skipped]
        counts: dict[str, int] = {}
        for entry in skipped:
            counts[entry["reason"]] = counts.get(entry["reason"], 0) + 1
        written = {
            **settings,
            "count": len(outcome.results),
            "computed": outcome.computed,
            "resumed": outcome.resumed,
            "skipped_count": len(skipped),
            "skipped_by_reason": counts,
            "skipped": skipped,
            "output": output_path.name,
            **output.description(),
            **metadata(outcome),
            "run": plan.identity,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_metadata(output_path, written)
    partial.remove()
    return written


def skipped_summary(metadata: Mapping[str, Any]) -> str:
    """ "skipped N" and the count by reason, for a pass's closing line."""
    counts = metadata.get("skipped_by_reason") or {}
    reasons = ", ".join(f"{count} {reason}" for reason, count in counts.items())
    return f"skipped {metadata['skipped_count']}" + (f" ({reasons})" if reasons else "")

"""Reading and writing preference datasets for the offline passes (`dama hardness`, `dama precompute-ref`).

Two input formats:
- parquet: the RLAIF-V shards (one file, or a folder of `*.parquet` shards read in name order), with columns
  ds_name, image {bytes, path}, question, chosen, rejected, origin_dataset, origin_split, idx, image_path. The image
  comes from `image.bytes`, else from `image.path` or `image_path` under the image folder.
- json: the authors' JSON list of objects (question, chosen, rejected, image_path, idx, origin_dataset, ...), whose
  `image_path` is resolved under the image folder (default: the JSON file's folder).

Every row gets a stable id, "<file name>:<row number in that file>", used for resuming and in every message.
A pass's output is its input in the same format with the pass's columns added (`write_dataset`, given the columns
as `AddedColumn`s). Outputs are written atomically (`atomic_path`): a crash leaves the previous file, never half of a
new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("parquet", "json")
# Rows per Arrow record batch when streaming parquet: bounds memory, since each row carries its image bytes.
PARQUET_READ_ROWS = 256


@dataclass(frozen=True)
class PairRow:
    """One preference pair as the hardness pass needs it; the image is decoded only when `load_image` is called."""

    row_id: str
    question: str
    chosen: str
    rejected: str
    idx: Any
    image_bytes: bytes | None
    image_file: Path | None

    def describe(self) -> str:
        return f"row {self.row_id}" + (f" (idx {self.idx})" if self.idx is not None else "")

    @property
    def fingerprint(self) -> str:
        """A short hash of the texts: resuming checks that a finished row id still holds the same pair."""
        payload = json.dumps([self.question, self.chosen, self.rejected], ensure_ascii=False)
        return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]

    def load_image(self) -> Image.Image:
        """The decoded RGB image. Raises OSError (missing, unreadable) or ValueError (no image given)."""
        if self.image_bytes is not None:
            image = Image.open(io.BytesIO(self.image_bytes))
        elif self.image_file is not None:
            image = Image.open(self.image_file)
        else:
            raise ValueError("the row names no image (no image bytes and no image path)")
        # convert() decodes every pixel now, so that a truncated file fails here and not inside the processor.
        return image.convert("RGB")


def detect_format(path: str | Path) -> str:
    """'parquet' for a .parquet file or a folder of them, 'json' for a .json file; ValueError otherwise."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        return "parquet"
    if path.suffix == ".json":
        return "json"
    raise ValueError(f"{path}: cannot tell the format; give a .parquet file, a folder of .parquet shards or a .json")


def parquet_files(path: str | Path) -> list[Path]:
    """The shards of a parquet input, in name order (the order rows are read and written in)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise ValueError(f"{path} is a folder without .parquet files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    return [path]


def read_json_list(path: Path) -> list[dict]:
    """The records of an authors'-format JSON file (a list of objects), with a clear error for anything else."""
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError(f"{path}: expected a JSON list of objects (the authors' format)")
    return data


def count_rows(path: str | Path, limit: int | None = None) -> int:
    """Number of rows a read will yield (cheap for parquet: read from the file footers)."""
    if detect_format(path) == "parquet":
        import pyarrow.parquet as pq

        total = sum(pq.ParquetFile(file).metadata.num_rows for file in parquet_files(path))
    else:
        total = len(read_json_list(Path(path)))
    return total if limit is None else min(total, limit)


def _text(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    return "" if value is None else str(value)


def _resolve(image_path: str | None, image_folder: Path | None) -> Path | None:
    if not image_path:
        return None
    candidate = Path(image_path)
    if candidate.is_absolute() or image_folder is None:
        return candidate
    return image_folder / candidate


def _parquet_pair(row_id: str, record: Mapping[str, Any], image_folder: Path | None) -> PairRow:
    image = record.get("image")
    image_bytes = image.get("bytes") if isinstance(image, Mapping) else None
    image_path = (image.get("path") if isinstance(image, Mapping) else None) or record.get("image_path")
    return PairRow(
        row_id=row_id,
        question=_text(record, "question"),
        chosen=_text(record, "chosen"),
        rejected=_text(record, "rejected"),
        idx=record.get("idx"),
        image_bytes=image_bytes,
        image_file=None if image_bytes is not None else _resolve(image_path, image_folder),
    )


def _json_pair(row_id: str, record: Mapping[str, Any], image_folder: Path) -> PairRow:
    return PairRow(
        row_id=row_id,
        question=_text(record, "question"),
        chosen=_text(record, "chosen"),
        rejected=_text(record, "rejected"),
        idx=record.get("idx"),
        image_bytes=None,
        image_file=_resolve(record.get("image_path") or record.get("image"), image_folder),
    )


def iter_pairs(path: str | Path, image_folder: str | Path | None = None, limit: int | None = None) -> Iterator[PairRow]:
    """Yield the pairs of a dataset in file order, at most `limit` of them, streaming parquet batch by batch."""
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else None
    remaining = limit
    if detect_format(path) == "json":
        records = read_json_list(path)
        if remaining is not None:
            records = records[:remaining]
        for number, record in enumerate(records):
            yield _json_pair(f"{path.name}:{number}", record, folder if folder is not None else path.parent)
        return
    import pyarrow.parquet as pq

    for file in parquet_files(path):
        number = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=PARQUET_READ_ROWS):
            for record in batch.to_pylist():
                if remaining is not None and remaining <= 0:
                    return
                yield _parquet_pair(f"{file.name}:{number}", record, folder)
                number += 1
                if remaining is not None:
                    remaining -= 1


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success fsync it and rename it over `path`.

    The rename is atomic on POSIX file systems (same folder, so same file system): readers see the old file or
    the complete new one. On any exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, ensure_ascii=False)


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
) -> None:
    """Write the input rows (the first `limit`) plus `columns`, atomically, in the input's format.

    `values_for_row(row_id)` gives one row's value of every added column, by column name, and None values for a row
    the pass left out; row ids are those of `iter_pairs`. Parquet is streamed shard by shard into one output file,
    every input column kept and the added ones last, in the order of `columns`. JSON is written as one list; a record
    keeps its own keys in place and gains the new ones in the order of the mapping `values_for_row` returns.
    """
    input_path = Path(input_path)
    if detect_format(input_path) == "json":
        records = read_json_list(input_path)
        records = records if limit is None else records[:limit]
        for number, record in enumerate(records):
            record.update(values_for_row(f"{input_path.name}:{number}"))
        write_json_atomic(output_path, records)
        return
    _write_parquet(input_path, Path(output_path), columns, values_for_row, limit)


def _write_parquet(
    input_path: Path,
    output_path: Path,
    columns: Sequence[AddedColumn],
    values_for_row: Callable[[str], Mapping[str, Any]],
    limit: int | None,
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
                    rows = [values_for_row(f"{file.name}:{number + i}") for i in range(table.num_rows)]
                    number += table.num_rows
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
        raise ValueError(
            f"{file.name}: its columns do not match the earlier shards and cannot be cast to them ({error}); "
            "score the shards separately"
        ) from error


def check_output_path(input_path: Path, output_path: Path) -> None:
    """ValueError unless the output is in the input's format and is another file (the passes' --input / --output)."""
    input_format = detect_format(input_path)
    expected = ".parquet" if input_format == "parquet" else ".json"
    if output_path.suffix != expected:
        raise ValueError(f"the input is {input_format}, so the output is too: give an --output ending in {expected}")
    if output_path.resolve() == input_path.resolve():
        raise ValueError("--output must differ from --input: the input is read again while the output is written")


def metadata_path(dataset_path: str | Path) -> Path:
    """Where the hardness metadata of a dataset lives: `<dataset>.meta.json`, beside it."""
    return Path(f"{dataset_path}.meta.json")


def write_metadata(dataset_path: str | Path, metadata: Mapping[str, Any]) -> Path:
    path = metadata_path(dataset_path)
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump(dict(metadata), handle, ensure_ascii=False, indent=2)
    return path


def read_metadata(dataset_path: str | Path) -> dict[str, Any]:
    path = metadata_path(dataset_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `dama hardness` on the dataset first, or set the mean hardness in the config"
        )
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_hardness_mean(dataset_path: str | Path) -> float:
    """δ̄, the dataset's mean hardness, from the metadata beside the dataset."""
    value = read_metadata(dataset_path).get("hardness_mean")
    if value is None:
        raise ValueError(f"{metadata_path(dataset_path)} has no hardness_mean (no pair was scored)")
    return float(value)


def parse_logits(value: Any) -> list[float] | None:
    """A `chosen_logits` / `rejected_logits` cell as a list of floats: accepts a list, an array or a JSON string."""
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    return [float(item) for item in value]


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
            raise ValueError(
                f"{self.path} holds partial results made with other settings ({header.get('settings')}; now "
                f"{self.settings}). Delete it to start over, or rerun with the same settings to resume."
            )
        for line in lines[1:]:
            record = json.loads(line)
            self.done[record["row_id"]] = record

    def finished(self, row_id: str, fingerprint: str, description: str) -> dict[str, Any] | None:
        """The record of a row an earlier run finished, or None; `description` names the row in the error.

        ValueError when that row then held another pair (another `fingerprint`): the input changed since.
        """
        record = self.done.get(row_id)
        if record is not None and record["fingerprint"] != fingerprint:
            raise ValueError(
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

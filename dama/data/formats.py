"""Reading preference datasets, in both formats, for every step (`dama hardness`, `dama precompute-ref`, `dama train`).

Two input formats:
- parquet: the RLAIF-V shards (one file, or a folder of `*.parquet` shards read in name order), with columns
  ds_name, image {bytes, path}, question, chosen, rejected, origin_dataset, origin_split, idx, image_path;
- json: the authors' JSON list of objects (question, chosen, rejected, image_path, idx, origin_dataset, logps,
  chosen_logits, rejected_logits, ...).

Every row gets a stable id, "<file name>:<row number in that file>", used for resuming and in every message.

Row selection (`select`, the passes' `--select`): conditions `KEY=VALUE` (equal) or `KEY~VALUE` (contains, ignoring
case), all of which a row must meet. KEY is a column (`ds_name=...`) or `column.field` for a column holding a JSON
object as text, like RLAIF-V's `origin_split` (`origin_split.model=...`). Row ids are given before selecting, so a
selected row keeps the id it has in the whole input. A selection that keeps no row is an error listing the values
the keys take.

Images, one rule for every step: the image's bytes when the row carries them (`image.bytes`), else the file named by
`image.path`, `image_path` or a plain-string `image`. A relative path is resolved under the image folder, which is
the input's own folder (the input itself when it is a folder of shards) unless an image folder is given. An image
must decode completely and hold at most MAX_IMAGE_PIXELS pixels; anything else raises RowImageError (a DamaError
naming the row), whose `reason` is one of IMAGE_REASONS, the words every step counts skipped rows by.

Also here: atomic file writes (`atomic_path`: a crash leaves the previous file, never half of a new one) and the
dataset metadata written beside a dataset (`<dataset>.meta.json`: δ̄ and the settings of the pass that wrote it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from dama.errors import DamaError

TEXT_COLUMNS = ("question", "chosen", "rejected")
IMAGE_COLUMNS = ("image", "image_path")
# The reference log-prob columns this project writes and reads (sums, means, lists over supervised tokens).
REF_LOGPS_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
REF_MEAN_COLUMNS = ("ref_chosen_mean_logps", "ref_rejected_mean_logps")
REF_TOKEN_COLUMNS = ("ref_chosen_token_logps", "ref_rejected_token_logps")
OPTIONAL_COLUMNS = (*IMAGE_COLUMNS, "idx", "logps", *REF_LOGPS_COLUMNS, *REF_MEAN_COLUMNS, *REF_TOKEN_COLUMNS,
                    "hardness", "chosen_logits", "rejected_logits")
# Columns of the authors' JSON that hold a number, a list or JSON text from row to row; Arrow types them as text.
JSON_TEXT_COLUMNS = ("logps", "image", "chosen_logits", "rejected_logits")
# The most pixels an image may have: 50 megapixels (e.g. 8660 x 5773), 150 MB once decoded to RGB. Below PIL's own
# decompression-bomb limit (about 89.5 megapixels), so that limit never decides; LLaVA-1.5 sees 336 x 336 anyway.
MAX_IMAGE_PIXELS = 50_000_000
IMAGE_MISSING, IMAGE_UNREADABLE, IMAGE_TOO_LARGE = "missing image", "unreadable image", "image over the pixel limit"
IMAGE_REASONS = (IMAGE_MISSING, IMAGE_UNREADABLE, IMAGE_TOO_LARGE)
# warnings.catch_warnings swaps process-wide state: rows may be decoded on several threads at once.
_WARNINGS_LOCK = threading.Lock()


def detect_format(path: str | Path) -> str:
    """'parquet' for a .parquet file or a folder of them, 'json' for a .json file; DamaError otherwise."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        return "parquet"
    if path.suffix == ".json":
        return "json"
    raise DamaError(f"{path}: cannot tell the format; give a .parquet file, a folder of .parquet shards or a .json")


def parquet_files(path: str | Path) -> list[Path]:
    """The shards of a parquet input, in name order (the order rows are read and written in)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DamaError(f"{path} is a folder without .parquet files")
        return files
    if not path.is_file():
        raise DamaError(f"input {path} does not exist")
    return [path]


def read_json_list(path: Path) -> list[dict]:
    """The records of an authors'-format JSON file (a list of objects), with a clear error for anything else."""
    if not path.is_file():
        raise DamaError(f"input {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise DamaError(f"{path}: expected a JSON list of objects (the authors' format)")
    return data


def read_json_file(path: Path, what: str) -> Any:
    """The JSON value of the file `path` (`what` names it in errors: "annotations file", ...); DamaError when it is
    missing or not valid JSON."""
    if not path.is_file():
        raise DamaError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise DamaError(f"{what} {path} is not valid JSON ({error})") from error


def file_row_id(file: str | Path, number: int) -> str:
    """The id of row `number` (counted from 0) of a file: "<file name>:<number>". Every step names rows this way,
    which is how an output row, a partial result and a skipped-rows entry are joined to their input row."""
    return f"{Path(file).name}:{number}"


def load_preference_rows(
    path: str | Path,
    *,
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    select: Sequence[str] = (),
) -> datasets.Dataset:
    """The rows of a parquet input (file or folder of shards) or of the authors' JSON list, as a `datasets.Dataset`.

    Keeps the columns the steps read (question, chosen, rejected, image, image_path, idx, logps, the ref_* columns,
    hardness, chosen_logits, rejected_logits, and those `select` names) and adds `row_id`. `select` keeps the rows
    that meet every condition (module docstring), then `limit` the first of those. Parquet is converted once into
    `datasets`' memory-mapped cache (`cache_dir`, by default datasets' own); images stay undecoded until an example
    is read.
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise DamaError(f"limit must be >= 0 or None, got {limit}")
    selectors = [RowSelector.parse(text) for text in select]
    wanted = (*TEXT_COLUMNS, *OPTIONAL_COLUMNS, *(s.column for s in selectors))
    if detect_format(path) == "json":
        rows = _json_rows(path, wanted)
    else:
        shards = []
        for file in parquet_files(path):
            shard = datasets.Dataset.from_parquet(str(file), cache_dir=None if cache_dir is None else str(cache_dir))
            shard = shard.select_columns([c for c in dict.fromkeys(wanted) if c in shard.column_names])
            shards.append(shard.add_column("row_id", [file_row_id(file, n) for n in range(shard.num_rows)]))
        rows = datasets.concatenate_datasets(shards)
    missing = [c for c in TEXT_COLUMNS if c not in rows.column_names]
    if missing:
        raise DamaError(f"{path} lacks the columns {missing}; a preference pair needs question, chosen, rejected")
    if selectors:
        rows = select_rows(rows, selectors, str(path))
    return rows if limit is None else rows.select(range(min(limit, rows.num_rows)))


def _json_rows(path: Path, wanted: Sequence[str]) -> datasets.Dataset:
    records = read_json_list(path)
    present = [c for c in dict.fromkeys(wanted) if any(c in r for r in records)]
    columns: dict[str, list] = {c: [r.get(c) for r in records] for c in present}
    # The authors' `logps` mixes numbers and lists, which Arrow cannot type; its JSON text keeps it intact.
    for column in JSON_TEXT_COLUMNS:
        if column in columns:
            columns[column] = [v if v is None or isinstance(v, str) else json.dumps(v) for v in columns[column]]
    columns["row_id"] = [file_row_id(path, n) for n in range(len(records))]
    return datasets.Dataset.from_dict(columns)


@dataclass(frozen=True)
class RowSelector:
    """One row condition: `column[.field]=value` (equal) or `column[.field]~value` (contains, ignoring case)."""

    column: str
    field: str | None
    value: str
    contains: bool

    @classmethod
    def parse(cls, text: str) -> RowSelector:
        positions = [p for p in (text.find("="), text.find("~")) if p > 0]
        if not positions:
            raise DamaError(f"select {text!r}: write KEY=VALUE or KEY~VALUE (e.g. origin_split.model~llava)")
        cut = min(positions)
        key, value = text[:cut].strip(), text[cut + 1:].strip()
        column, _, field = key.partition(".")
        return cls(column=column, field=field or None, value=value, contains=text[cut] == "~")

    @property
    def key(self) -> str:
        return self.column if self.field is None else f"{self.column}.{self.field}"

    def cell_value(self, cell: Any, row_id: str) -> str | None:
        """The value the condition compares: the cell as text, or its JSON object's `field`."""
        if self.field is None:
            return None if cell is None else str(cell)
        if isinstance(cell, str):
            try:
                cell = json.loads(cell)
            except json.JSONDecodeError as error:
                raise DamaError(f"row {row_id}: select {self.key} needs JSON in {self.column}, got {cell[:60]!r}") \
                    from error
        if not isinstance(cell, Mapping):
            return None
        value = cell.get(self.field)
        return None if value is None else str(value)

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        return self.value.lower() in value.lower() if self.contains else value == self.value


def select_rows(rows: datasets.Dataset, selectors: Sequence[RowSelector], source: str) -> datasets.Dataset:
    """The rows meeting every selector; DamaError naming an absent column, or listing the values when none is kept."""
    for selector in selectors:
        if selector.column not in rows.column_names:
            raise DamaError(f"select {selector.key}: {source} has no column {selector.column!r} (it has "
                            f"{sorted(c for c in rows.column_names if c != 'row_id')})")
    columns = list(dict.fromkeys(["row_id", *(s.column for s in selectors)]))
    table = rows.select_columns(columns)
    keep, seen = [], {s.key: Counter() for s in selectors}
    for start in range(0, table.num_rows, 4096):
        batch = table[start:start + 4096]
        for offset, row_id in enumerate(batch["row_id"]):
            values = [s.cell_value(batch[s.column][offset], row_id) for s in selectors]
            for selector, value in zip(selectors, values, strict=True):
                seen[selector.key][value] += 1
            if all(s.matches(v) for s, v in zip(selectors, values, strict=True)):
                keep.append(start + offset)
    if not keep:
        found = "; ".join(f"{key}: " + ", ".join(f"{value!r} ({count})" for value, count in counts.most_common(12))
                          for key, counts in seen.items())
        raise DamaError(f"no row of {source} meets every condition of select; values found: {found}")
    return rows.select(keep)


def default_image_folder(input_path: str | Path) -> Path:
    """The folder relative image paths of an input resolve under when no image folder is given."""
    input_path = Path(input_path)
    return input_path if input_path.is_dir() else input_path.parent


class RowImageError(DamaError):
    """A row's image is missing, cannot be decoded, or is too large; `reason` is one of IMAGE_REASONS."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def open_row_image(image: Any, image_path: str | None, image_folder: Path | None, row_id: str) -> Image.Image:
    """The decoded RGB image of a row from its `image` and `image_path` cells (the module docstring's rule).

    Raises RowImageError (a ValueError) naming the row when there is no image or it cannot be read.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, str):
        image = json.loads(image) if image.startswith("{") else {"path": image}
    path = image_path
    if isinstance(image, Mapping):
        if image.get("bytes") is not None:
            return _decode(io.BytesIO(image["bytes"]), row_id)
        path = image.get("path") or path
    if not path:
        raise RowImageError(f"row {row_id} has no image: no image bytes and no image path", IMAGE_MISSING)
    file = Path(path)
    if not file.is_absolute():
        if image_folder is None:
            raise RowImageError(
                f"row {row_id}: its image path {path} is relative and no image folder was given", IMAGE_MISSING
            )
        file = image_folder / file
    if not file.is_file():
        raise RowImageError(f"row {row_id}: its image file {file} does not exist", IMAGE_MISSING)
    return _decode(file, row_id)


def _decode(source: Any, row_id: str) -> Image.Image:
    where = f" {source}" if isinstance(source, Path) else ""
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # PIL warns past its pixel limit and raises past twice that; either way the image is refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(source)
        with opened:
            pixels = opened.width * opened.height
            if pixels > MAX_IMAGE_PIXELS:
                raise RowImageError(
                    f"row {row_id}: its image{where} is {opened.width} x {opened.height} = {pixels} pixels, over the "
                    f"limit of {MAX_IMAGE_PIXELS}; resize it or leave the row out",
                    IMAGE_TOO_LARGE,
                )
            # convert() decodes every pixel now, so a truncated file fails here, with the row named.
            return opened.convert("RGB")
    except RowImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RowImageError(f"row {row_id}: its image{where} is too large ({error})", IMAGE_TOO_LARGE) from error
    except Image.UnidentifiedImageError as error:
        message = f"row {row_id}: cannot read its image{where}: not a format PIL reads"
        raise RowImageError(message, IMAGE_UNREADABLE) from error
    except Exception as error:  # PIL's decoders raise many types (OSError, SyntaxError, EOFError, ...) on bad bytes
        raise RowImageError(
            f"row {row_id}: cannot read its image{where} ({type(error).__name__}: {error})", IMAGE_UNREADABLE
        ) from error


@dataclass(frozen=True)
class PairRow:
    """One preference pair's texts and image cells; the image is decoded only when `load_image` is called."""

    row_id: str
    question: str
    chosen: str
    rejected: str
    idx: Any = None
    image: Any = None
    image_path: str | None = None
    image_folder: Path | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any], image_folder: Path | None) -> PairRow:
        """A row of `load_preference_rows` (a missing text is the empty string)."""
        return cls(
            row_id=record["row_id"],
            question=record.get("question") or "",
            chosen=record.get("chosen") or "",
            rejected=record.get("rejected") or "",
            idx=record.get("idx"),
            image=record.get("image"),
            image_path=record.get("image_path"),
            image_folder=image_folder,
        )

    def describe(self) -> str:
        return f"row {self.row_id}" + (f" (idx {self.idx})" if self.idx is not None else "")

    @property
    def fingerprint(self) -> str:
        """A short hash of the texts: resuming checks that a finished row id still holds the same pair."""
        payload = json.dumps([self.question, self.chosen, self.rejected], ensure_ascii=False)
        return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]

    def load_image(self) -> Image.Image:
        return open_row_image(self.image, self.image_path, self.image_folder, self.row_id)


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
        raise DamaError(
            f"{path} not found: run `dama hardness` on the dataset first, or set the mean hardness in the config"
        )
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_hardness_mean(dataset_path: str | Path) -> float:
    """δ̄, the dataset's mean hardness, from the metadata beside the dataset."""
    value = read_metadata(dataset_path).get("hardness_mean")
    if value is None:
        raise DamaError(f"{metadata_path(dataset_path)} has no hardness_mean (no pair was scored)")
    return float(value)

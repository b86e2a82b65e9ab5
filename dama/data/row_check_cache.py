"""The row check's verdict, kept per input, so that a second run on the same files does not decode every image again.

A stored verdict (dama.data.validation.RowVerdict) is used only when everything it depends on is unchanged:
- the input's files: each data file (the parquet shards, or the JSON file) and the metadata file beside the input
  (`<input>.meta.json`, whose skip list the check inherits), by resolved path, size, modification time and inode;
- the image files rows name by path instead of embedding the bytes, the same each (or their absence);
- the settings: which cells are checked (RowChecks), the image folder, `select`, `limit`, the pixel limit and the
  version of the check's rules (validation.CHECK_RULES_VERSION).
Where: `.dama_row_check/` in the input's folder when that folder is writable, else the user's cache folder
($XDG_CACHE_HOME, by default ~/.cache, then dama/row_check). A stored file that cannot be read as a verdict is ignored
and replaced. Only complete verdicts are stored: under on_bad_row "error" a check that stopped at a bad row is not.

Under torch.distributed, process 0 reads or computes the verdict (and stores it); the others receive it from process
0 by a broadcast, instead of decoding every image themselves (a broadcast, not the file: nodes may not share a disk).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from dama.errors import DamaError

from .formats import MAX_IMAGE_PIXELS, detect_format, metadata_path, parquet_files, write_json_atomic

logger = logging.getLogger(__name__)

CACHE_FOLDER = ".dama_row_check"
STORE_FORMAT = 1


@dataclass
class RowVerdict:
    """What the row check found in an input, before on_bad_row is applied: its row count and each bad row as
    [row_id, reason, detail], in row order. `complete` is False when the check stopped at the first bad row."""

    total: int
    problems: list[list[str]]
    complete: bool = True


def _file_identity(path: Path) -> list:
    """[resolved path, size, modification time in ns, inode], or [path, None, None, None] when there is no such
    file. The inode tells a file replaced by a rename from one rewritten in place."""
    try:
        stat = path.stat()
    except OSError:
        return [str(path), None, None, None]
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino]


def _image_paths(column: pa.ChunkedArray) -> Iterator[str]:
    """The paths an image column names where it embeds no bytes (Arrow-level: no image is read or decoded)."""
    for chunk in column.chunks:
        if pa.types.is_struct(chunk.type) and chunk.type.get_field_index("path") >= 0:
            paths = pc.struct_field(chunk, "path")
            if chunk.type.get_field_index("bytes") >= 0:
                paths = pc.if_else(pc.is_null(pc.struct_field(chunk, "bytes")), paths, pa.scalar(None, paths.type))
            yield from (path for path in pc.drop_null(paths).to_pylist() if path)
        elif pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):
            for text in chunk.to_pylist():
                if text and text.startswith("{"):
                    cell = json.loads(text)
                    text = cell.get("path") if cell.get("bytes") is None else None
                if text:
                    yield text


def image_files_digest(rows: datasets.Dataset, image_folder: Path | None) -> str:
    """One digest of the identity of every image file the rows name (resolved as formats.open_row_image does)."""
    table = rows.data.table
    digest = hashlib.sha256()
    for name in ("image", "image_path"):
        if name not in table.column_names:
            continue
        for text in _image_paths(table.column(name)):
            file = Path(text)
            if not file.is_absolute() and image_folder is not None:
                file = image_folder / file
            digest.update(json.dumps(_file_identity(file)).encode() + b"\n")
    return digest.hexdigest()


def verdict_key(path: str | Path, rows: datasets.Dataset, image_folder: Path | None,
                settings: Mapping[str, Any]) -> dict[str, Any]:
    """Everything a verdict on the input at `path` depends on (module docstring), as JSON values."""
    path = Path(path)
    data_files = parquet_files(path) if detect_format(path) == "parquet" else [path]
    return {
        "input": str(path.resolve()),
        "files": [_file_identity(file) for file in [*data_files, metadata_path(path)]],
        "images": image_files_digest(rows, image_folder),
        "settings": {**settings, "image_folder": None if image_folder is None else str(image_folder.resolve()),
                     "max_image_pixels": MAX_IMAGE_PIXELS},
    }


def _user_cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base, "dama", "row_check")


def store_paths(path: str | Path, key: Mapping[str, Any]) -> list[Path]:
    """Where the verdict for (input, settings) lives: beside the input first, then in the user's cache folder."""
    named = json.dumps([key["input"], key["settings"]], sort_keys=True)
    name = f"{Path(path).name}.{hashlib.sha256(named.encode()).hexdigest()[:16]}.json"
    return [Path(path).resolve().parent / CACHE_FOLDER / name, _user_cache_folder() / name]


def load_verdict(path: str | Path, key: Mapping[str, Any]) -> RowVerdict | None:
    """The stored verdict whose key equals `key`, or None (none stored, another key, or an unreadable file)."""
    for file in store_paths(path, key):
        if not file.is_file():
            continue
        try:
            stored = json.loads(file.read_text(encoding="utf-8"))
            if stored.get("format") != STORE_FORMAT or stored.get("key") != json.loads(json.dumps(key)):
                continue
            verdict = stored["verdict"]
            problems = [[str(part) for part in problem] for problem in verdict["problems"]]
            if not all(len(problem) == 3 for problem in problems):
                raise ValueError("a problem is not [row_id, reason, detail]")
            return RowVerdict(total=int(verdict["total"]), problems=problems)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning("ignoring the stored row check %s: it cannot be read (%s)", file, error)
    return None


def store_verdict(path: str | Path, key: Mapping[str, Any], verdict: RowVerdict) -> Path | None:
    """Writes a complete verdict beside the input, or in the user's cache folder when that fails; where it went."""
    record = {"format": STORE_FORMAT, "key": key, "verdict": {"total": verdict.total, "problems": verdict.problems}}
    for file in store_paths(path, key):
        try:
            write_json_atomic(file, record)
            return file
        except OSError as error:
            logger.info("cannot store the row check in %s (%s)", file.parent, error)
    logger.warning("the row check of %s could not be stored; the next run checks every row again", path)
    return None


def from_process_zero(compute: Callable[[], Any]) -> Any:
    """compute() on process 0, its result sent to the others, under torch.distributed; plainly compute() otherwise.

    An exception on process 0 reaches the others too (a DamaError as a DamaError), so that no process waits for
    a result that will not come.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    message: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            result = compute()
        except Exception as error:
            dist.broadcast_object_list([("error", isinstance(error, DamaError), str(error))], src=0)
            raise
        dist.broadcast_object_list([("result", result)], src=0)
        return result
    dist.broadcast_object_list(message, src=0)
    if message[0][0] == "error":
        _, is_bad_input, text = message[0]
        raise (DamaError if is_bad_input else RuntimeError)(f"process 0 failed: {text}")
    return message[0][1]


def cached_verdict(path: str | Path, rows: datasets.Dataset, image_folder: Path | None,
                   settings: Mapping[str, Any], compute: Callable[[], RowVerdict]) -> RowVerdict:
    """The verdict on the input at `path`: the stored one when its key matches, else compute() (stored when
    complete); process 0's under torch.distributed."""

    def on_process_zero() -> RowVerdict:
        key = verdict_key(path, rows, image_folder, settings)
        stored = load_verdict(path, key)
        if stored is not None:
            logger.info("%s: the rows were checked by an earlier run on the same files and settings", path)
            return stored
        verdict = compute()
        if verdict.complete:
            store_verdict(path, key, verdict)
        return verdict

    return from_process_zero(on_process_zero)

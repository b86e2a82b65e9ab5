"""The `{image, question}` rows that `dama generate` answers, from any input it accepts.

- JSONL (`.jsonl`): one object per line with `question` and `image`, and optionally `id` and `image_id` (the layout
  of Object HalBench's prompt file). `image` is a file path, relative to the image folder (default: the JSONL's
  folder), or the image itself as base64 text (optionally as a `data:image/...;base64,` URI).
- The preference formats training reads (RLAIF-V parquet, a file or a folder of shards; the authors' JSON list),
  through `dama.data.formats.load_preference_rows`: only the question and the image are used.

Every row is named "<file name>:<row number in that file>" (`file_row_id`), as in the offline passes. A row's
output `id` is its own `id` when the JSONL gives one, else that row name; its `image_id` is the JSONL's
`image_id`, else the image file's name, and for the preference formats (which carry no image id) the row's `idx`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from dama.data.formats import PairRow, RowImageError, default_image_folder, file_row_id, load_preference_rows
from dama.data.validation import BadRowError, SkipReport
from dama.errors import DamaError

JSONL_SUFFIX = ".jsonl"
_DATA_URI = "data:image/"
EMPTY_QUESTION = "empty question"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class PromptRow:
    """One question about one image; the image is decoded only when `load_image` is called."""

    pair: PairRow
    id: Any
    image_id: Any

    @property
    def row_id(self) -> str:
        return self.pair.row_id

    @property
    def question(self) -> str:
        return self.pair.question

    def load_image(self) -> Image.Image:
        """The RGB image; DamaError naming the row when it is missing or unreadable (dama.data.formats' rule)."""
        return self.pair.load_image()

    @property
    def fingerprint(self) -> str:
        """A short hash of the question and the image's name (or bytes): a resumed row must still be the same."""
        image = self.pair.image
        if isinstance(image, str):
            image = json.loads(image) if image.startswith("{") else {"path": image}
        if isinstance(image, dict) and image.get("bytes") is not None:
            source = hashlib.sha1(image["bytes"]).hexdigest()
        else:
            path = (image.get("path") if isinstance(image, dict) else None) or self.pair.image_path
            source = None if path is None else Path(path).name
        return hashlib.sha1(json.dumps([self.question, source]).encode("utf-8")).hexdigest()[:16]


def _names_a_file(value: str, folder: Path) -> bool:
    # Base64 has no "." and JPEG data starts with "/9j/", so neither a suffix nor a leading "/" is taken alone.
    if Path(value).suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        return (folder / value).is_file()
    except OSError:  # e.g. a base64 "path component" longer than the file system allows
        return False


def _image_source(value: str, folder: Path, row_id: str) -> tuple[bytes | None, str | None]:
    """(bytes, None) for base64 image text, (None, path) for a file path (relative ones resolve under `folder`)."""
    if value.startswith(_DATA_URI):
        value = value.split(",", 1)[-1]
    elif _names_a_file(value, folder):
        return None, value
    try:
        return base64.b64decode(value, validate=True), None
    except (binascii.Error, ValueError) as error:
        raise DamaError(f"row {row_id}: `image` is neither an image file's path nor base64 image data") from error


def _jsonl_rows(path: Path, folder: Path, limit: int | None) -> Iterator[PromptRow]:
    with open(path, encoding="utf-8") as handle:
        number = 0
        for line_number, line in enumerate(handle, start=1):
            if limit is not None and number >= limit:
                return
            if not line.strip():
                continue
            row_id = file_row_id(path, number)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DamaError(f"{path}, line {line_number}: not a JSON object ({error})") from error
            image = record.get("image") if isinstance(record, dict) else None
            if not isinstance(image, str) or not isinstance(record.get("question"), str):
                raise DamaError(f"{path}, line {line_number}: expected an object with a text `question` and an "
                                "`image` (a file path or base64 image data)")
            image_bytes, image_path = _image_source(image, folder, row_id)
            pair = PairRow(row_id=row_id, question=record["question"], chosen="", rejected="",
                           image=None if image_bytes is None else {"bytes": image_bytes}, image_path=image_path,
                           image_folder=folder)
            default_image_id = Path(image_path).name if image_path is not None else None
            yield PromptRow(pair, id=record.get("id", row_id), image_id=record.get("image_id", default_image_id))
            number += 1


def iter_prompt_rows(
    input_path: str | Path,
    image_folder: str | Path | None = None,
    limit: int | None = None,
    *,
    select: Sequence[str] = (),
    cache_dir: str | Path | None = None,
) -> Iterator[PromptRow]:
    """The rows of a JSONL, parquet or JSON input in file order, at most `limit` of them (see the module docstring).

    `select` keeps the rows of a preference input that meet its conditions (dama.data.formats); `cache_dir` is the
    datasets library's cache of a parquet input.
    """
    input_path = Path(input_path)
    if not input_path.exists():
        raise DamaError(f"input {input_path} does not exist")
    folder = Path(image_folder) if image_folder is not None else default_image_folder(input_path)
    if input_path.suffix == JSONL_SUFFIX:
        if select:
            raise DamaError("--select keeps rows of a parquet or .json preference input, not of a .jsonl of questions")
        yield from _jsonl_rows(input_path, folder, limit)
        return
    for record in load_preference_rows(input_path, limit=limit, select=select, cache_dir=cache_dir):
        pair = PairRow.from_record(record, folder)
        yield PromptRow(pair, id=pair.row_id, image_id=pair.idx)


def prompt_row_problem(row: PromptRow) -> tuple[str, str] | None:
    """(reason, detail) of what makes a row unanswerable (an empty question, an image that does not decode), or None.

    Decodes the image, as the preference rows' check does (dama.data.validation).
    """
    if not row.question.strip():
        return EMPTY_QUESTION, f"row {row.row_id}: its question is empty"
    try:
        row.load_image()
    except RowImageError as error:
        return error.reason, str(error)
    return None


def check_prompt_rows(rows: Iterable[PromptRow], on_bad_row: str, skip_hint: str) -> SkipReport:
    """Every row checked before any is answered: the first bad one raises BadRowError (on_bad_row="error", the
    message ends with `skip_hint`), or each is recorded in the report ("skip"). DamaError when every row is bad."""
    from tqdm.auto import tqdm

    report = SkipReport(total=0)
    for row in tqdm(rows, desc="checking rows", unit="row", disable=None):
        report.total += 1
        problem = prompt_row_problem(row)
        if problem is None:
            continue
        reason, detail = problem
        if on_bad_row == "error":
            raise BadRowError(f"{detail}. {skip_hint}")
        report.add(row.row_id, reason, detail)
    if report.total and not report.kept:
        raise DamaError(f"every row is bad ({report.summary()}): check that it is the right file")
    return report

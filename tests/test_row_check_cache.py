"""The row check's stored verdict (dama.data.row_check_cache): a second check of unchanged files decodes no image;
a changed file, image or setting, or an unreadable stored verdict, checks every row again; under torch.distributed
only process 0 decodes."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from dama.data import row_check_cache, validation
from dama.data.validation import BadRowError, RowChecks, check_input
from dama.demo.data import make_rows
from tests.test_bad_rows import TRUNCATED_JPEG

NUM_ROWS = 6


def _write(rows, path):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images the row check decodes."""
    counter = {"n": 0}
    original = validation.open_row_image

    def counting(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(validation, "open_row_image", counting)
    return counter


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    rows = make_rows(NUM_ROWS, seed=0, image_size=16, split="train")
    rows[4]["image"] = {"bytes": TRUNCATED_JPEG, "path": None}
    (tmp_path / "data").mkdir()
    return rows, _write(rows, tmp_path / "data" / "train.parquet")


def check(path, checks: RowChecks | None = None, on_bad_row="skip", **options):
    return check_input(path, checks or RowChecks(), on_bad_row=on_bad_row, skip_hint="Skip it.", **options)


def test_a_second_check_of_the_same_files_decodes_nothing_and_gives_the_same_report(data, decodes):
    _, path = data
    first = check(path)
    assert decodes["n"] == NUM_ROWS
    stored = list((path.parent / row_check_cache.CACHE_FOLDER).iterdir())
    assert len(stored) == 1 and stored[0].name.startswith("train.parquet.")
    second = check(path)
    assert decodes["n"] == NUM_ROWS  # none more
    assert second.report.as_dict() == first.report.as_dict()
    assert [entry["row_id"] for entry in second.report.skipped] == ["train.parquet:4"]
    assert second.rows["row_id"] == first.rows["row_id"]


def test_a_stored_skip_verdict_still_stops_a_run_with_on_bad_row_error(data, decodes):
    _, path = data
    check(path)
    with pytest.raises(BadRowError, match=r"^row train.parquet:4: cannot read its image .*\. Skip it\.$"):
        check(path, on_bad_row="error")
    assert decodes["n"] == NUM_ROWS


def test_a_check_stopped_at_a_bad_row_is_not_stored(data, decodes):
    _, path = data
    with pytest.raises(BadRowError):
        check(path, on_bad_row="error")
    assert not (path.parent / row_check_cache.CACHE_FOLDER).exists()


def test_a_touched_or_rewritten_file_is_checked_again(data, decodes):
    rows, path = data
    check(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched, content the same
    check(path)
    assert decodes["n"] == 2 * NUM_ROWS
    rows[4]["image"] = rows[3]["image"]  # the bad row repaired
    _write(rows, path)
    assert check(path).report.skipped == []
    assert decodes["n"] == 3 * NUM_ROWS


def test_changed_settings_check_again(data, decodes):
    _, path = data
    check(path)
    check(path, checks=RowChecks(hardness=True))
    assert decodes["n"] == 2 * NUM_ROWS
    assert check(path, limit=3).report.total == 3
    assert decodes["n"] == 2 * NUM_ROWS + 3
    check(path, image_folder=path.parent.parent)
    assert decodes["n"] == 3 * NUM_ROWS + 3
    check(path)  # the first settings again: still stored
    assert decodes["n"] == 3 * NUM_ROWS + 3


def test_an_earlier_steps_skip_list_is_part_of_the_key(data, decodes):
    _, path = data
    check(path)
    Path(f"{path}.meta.json").write_text(json.dumps({"skipped": [
        {"row_id": "raw.parquet:1", "reason": "over-long", "detail": "too long", "output_row_id": "train.parquet:1"}]}))
    report = check(path).report
    assert decodes["n"] == 2 * NUM_ROWS - 1  # row 1 is left out without a look at its image
    assert sorted(entry["row_id"] for entry in report.skipped) == ["train.parquet:1", "train.parquet:4"]


@pytest.mark.parametrize("damage", ["not json", "truncated", "wrong shape"])
def test_an_unreadable_stored_verdict_is_ignored_and_replaced(data, decodes, damage, caplog):
    _, path = data
    check(path)
    [stored] = (path.parent / row_check_cache.CACHE_FOLDER).iterdir()
    text = stored.read_text()
    stored.write_text({"not json": "\0garbage", "truncated": text[: len(text) // 2],
                       "wrong shape": text.replace('"problems": [[', '"problems": [["extra", ')}[damage])
    assert [entry["row_id"] for entry in check(path).report.skipped] == ["train.parquet:4"]
    assert decodes["n"] == 2 * NUM_ROWS
    assert "ignoring the stored row check" in caplog.text
    check(path)  # replaced by a good one
    assert decodes["n"] == 2 * NUM_ROWS


def test_an_image_named_by_path_is_part_of_the_key(tmp_path, decodes, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    rows = make_rows(2, seed=0, image_size=16, split="train")
    for row in rows:
        Path(tmp_path, row["image_path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(tmp_path, row["image_path"]).write_bytes(row["image"]["bytes"])
        row["image"] = None
    path = _write(rows, tmp_path / "train.parquet")
    assert check(path).report.skipped == []
    check(path)
    assert decodes["n"] == 2
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    Path(tmp_path, rows[1]["image_path"]).write_bytes(buffer.getvalue())  # another image under the same name
    check(path)
    assert decodes["n"] == 4


def test_the_verdict_goes_to_the_user_cache_when_the_data_folder_is_not_writable(data, decodes, tmp_path):
    _, path = data
    (path.parent / row_check_cache.CACHE_FOLDER).write_text("a file where the folder would go")
    check(path)
    assert [p.parent for p in (tmp_path / "user-cache").rglob("train.parquet.*.json")] == [
        tmp_path / "user-cache" / "dama" / "row_check"]
    check(path)
    assert decodes["n"] == NUM_ROWS


def _check_on_rank(rank: int, path: str, rendezvous: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    counter = {"n": 0}
    original = validation.open_row_image

    def counting(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    validation.open_row_image = counting
    try:
        report = check(path).report.as_dict()
        Path(results, f"{rank}.json").write_text(json.dumps({"decodes": counter["n"], "report": report}))
    finally:
        dist.destroy_process_group()


def test_under_torch_distributed_only_process_zero_decodes(data, tmp_path):
    _, path = data
    mp.spawn(_check_on_rank, args=(str(path), str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    zero, one = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert (zero["decodes"], one["decodes"]) == (NUM_ROWS, 0)
    assert zero["report"] == one["report"] and zero["report"]["skipped_count"] == 1

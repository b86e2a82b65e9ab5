"""Hardness: the softmax/δ maths by hand, CLIP scoring, and the pipeline end to end on a tiny random CLIP."""

import io
import json
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dama.data import row_check_cache
from dama.data.formats import PairRow, atomic_path, metadata_path, read_hardness_mean, read_metadata
from dama.demo.tiny_clip import build_tiny_clip
from dama.offline.hardness import (
    BadRowError,
    ClipScorer,
    HardnessOptions,
    compute_hardness,
    main,
    pair_hardness,
    score_pairs,
)
from dama.offline.passes import PartialResults, partial_path
from dama.offline.splitting import RuleSplitter

# Row 2 has a corrupt image and row 4 an empty rejected response; the JSON copy also loses row 5's image file.
CORRUPT_ROW, EMPTY_ROW, MISSING_ROW = 2, 4, 5
ROW_COUNT = 7


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


def _image_bytes(number: int) -> bytes:
    rng = random.Random(number)
    image = Image.new("RGB", (40, 30), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(30):
        image.putpixel((rng.randrange(40), rng.randrange(30)), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _records() -> list[dict]:
    records = []
    for number in range(ROW_COUNT):
        image = b"this is not an image" if number == CORRUPT_ROW else _image_bytes(number)
        records.append(
            {
                "ds_name": "RLAIF-V",
                "image": {"bytes": image, "path": f"img_{number}.png"},
                "question": f"What is in picture {number}?",
                "chosen": f"Picture {number} shows a red square on a white table. A cup, e.g. mug {number}, is near.",
                "rejected": "" if number == EMPTY_ROW else f"Picture {number} shows {number + 2} blue circles.",
                "origin_dataset": "demo",
                "origin_split": "train",
                "idx": 100 + number,
                "image_path": f"img_{number}.png",
            }
        )
    return records


def _write_parquet_shards(folder):
    folder.mkdir()
    records = _records()
    pq.write_table(pa.Table.from_pylist(records[:4]), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(records[4:]), folder / "train-00001-of-00002.parquet")
    return folder


def _write_json(folder):
    images = folder / "images"
    images.mkdir(parents=True)
    rows = []
    for record in _records():
        record = dict(record)
        image = record.pop("image")
        if record["idx"] != 100 + MISSING_ROW:
            (images / record["image_path"]).write_bytes(image["bytes"])
        record.pop("ds_name")
        rows.append(record)
    path = folder / "pairs.json"
    path.write_text(json.dumps(rows))
    return path, images


class RecordingScorer:
    """Wraps a scorer, remembers every call's texts, and raises after `crash_after` calls (a simulated crash)."""

    def __init__(self, inner, crash_after=None):
        self.inner, self.crash_after, self.calls = inner, crash_after, []

    def score(self, images, texts):
        if self.crash_after is not None and len(self.calls) == self.crash_after:
            raise RuntimeError("simulated crash")
        self.calls.append(texts)
        assert len(images) == len(texts)  # one image per pair, encoded once
        return self.inner.score(images, texts)


class LengthScorer:
    """A fake scorer whose score of a text is its length / 10, independent of the image."""

    def score(self, images, texts):
        return [torch.tensor([len(text) / 10 for text in pair_texts]) for pair_texts in texts]


def _read_output(path):
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return pq.read_table(path).to_pylist()


def test_pair_hardness_matches_hand_computation():
    chosen, rejected = [1.0, 2.0], [0.5, -1.0, 3.0]
    denominator = sum(math.exp(value) for value in chosen + rejected)
    expected_chosen = [math.exp(value) / denominator for value in chosen]
    expected_rejected = [math.exp(value) / denominator for value in rejected]
    result = pair_hardness(torch.tensor(chosen), torch.tensor(rejected))
    assert result.chosen_logits == pytest.approx(expected_chosen, rel=1e-12)
    assert result.rejected_logits == pytest.approx(expected_rejected, rel=1e-12)
    assert result.hardness == pytest.approx(sum(expected_chosen) - sum(expected_rejected), rel=1e-12)
    raw = pair_hardness(torch.tensor(chosen), torch.tensor(rejected), raw=True)
    assert raw.chosen_logits == chosen and raw.rejected_logits == rejected
    assert raw.hardness == pytest.approx(sum(chosen) - sum(rejected))


def test_pair_hardness_rejects_empty_scores():
    with pytest.raises(ValueError, match="at least one sub-sentence"):
        pair_hardness(torch.tensor([1.0]), torch.tensor([]))


def test_score_pairs_batches_and_maths_with_a_fake_scorer(tmp_path):
    rows = [PairRow(f"fake:{n}", "q", f"Chosen {n}. It is true.", "Rejected.", n, {"bytes": _image_bytes(n)})
            for n in range(5)]
    scorer = RecordingScorer(LengthScorer())
    with PartialResults(tmp_path / "partial.jsonl", {"test": True}) as partial:
        outcome = score_pairs(rows, RuleSplitter(), scorer, partial, batch_size=2)
    assert [len(call) for call in scorer.calls] == [2, 2, 1]
    assert outcome.computed == 5 and outcome.resumed == 0 and outcome.skipped == []
    chosen_scores = [len(f"Chosen {3}.") / 10, len("It is true.") / 10]
    expected = pair_hardness(torch.tensor(chosen_scores), torch.tensor([len("Rejected.") / 10]))
    result = outcome.results["fake:3"]
    assert result["chosen_logits"] == pytest.approx(expected.chosen_logits)
    assert result["hardness"] == pytest.approx(expected.hardness)


def test_clip_scorer_equals_logits_per_image(clip_path):
    from transformers import CLIPModel, CLIPProcessor

    scorer = ClipScorer(clip_path)
    images = [Image.open(io.BytesIO(_image_bytes(n))).convert("RGB") for n in range(2)]
    texts = [["a red square", "a blue circle on a table"], ["two dogs"]]
    scores = scorer.score(images, texts)
    model, processor = CLIPModel.from_pretrained(clip_path).eval(), CLIPProcessor.from_pretrained(clip_path)
    for image, pair_texts, pair_scores in zip(images, texts, scores, strict=True):
        inputs = processor(text=pair_texts, images=image, return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = model(**inputs).logits_per_image[0]  # (T_p,)
        torch.testing.assert_close(pair_scores, expected, rtol=1e-5, atol=1e-5)
    long_text = " ".join(["word"] * 200)
    (long_score,) = scorer.score(images[:1], [[long_text]])
    assert long_score.shape == (1,) and torch.isfinite(long_score).all()


@pytest.mark.parametrize("kind", ["parquet", "json"])
def test_bad_rows_stop_the_run_naming_the_row(tmp_path, clip_path, kind, capsys):
    if kind == "parquet":
        data, images, first_bad = _write_parquet_shards(tmp_path / "shards"), None, "train-00000-of-00002.parquet:2"
    else:
        (data, images), first_bad = _write_json(tmp_path), "pairs.json:2"
    output = tmp_path / f"out.{kind}"
    with pytest.raises(BadRowError, match=rf"row {first_bad}: cannot read its image.*: not a format PIL reads"):
        compute_hardness(HardnessOptions(input=data, output=output, clip=clip_path, image_folder=images, batch_size=2,
                                         device="cpu"))
    assert not output.exists() and not metadata_path(output).exists()
    argv = ["--input", str(data), "--clip", str(clip_path), "--output", str(output)]
    assert main(argv + (["--image-folder", str(images)] if images else [])) == 1
    assert f"row {first_bad}" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["parquet", "json"])
def test_skip_mode_end_to_end(tmp_path, clip_path, kind):
    if kind == "parquet":
        data, images = _write_parquet_shards(tmp_path / "shards"), None
        bad = {"train-00000-of-00002.parquet:2", "train-00001-of-00002.parquet:0"}
    else:
        (data, images) = _write_json(tmp_path)
        bad = {f"pairs.json:{n}" for n in (CORRUPT_ROW, EMPTY_ROW, MISSING_ROW)}
    output = tmp_path / f"out.{kind}"
    metadata = compute_hardness(HardnessOptions(input=data, output=output, clip=clip_path, image_folder=images,
                                                batch_size=2, on_bad_row="skip", device="cpu"))

    assert {entry["row_id"] for entry in metadata["skipped"]} == bad
    assert metadata["skipped_count"] == len(bad) and metadata["count"] == ROW_COUNT - len(bad)
    expected = {"unreadable image": 1, "empty response": 1, **({"missing image": 1} if kind == "json" else {})}
    assert metadata["skipped_by_reason"] == expected
    assert any("its rejected response is empty" in entry["detail"] for entry in metadata["skipped"])
    # Each skipped row is named by its id in the output too, where the next step finds it.
    bad_numbers = (CORRUPT_ROW, EMPTY_ROW, MISSING_ROW) if kind == "json" else (CORRUPT_ROW, EMPTY_ROW)
    assert {entry["output_row_id"] for entry in metadata["skipped"]} == {f"{output.name}:{n}" for n in bad_numbers}
    rows = _read_output(output)
    assert len(rows) == ROW_COUNT
    originals = _records()
    hardness = []
    for number, row in enumerate(rows):
        assert row["question"] == originals[number]["question"] and row["idx"] == originals[number]["idx"]
        if row["hardness"] is None:
            assert row["chosen_logits"] is None and row["rejected_logits"] is None
            continue
        chosen, rejected = list(row["chosen_logits"]), list(row["rejected_logits"])
        assert len(chosen) == 2 and len(rejected) == 1  # two chosen sentences, one rejected
        assert math.fsum(chosen + rejected) == pytest.approx(1.0)
        assert row["hardness"] == pytest.approx(sum(chosen) - sum(rejected))
        hardness.append(row["hardness"])
    assert len(hardness) == metadata["count"]
    assert read_hardness_mean(output) == pytest.approx(sum(hardness) / len(hardness), rel=1e-12)
    assert read_metadata(output)["raw"] is False
    if kind == "parquet":
        assert rows[0]["image"]["bytes"] == originals[0]["image"]["bytes"]
    assert not partial_path(output).exists()
    # No temporary file left behind; the row check's stored verdict (beside the input) is meant to stay.
    hidden = {path.name for path in tmp_path.iterdir() if path.name.startswith(".")}
    assert hidden == {row_check_cache.CACHE_FOLDER}


def test_resume_after_a_crash_skips_finished_rows_and_matches_an_uninterrupted_run(tmp_path, clip_path):
    data = _write_parquet_shards(tmp_path / "shards")
    options = {"clip": clip_path, "batch_size": 2, "on_bad_row": "skip", "device": "cpu"}
    reference = tmp_path / "reference.parquet"
    compute_hardness(HardnessOptions(input=data, output=reference, **options))

    output = tmp_path / "out.parquet"
    crashing = RecordingScorer(ClipScorer(clip_path), crash_after=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        compute_hardness(HardnessOptions(input=data, output=output, **options), scorer=crashing)
    assert not output.exists() and partial_path(output).exists()
    first_batch = {text for pair_texts in crashing.calls[0] for text in pair_texts}

    rerun = RecordingScorer(ClipScorer(clip_path))
    metadata = compute_hardness(HardnessOptions(input=data, output=output, **options), scorer=rerun)
    rescored = {text for call in rerun.calls for pair_texts in call for text in pair_texts}
    assert first_batch and not first_batch & rescored
    assert metadata["resumed"] == 2 and metadata["count"] == 5
    got, expected = _read_output(output), _read_output(reference)
    assert [row["hardness"] for row in got] == pytest.approx([row["hardness"] for row in expected], abs=1e-6)
    assert [row["question"] for row in got] == [row["question"] for row in expected]
    for got_row, expected_row in zip(got, expected, strict=True):
        for column in ("chosen_logits", "rejected_logits"):
            if expected_row[column] is None:
                assert got_row[column] is None
            else:
                assert got_row[column] == pytest.approx(expected_row[column], abs=1e-6)
    assert read_hardness_mean(output) == pytest.approx(read_hardness_mean(reference), abs=1e-6)
    assert not partial_path(output).exists()


def test_resume_refuses_other_settings_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "partial.jsonl"
    with PartialResults(path, {"raw": False}) as partial:
        partial.append([{"row_id": "a:0", "fingerprint": "f", "hardness": 0.5}])
    with open(path, "a") as handle:
        handle.write('{"row_id": "a:1", "finger')  # a crash in the middle of a line
    with PartialResults(path, {"raw": False}) as partial:
        assert list(partial.done) == ["a:0"]
    assert path.read_text().endswith("}\n")
    with pytest.raises(ValueError, match="other settings"):
        PartialResults(path, {"raw": True})


def test_atomic_path_leaves_the_old_file_on_a_crash(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half of a new fi")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["out.json"]


def test_cli_raw_limit_and_argument_checks(tmp_path, clip_path, capsys):
    data, images = _write_json(tmp_path)
    output = tmp_path / "out.json"
    argv = ["--input", str(data), "--image-folder", str(images), "--clip", str(clip_path), "--output", str(output)]
    assert main([*argv, "--limit", "2", "--raw", "--batch-size", "3"]) == 0
    assert "scored 2 pairs" in capsys.readouterr().out
    rows = _read_output(output)
    assert len(rows) == 2
    metadata = read_metadata(output)
    assert metadata["raw"] is True and metadata["limit"] == 2
    # Raw scores are CLIP logits (scale ~14 · cosine), not probabilities summing to one.
    assert rows[0]["hardness"] == pytest.approx(sum(rows[0]["chosen_logits"]) - sum(rows[0]["rejected_logits"]))
    assert metadata["hardness_mean"] == pytest.approx((rows[0]["hardness"] + rows[1]["hardness"]) / 2)

    # --limit counts selected rows: the one row meeting both conditions is the fourth of the input, idx 103.
    assert main([*argv, "--select", "idx~10", "--select", "question~picture 3", "--limit", "1", "--overwrite"]) == 0
    assert [row["idx"] for row in _read_output(output)] == [103]
    assert read_metadata(output)["select"] == ["idx~10", "question~picture 3"]
    assert main([*argv, "--select", "origin_split=test", "--overwrite"]) == 1
    assert "values found: origin_split: 'train' (" in capsys.readouterr().err

    assert main([*argv[:-1], str(tmp_path / "out.parquet")]) == 1
    assert "give an --output ending in .json" in capsys.readouterr().err
    assert main([*argv, "--splitter", "lm"]) == 1
    assert "--splitter-model" in capsys.readouterr().err
    assert main([*argv, "--batch-size", "0"]) == 1
    assert "batch_size must be at least 1" in capsys.readouterr().err
    assert main([*argv[:-3], str(tmp_path / "no_clip"), *argv[-2:]]) == 1
    assert "--clip" in capsys.readouterr().err

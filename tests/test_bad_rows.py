"""Bad rows: one check shared by every step (dama.data.validation), run before the first pair is scored or trained
on; broken images named by row; skip or stop; a skip in one step never breaks the next; pass outputs are never
overwritten by another run."""

from __future__ import annotations

import functools
import io
import json
import math
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dama.data.formats import (
    IMAGE_MISSING,
    IMAGE_TOO_LARGE,
    IMAGE_UNREADABLE,
    MAX_IMAGE_PIXELS,
    RowImageError,
    load_preference_rows,
    open_row_image,
    read_metadata,
)
from dama.data.validation import BadRowError, RowChecks, upstream_skips, validate_rows
from dama.demo.data import demo_corpus, make_rows
from dama.demo.tiny_clip import build_tiny_clip
from dama.demo.tiny_llava import build_tiny_llava
from dama.offline import hardness, reference
from dama.offline.hardness import HardnessOptions
from dama.offline.passes import partial_path
from dama.offline.reference import ReferenceOptions
from dama.training import train


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((48, 40), 60).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def huge_png() -> bytes:
    """10000 x 6000 one-bit pixels: 60 megapixels, over MAX_IMAGE_PIXELS, and a few kB on disk."""
    return _png((10_000, 6_000), mode="1")


TRUNCATED_JPEG = _jpeg()[:-300]  # cut inside the entropy-coded data: the header reads, the pixels do not
NOT_AN_IMAGE = b"<html>this is not an image</html>"


def _write(rows: list[dict], path):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    ("image", "reason", "message"),
    [
        ({"bytes": TRUNCATED_JPEG, "path": None}, IMAGE_UNREADABLE, r"cannot read its image \(OSError: image file is "
         r"truncated \(\d+ bytes not processed\)\)"),
        ({"bytes": NOT_AN_IMAGE, "path": None}, IMAGE_UNREADABLE, "cannot read its image: not a format PIL reads"),
        ({"bytes": b"", "path": None}, IMAGE_UNREADABLE, "not a format PIL reads"),
        ({"bytes": None, "path": "gone.png"}, IMAGE_MISSING, r"its image file .*gone.png does not exist"),
        ({"bytes": None, "path": None}, IMAGE_MISSING, "has no image"),
        ("huge", IMAGE_TOO_LARGE, rf"10000 x 6000 = 60000000 pixels, over the limit of {MAX_IMAGE_PIXELS}"),
    ],
    ids=["truncated", "not-an-image", "empty", "missing-file", "no-image", "over-the-limit"],
)
def test_a_broken_image_is_one_value_error_naming_the_row(tmp_path, image, reason, message):
    image = {"bytes": huge_png(), "path": None} if image == "huge" else image
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing escapes as a warning either
        with pytest.raises(RowImageError, match=message) as error:
            open_row_image(image, None, tmp_path, "pairs.parquet:7")
    assert isinstance(error.value, ValueError) and error.value.reason == reason
    assert str(error.value).startswith("row pairs.parquet:7")


@pytest.mark.parametrize("pil_limit", [1000, 500], ids=["pil-warning", "pil-error"])
def test_pils_own_decompression_bomb_warning_and_error_become_the_same_error(monkeypatch, pil_limit):
    # 40 x 40 = 1600 pixels: over a limit of 1000 PIL warns, over twice 500 it raises.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RowImageError, match=r"row a.json:0: its image is too large \(Image size \(1600 pixels\)"):
            open_row_image({"bytes": _png((40, 40))}, None, None, "a.json:0")


def _one_bad_row_of_each_kind(tmp_path) -> tuple[list[dict], dict[int, str]]:
    """Demo rows with reference log-probs and hardness, and one bad row of each kind (number -> reason)."""
    rows = make_rows(16, seed=1, image_size=32, split="train")
    for row in rows:
        row.update(ref_chosen_logps=-20.0, ref_rejected_logps=-25.0, hardness=0.1)
    rows[1]["image"] = {"bytes": TRUNCATED_JPEG, "path": None}
    rows[3]["image"] = {"bytes": NOT_AN_IMAGE, "path": None}
    rows[4]["image"], rows[4]["image_path"] = {"bytes": None, "path": "gone.png"}, "gone.png"
    rows[6]["image"] = {"bytes": huge_png(), "path": None}
    rows[7]["rejected"] = "   "
    rows[8]["chosen"] = None
    rows[9]["hardness"] = math.inf
    rows[10]["hardness"] = None  # not scored: allowed (alpha_D = 1)
    rows[11]["ref_chosen_logps"] = None
    rows[12]["ref_rejected_logps"] = -math.inf
    rows[14]["chosen"] = " ".join(["a red circle on a white table."] * 80)  # longer than max_length
    reasons = {1: "unreadable image", 3: "unreadable image", 4: "missing image", 6: "image over the pixel limit",
               7: "empty response", 8: "missing field", 9: "non-finite hardness", 11: "missing reference log-probs",
               12: "non-finite reference log-probs"}
    return rows, reasons


def test_the_row_check_finds_every_kind_of_bad_row(tmp_path):
    rows, reasons = _one_bad_row_of_each_kind(tmp_path)
    data = load_preference_rows(_write(rows, tmp_path / "train.parquet"))
    checks = RowChecks(hardness=True, reference=True)
    report = validate_rows(data, tmp_path, checks, on_bad_row="skip", skip_hint="", source="train.parquet")
    assert {entry["row_id"]: entry["reason"] for entry in report.skipped} == {
        f"train.parquet:{n}": reason for n, reason in reasons.items()}
    assert report.counts()["unreadable image"] == 2 and report.kept == 16 - len(reasons)
    assert report.summary().startswith(f"left out {len(reasons)} of 16 rows (2 unreadable image, ")

    with pytest.raises(BadRowError, match=r"^row train.parquet:1: cannot read its image .*\. Skip them so\.$"):
        validate_rows(data, tmp_path, checks, on_bad_row="error", skip_hint="Skip them so.", source="train.parquet")
    # A row an earlier step left out is left out whatever on_bad_row says, with that step's reason.
    upstream = {f"train.parquet:{n}": {"reason": reasons[n], "detail": f"row x:{n} was bad"} for n in reasons}
    report = validate_rows(data, tmp_path, checks, on_bad_row="error", skip_hint="", source="train.parquet",
                           upstream=upstream)
    assert [entry["detail"] for entry in report.skipped][:1] == ["left out by an earlier step: row x:1 was bad"]
    # The steps that do not read a column do not check it; a file whose rows are all bad is an error.
    report = validate_rows(data, tmp_path, RowChecks(), on_bad_row="skip", skip_hint="", source="train.parquet")
    assert len(report.skipped) == 6
    no_rejected = [{**row, "rejected": None} for row in rows]
    with pytest.raises(ValueError, match=r"every row of t.parquet is bad \(left out 16 of 16 rows \(.*missing field"):
        validate_rows(load_preference_rows(_write(no_rejected, tmp_path / "t.parquet")), tmp_path, RowChecks(),
                      on_bad_row="skip", skip_hint="", source="t.parquet")
    with pytest.raises(ValueError, match="has no reference log-probs .*run `dama precompute-ref`"):
        validate_rows(data.remove_columns(["ref_chosen_logps", "ref_rejected_logps"]), tmp_path, checks,
                      on_bad_row="skip", skip_hint="", source="train.parquet")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny_llava(demo_corpus(), root / "llava", seed=0)
    return {"llava": root / "llava", "clip": build_tiny_clip(root / "clip")}


def _train_argv(models, train_file, output_dir, *extra):
    return ["--model_name_or_path", str(models["llava"]), "--train_file", str(train_file), "--output_dir",
            str(output_dir), "--per_device_train_batch_size", "4", "--max_steps", "1", "--use_cpu", "true",
            "--report_to", "none", "--save_strategy", "no", *extra]


def test_a_skip_in_one_step_never_breaks_the_next(models, tmp_path, capsys):
    """hardness --on-bad-row skip, then precompute-ref --overlong skip with a short max_length, then train with a
    longer max_length, both with the default on_bad_row=error: each later step leaves out what an earlier one did,
    with its reason, and finishes."""
    rows = make_rows(10, seed=2, image_size=32, split="train")
    rows[2]["image"] = {"bytes": TRUNCATED_JPEG, "path": None}
    rows[5]["rejected"] = ""
    source = _write(rows, tmp_path / "train.parquet")
    scored, ready = tmp_path / "train.scored.parquet", tmp_path / "train.ref.parquet"
    hardness.compute_hardness(HardnessOptions(input=source, output=scored, clip=models["clip"], on_bad_row="skip",
                                               device="cpu"))
    assert set(upstream_skips(scored)) == {"train.scored.parquet:2", "train.scored.parquet:5"}

    longest = _longest_sequences(models, rows)
    max_length = sorted(longest)[len(longest) // 2]
    long_rows = [n for n, length in enumerate(longest) if length > max_length and n not in (2, 5)]
    assert long_rows, "the demo pairs should differ in length"
    metadata = reference.precompute_reference(ReferenceOptions(input=scored, output=ready, model=models["llava"],
                                                               max_length=max_length, overlong="skip", device="cpu"))
    reasons = {entry["output_row_id"]: entry["reason"] for entry in metadata["skipped"]}
    assert reasons == {"train.ref.parquet:2": "unreadable image", "train.ref.parquet:5": "empty response",
                       **{f"train.ref.parquet:{n}": "over-long" for n in long_rows}}

    code = train.main(_train_argv(models, ready, tmp_path / "run", "--data_aware", "true"))
    assert code == 0, capsys.readouterr().err
    listed = json.loads((tmp_path / "run" / "skipped_rows.json").read_text())["train_file"]
    assert {entry["row_id"]: entry["reason"] for entry in listed["skipped"]} == reasons
    assert all(entry["detail"].startswith("left out by an earlier step: ") for entry in listed["skipped"])
    assert "left out by an earlier step: left out" not in json.dumps(listed)
    assert listed["kept"] == 10 - len(reasons) and (tmp_path / "run" / "run_complete.json").is_file()


def _longest_sequences(models, rows) -> list[int]:
    """Tokens of each pair's longer sequence (prompt with image tokens, plus the longer response)."""
    from transformers import LlavaProcessor

    from dama.data.dataset import PairEncoder

    encoder = PairEncoder(LlavaProcessor.from_pretrained(models["llava"], local_files_only=True))
    prompts = encoder.encode_prompts([row["question"] for row in rows])
    chosen = encoder.encode_responses([row["chosen"] for row in rows])
    rejected = encoder.encode_responses([row["rejected"] for row in rows])
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected, strict=True)]


def test_precompute_ref_names_an_over_large_image_or_skips_it(models, tmp_path, capsys):
    rows = make_rows(4, seed=3, image_size=32, split="train")
    rows[1]["image"] = {"bytes": huge_png(), "path": None}
    source = _write(rows, tmp_path / "pairs.parquet")
    argv = ["--input", str(source), "--model", str(models["llava"]), "--output", str(tmp_path / "out.parquet")]
    assert reference.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("dama precompute-ref: error: row pairs.parquet:1: its image is "
                                                   "10000 x 6000 = 60000000 pixels, over the limit")
    assert not any(tmp_path.glob("out.parquet*"))  # nothing written: the row check runs before anything else

    assert reference.main([*argv, "--on-bad-row", "skip"]) == 0
    assert "skipped 1 (1 image over the pixel limit)" in capsys.readouterr().out
    written = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [row["ref_chosen_logps"] is None for row in written] == [False, True, False, False]


class CountingScorer:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def score(self, images, texts):
        self.calls += 1
        return self.inner.score(images, texts)


def test_a_pass_output_is_replaced_only_by_its_own_run_or_with_overwrite(models, tmp_path, capsys):
    source = _write(make_rows(4, seed=4, image_size=32, split="train"), tmp_path / "pairs.parquet")
    output = tmp_path / "scored.parquet"
    argv = ["--input", str(source), "--clip", str(models["clip"]), "--output", str(output)]
    assert hardness.main(argv) == 0
    first = output.read_bytes()
    created = read_metadata(output)["created"]

    # The same run again: reported complete, nothing scored, nothing rewritten.
    scorer = CountingScorer(hardness.ClipScorer(models["clip"]))
    metadata = hardness.compute_hardness(HardnessOptions(input=source, output=output, clip=models["clip"],
                                                          device="cpu"), scorer=scorer)
    assert metadata["already_complete"] and scorer.calls == 0 and metadata["created"] == created
    capsys.readouterr()
    assert hardness.main(argv) == 0
    assert "is already complete (same input and settings" in capsys.readouterr().out

    # Another run (other settings, or an input rewritten since) is refused and leaves the output as it was.
    assert hardness.main([*argv, "--raw"]) == 1
    assert "already holds another run's output (settings.raw: False -> True)" in capsys.readouterr().err
    _write(make_rows(4, seed=5, image_size=32, split="train"), source)
    assert hardness.main(argv) == 1
    assert "the input files (changed since)" in capsys.readouterr().err
    assert output.read_bytes() == first and read_metadata(output)["created"] == created

    # --overwrite says what it replaces and replaces it.
    assert hardness.main([*argv, "--raw", "--overwrite"]) == 0
    assert "--overwrite: " in capsys.readouterr().err
    assert read_metadata(output)["raw"] is True and output.read_bytes() != first

    # Partial results of other settings: refused, then discarded with --overwrite.
    partial_path(output).write_text(json.dumps({"settings": {"raw": "other"}}) + "\n")
    assert hardness.main(argv) == 1
    assert "holds the partial results of a run with other settings" in capsys.readouterr().err
    assert hardness.main([*argv, "--overwrite"]) == 0
    assert f"removed {partial_path(output)}" in capsys.readouterr().err
    assert not partial_path(output).exists() and read_metadata(output)["raw"] is False

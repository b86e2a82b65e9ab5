"""`dama train` start-up: bad rows found before the first step (stop or skip), output folders that hold another run,
finished runs, clear one-line errors for config and data mistakes, and checkpoints that cannot run code."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dama.data.formats import write_metadata
from dama.demo.data import demo_corpus, make_rows
from dama.demo.tiny_llava import build_tiny_llava
from dama.method.loss import DamaLoss
from dama.training import train
from dama.training.arguments import parse_training_arguments
from dama.training.checkpointing import DAMA_STATE_NAME, restore_dama_state
from dama.training.run_folder import RUN_COMPLETE, SKIPPED_ROWS
from tests.test_bad_rows import TRUNCATED_JPEG, _one_bad_row_of_each_kind, huge_png


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llava"
    build_tiny_llava(demo_corpus(), path, seed=0)
    return path


def _write(rows, path):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def data(tmp_path):
    """12 good pairs with precomputed reference log-probs and hardness, and their metadata (δ̄)."""
    rows = make_rows(12, seed=0, image_size=32, split="train")
    for row in rows:
        row.update(ref_chosen_logps=-20.0, ref_rejected_logps=-25.0, hardness=0.1)
    path = _write(rows, tmp_path / "train.parquet")
    write_metadata(path, {"hardness_mean": 0.1})
    return rows, path


def _argv(model, train_file, output_dir, *extra):
    return ["--model_name_or_path", str(model), "--train_file", str(train_file), "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "1",
            "--use_cpu", "true", "--report_to", "none", "--seed", "0", *extra]


def _error_line(capsys, command="train") -> str:
    """The command's one error line; no traceback on the way."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"dama {command}: error: ")
    return line


def _digest(folder) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha1(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_corrupt_image_mid_epoch_stops_training_before_the_first_step(model, data, tmp_path, capsys):
    rows, path = data
    rows[7]["image"] = {"bytes": TRUNCATED_JPEG, "path": None}  # step 2 of 3 would reach it
    _write(rows, path)
    assert train.main(_argv(model, path, tmp_path / "run")) == 1
    line = _error_line(capsys)
    assert "row train.parquet:7: cannot read its image (OSError: image file is truncated" in line
    assert "on_bad_row: skip" in line
    assert not (tmp_path / "run").exists()  # nothing written: the check runs before the model even loads


def test_on_bad_row_skip_trains_past_one_bad_row_of_each_kind_and_lists_exactly_those(model, tmp_path, caplog):
    rows, reasons = _one_bad_row_of_each_kind(tmp_path)
    path = _write(rows, tmp_path / "train.parquet")
    write_metadata(path, {"hardness_mean": 0.1, "skipped": [
        {"row_id": "raw.parquet:13", "reason": "unreadable image", "detail": "row raw.parquet:13: cannot read its "
         "image", "output_row_id": "train.parquet:13"}]})
    reasons |= {13: "unreadable image", 14: "over-long"}
    code = train.main(_argv(model, path, tmp_path / "run", "--on_bad_row", "skip", "--overlong", "skip",
                            "--max_length", "256", "--max_steps", "3"))
    assert code == 0
    assert f"train_file {path}: left out {len(reasons)} of 16 rows (3 unreadable image, " in caplog.text
    listed = json.loads((tmp_path / "run" / SKIPPED_ROWS).read_text())["train_file"]
    assert {entry["row_id"]: entry["reason"] for entry in listed["skipped"]} == {
        f"train.parquet:{n}": reason for n, reason in reasons.items()}
    assert listed["skipped_by_reason"]["unreadable image"] == 3 and listed["kept"] == 16 - len(reasons)
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and (tmp_path / "run" / RUN_COMPLETE).is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing-train-file", r"train_file .*nowhere.parquet does not exist"),
        ("missing-eval-file", r"eval_file .*nowhere.parquet does not exist"),
        ("yaml-syntax", r"bad.yaml is not valid YAML \(line 3, column 2: expected ',' or ']', but got ':'\)"),
        ("unknown-key", r"bad.yaml: unknown keys \['betta'\]"),
        ("negative-learning-rate", r"learning_rate must be >= 0, got -1e-05"),
        ("image-over-the-limit", r"row train.parquet:2: its image is 10000 x 6000 = 60000000 pixels, over the limit"),
        ("nan-reference", r"row train.parquet:3 has no reference log-probs"),
        ("inf-reference", r"row train.parquet:4: its reference log-probs are not finite \(chosen sum inf"),
        ("inf-hardness", r"row train.parquet:5: its hardness is -inf"),
        ("no-reference-columns", r"train.parquet has no reference log-probs .*or train with reference: online"),
    ],
)
def test_start_up_errors_are_one_line_naming_the_file_row_or_field(model, data, tmp_path, capsys, change, message):
    rows, path = data
    extra = []
    if change.startswith("missing-"):
        extra = [f"--{change.split('-')[1]}_file", str(tmp_path / "nowhere.parquet")]
    elif change in ("yaml-syntax", "unknown-key", "negative-learning-rate"):
        text = {"yaml-syntax": "beta: 0.1\nlr: [1\nx: 2\n", "unknown-key": "betta: 0.1\n",
                "negative-learning-rate": "learning_rate: -1.0e-5\n"}[change]
        (tmp_path / "bad.yaml").write_text(text)
        extra = ["--config", str(tmp_path / "bad.yaml")]
    else:
        if change == "image-over-the-limit":
            rows[2]["image"] = {"bytes": huge_png(), "path": None}
        elif change == "nan-reference":
            rows[3]["ref_chosen_logps"] = math.nan
        elif change == "inf-reference":
            rows[4]["ref_chosen_logps"] = math.inf
        elif change == "inf-hardness":
            rows[5]["hardness"] = -math.inf
        else:
            rows = [{k: v for k, v in row.items() if not k.startswith("ref_")} for row in rows]
        _write(rows, path)
    assert train.main(_argv(model, path, tmp_path / "run", *extra)) == 1
    assert re.search(message, _error_line(capsys)), message
    assert not (tmp_path / "run").exists()


def test_a_reused_output_dir_is_refused_unless_resumed_or_overwritten(model, data, tmp_path, capsys):
    _, path = data
    run = tmp_path / "run"
    assert train.main(_argv(model, path, run)) == 0
    finished = _digest(run)
    assert {"checkpoint-1/model.safetensors", "checkpoint-2/model.safetensors", "model.safetensors",
            RUN_COMPLETE} <= set(finished)

    # Another run into the same folder, with or without --resume: refused, the folder untouched.
    capsys.readouterr()
    assert train.main(_argv(model, path, run, "--learning_rate", "2e-3")) == 1
    assert "already holds a run (complete, a saved model, 2 checkpoint folder(s) up to checkpoint-2, " \
           "resolved_config.json). Pass --resume true" in _error_line(capsys)
    assert train.main(_argv(model, path, run, "--learning_rate", "2e-3", "--resume", "true")) == 1
    assert "holds another run: its config differs in learning_rate: 5e-05 -> 0.002" in _error_line(capsys)
    # --overwrite_output_dir with a run that fails its start-up checks: still untouched.
    assert train.main(_argv(model, tmp_path / "nowhere.parquet", run, "--overwrite_output_dir", "true")) == 1
    _error_line(capsys)
    assert _digest(run) == finished

    # The same finished run resumed: "already complete", nothing trained or written; how often it logs and saves
    # may change on resume, being no part of what the run computes.
    assert train.main(_argv(model, path, run, "--resume", "true")) == 0
    assert "this run is already complete; nothing to do" in capsys.readouterr().out
    assert train.main(_argv(model, path, run, "--resume", "true", "--save_steps", "7", "--logging_steps", "3")) == 0
    assert "this run is already complete; nothing to do" in capsys.readouterr().out
    assert _digest(run) == finished

    # --overwrite_output_dir: says what it removes, and the new run's rotation sees only its own checkpoints.
    assert train.main(_argv(model, path, run, "--overwrite_output_dir", "true", "--max_steps", "1",
                            "--save_total_limit", "1")) == 0
    err = capsys.readouterr().err
    assert "--overwrite_output_dir: removing from" in err and "checkpoint-2" in err
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 1


def test_resume_of_a_run_stopped_after_its_last_checkpoint_takes_no_further_step(model, data, tmp_path, capsys):
    _, path = data
    run = tmp_path / "run"
    assert train.main(_argv(model, path, run)) == 0
    # As if killed during the final save: the last checkpoint is complete, the final model and marker are not.
    for name in (RUN_COMPLETE, "model.safetensors", "trainer_state.json"):
        (run / name).unlink()
    last = _digest(run / "checkpoint-2")
    assert train.main(_argv(model, path, run, "--resume", "true")) == 0
    assert "reached its last step (checkpoint-2)" in capsys.readouterr().out
    assert (run / "model.safetensors").read_bytes() == (run / "checkpoint-2" / "model.safetensors").read_bytes()
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 2
    assert _digest(run / "checkpoint-2") == last and not (run / "checkpoint-3").exists()
    assert (run / RUN_COMPLETE).is_file()


class RunsCode:
    """Unpickling this calls `touch` on a file: what a crafted checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_crafted_dama_state_cannot_run_code_even_when_torch_is_told_to_allow_it(tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    marker = tmp_path / "code_ran"
    with open(checkpoint / DAMA_STATE_NAME, "wb") as handle:
        torch.save({"payload": RunsCode(marker)}, handle)
    (checkpoint / "checkpoint_complete.json").write_text("{}")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    loss = DamaLoss(parse_training_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true",
                                              "--report_to", "none"]))
    with pytest.raises(ValueError, match=r"dama_state.pt holds more than tensors and was not loaded"):
        restore_dama_state(checkpoint, loss)
    assert not marker.exists()

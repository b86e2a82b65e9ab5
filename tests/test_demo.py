"""`dama demo` end to end on a handful of pairs: every stage runs and the outputs a newcomer reads are written."""

import json

from dama.cli import main


def test_demo_pipeline_writes_summary_and_curves(tmp_path, capsys):
    output = tmp_path / "demo"
    code = main(["demo", "--output-dir", str(output), "--num-train", "12", "--num-eval", "4", "--warm-up-steps", "2",
                 "--", "--num_train_epochs", "1", "--logging_steps", "1", "--save_steps", "2"])
    assert code == 0
    summary = json.loads((output / "summary.json").read_text())
    for key in ("eval_reward_accuracy", "eval_reward_accuracy_before", "train_seconds"):
        assert key in summary
    assert summary["steps"] == 3
    assert summary["eval_reward_margin_before"] == 0.0  # the policy starts as the reference: z = 0 exactly
    assert (output / "curves.png").stat().st_size > 0
    for produced in ("data/train.scored.ref.parquet", "data/train.scored.ref.parquet.meta.json", "run/versions.json",
                     "run/resolved_config.json", "model/config.json", "clip/config.json"):
        assert (output / produced).is_file(), produced
    printed = capsys.readouterr().out
    assert "reward acc" in printed and "held-out reward accuracy" in printed

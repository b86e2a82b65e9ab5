"""`dama demo` end to end on a handful of pairs: every stage runs and the outputs a newcomer reads are written."""

import json

from dama.cli import main
from dama.demo.data import make_demo_data
from dama.demo.hallucination import clip_examples
from dama.demo.tiny_clip import build_tiny_clip, contrastive_warm_up
from dama.offline.hardness import ClipScorer


def test_demo_pipeline_writes_summary_and_curves(tmp_path, capsys):
    output = tmp_path / "demo"
    code = main(["demo", "--output-dir", str(output), "--num-train", "12", "--num-eval", "4", "--warm-up-steps", "2",
                 "--clip-steps", "2", "--", "--num_train_epochs", "1", "--logging_steps", "1", "--save_steps", "2"])
    assert code == 0
    summary = json.loads((output / "summary.json").read_text())
    for key in ("eval_reward_accuracy", "eval_reward_accuracy_before", "train_seconds", "eval_chair_s_before",
                "eval_chair_s", "eval_chair_i_before", "eval_chair_i", "hardness_hallucination_correlation"):
        assert key in summary
    for key in ("eval_chair_s_before", "eval_chair_s", "eval_chair_i_before", "eval_chair_i"):
        assert 0.0 <= summary[key] <= 1.0
    assert set(summary["hardness_mean_by_level"]) == {"one_word", "half", "all"}
    assert summary["steps"] == 3
    assert summary["eval_reward_margin_before"] == 0.0  # the policy starts as the reference: z = 0 exactly
    assert (output / "curves.png").stat().st_size > 0 and (output / "chair.png").stat().st_size > 0
    for produced in ("data/train.scored.ref.parquet", "data/train.scored.ref.parquet.meta.json", "run/versions.json",
                     "run/resolved_config.json", "model/config.json", "clip/config.json", "data/eval.instances.json",
                     "generations/before.jsonl", "generations/after.jsonl", "generations/after.chair.json"):
        assert (output / produced).is_file(), produced
    answers = [json.loads(line) for line in (output / "generations" / "after.jsonl").read_text().splitlines()]
    assert [answer["image_id"] for answer in answers] == [0, 1, 2, 3]
    printed = capsys.readouterr().out
    assert "reward acc" in printed and "held-out reward accuracy" in printed
    assert "held-out hallucination (CHAIR)" in printed and "before:" in printed and "after:" in printed


def test_clip_warm_up_scores_true_statements_above_false_ones(tmp_path):
    data = make_demo_data(tmp_path / "data", num_train=24, num_eval=0, image_size=32)["train"]
    examples = [example for example in clip_examples(data) if example.false]
    clip = build_tiny_clip(tmp_path / "clip", corpus=[s for e in examples for s in (*e.true, *e.false)])

    def true_minus_false() -> float:
        scores = ClipScorer(clip).score([e.image for e in examples], [[*e.true, *e.false] for e in examples])
        gaps = [float(s[:len(e.true)].mean() - s[len(e.true):].mean()) for s, e in zip(scores, examples, strict=True)]
        return sum(gaps) / len(gaps)

    before = true_minus_false()
    contrastive_warm_up(clip, examples, steps=40, batch_size=8)
    after = true_minus_false()
    assert after > before and after > 0, (before, after)

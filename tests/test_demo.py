"""`dama demo` end to end on a handful of images: every stage runs and the outputs a newcomer reads are written."""

import json

import pyarrow.parquet as pq

from dama.cli import main
from dama.demo.tiny_clip import build_tiny_clip, contrastive_warm_up
from dama.demo.world import make_world_data, world_clip_examples
from dama.offline.hardness import ClipScorer


def test_demo_pipeline_writes_summary_and_curves(tmp_path, capsys):
    output = tmp_path / "demo"
    # Enough supervised steps that the start model's sampled answers differ (so there are pairs), no more.
    code = main(["demo", "--output-dir", str(output), "--num-sft", "64", "--num-train", "16", "--num-eval", "6",
                 "--warm-up-steps", "40", "--clip-steps", "2", "--", "--num_train_epochs", "1", "--logging_steps", "1",
                 "--save_steps", "2"])
    assert code == 0
    summary = json.loads((output / "summary.json").read_text())
    for key in ("eval_reward_accuracy", "eval_reward_accuracy_before", "train_seconds", "eval_chair_s_before",
                "eval_chair_s", "eval_chair_i_before", "eval_chair_i", "eval_object_recall_before",
                "eval_object_recall", "hardness_hallucination_correlation", "dpo_eval_chair_s", "dpo_eval_chair_i",
                "dpo_eval_object_recall", "dpo_eval_reward_accuracy"):
        assert key in summary, key
    for key in ("eval_chair_s_before", "eval_chair_s", "eval_chair_i_before", "eval_chair_i", "dpo_eval_chair_s",
                "dpo_eval_chair_i", "dpo_eval_object_recall", "dpo_eval_reward_accuracy"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["eval_reward_margin_before"] == 0.0  # the policy starts as the reference: z = 0 exactly
    pairs = pq.read_table(output / "data" / "train.pairs.parquet").to_pylist()
    assert summary["train_pairs"] == len(pairs) > 0 and all(json.loads(p["origin_split"])["model"] == "model"
                                                            for p in pairs)
    # DPO and DAMA start from the same model on the same pairs and take the same steps.
    steps = [json.loads((output / run / "trainer_state.json").read_text())["global_step"] for run in ("run", "run-dpo")]
    assert steps[0] == steps[1] == summary["steps"] > 0
    dpo_config = json.loads((output / "run-dpo" / "resolved_config.json").read_text())
    assert dpo_config["data_aware"] is False and dpo_config["model_aware"] is False
    assert (output / "curves.png").stat().st_size > 0 and (output / "chair.png").stat().st_size > 0
    for produced in ("data/train.scored.ref.parquet", "data/eval.pairs.parquet", "run/versions.json",
                     "model/config.json", "clip/config.json", "data/eval.instances.json", "generations/start.jsonl",
                     "generations/dpo.jsonl", "generations/dama.jsonl", "generations/dama.chair.json"):
        assert (output / produced).is_file(), produced
    answers = [json.loads(line) for line in (output / "generations" / "dama.jsonl").read_text().splitlines()]
    assert [answer["image_id"] for answer in answers] == list(range(6))
    printed = capsys.readouterr().out
    assert "reward acc" in printed and "held-out reward accuracy" in printed and "make-pairs (train)" in printed
    assert "held-out hallucination (CHAIR)" in printed
    assert all(f"{name}:" in printed for name in ("start", "dpo", "dama"))


def test_clip_warm_up_scores_true_statements_above_false_ones(tmp_path):
    data = make_world_data(tmp_path / "data", {"train": 24}, image_size=32)["train"]
    examples = world_clip_examples(data)
    clip = build_tiny_clip(tmp_path / "clip", corpus=[s for e in examples for s in (*e.true, *e.false)])

    def true_minus_false() -> float:
        scores = ClipScorer(clip).score([e.image for e in examples], [[*e.true, *e.false] for e in examples])
        gaps = [float(s[:len(e.true)].mean() - s[len(e.true):].mean()) for s, e in zip(scores, examples, strict=True)]
        return sum(gaps) / len(gaps)

    before = true_minus_false()
    contrastive_warm_up(clip, examples, steps=40, batch_size=8)
    after = true_minus_false()
    assert after > before and after > 0, (before, after)


def test_supervised_stage_trains_every_part(tmp_path):
    """The loss on the captions falls, and the vision tower and projector learn too: the start model must learn to
    see."""
    import pytest
    import torch

    from dama.demo.supervised import SupervisedSettings, supervised_fine_tune
    from dama.demo.tiny_llava import build_tiny_llava
    from dama.demo.world import world_corpus
    from dama.model.loading import load_llava

    data = make_world_data(tmp_path / "data", {"sft": 8}, image_size=32)["sft"]
    model, _ = build_tiny_llava(world_corpus(), tmp_path / "model", seed=0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    first = supervised_fine_tune(tmp_path / "model", data, SupervisedSettings(steps=1, batch_size=4, warmup_steps=1))
    loss = supervised_fine_tune(tmp_path / "model", data, SupervisedSettings(steps=30, batch_size=4, warmup_steps=1))
    assert loss < first  # the same eight captions, learnt
    after = load_llava(tmp_path / "model")[0].state_dict()
    changed = {name.split(".")[1] for name in before if not torch.equal(before[name], after[name])}
    assert {"vision_tower", "multi_modal_projector", "language_model"} <= changed, changed
    with pytest.raises(ValueError, match="batch_size >= 1"):
        supervised_fine_tune(tmp_path / "model", data, SupervisedSettings(batch_size=0))

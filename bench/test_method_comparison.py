"""The method comparison's arithmetic: per-seed figures read from demo summaries, mean and sample std, the table."""

import pytest

from bench.method_comparison import aggregate, markdown_table, seed_figures


def _summary(shift: float) -> dict:
    keys = ("eval_chair_s_before", "eval_chair_i_before", "eval_object_recall_before", "dpo_eval_chair_s",
            "dpo_eval_chair_i", "dpo_eval_object_recall", "dpo_eval_reward_accuracy", "eval_chair_s", "eval_chair_i",
            "eval_object_recall", "eval_reward_accuracy")
    return {key: number / 100 + shift for number, key in enumerate(keys, start=1)}


def test_mean_and_sample_std_per_model_and_metric():
    figures = [seed_figures(_summary(shift)) for shift in (0.0, 0.1, 0.2)]
    assert figures[0]["dpo"] == {"chair_s": 0.04, "chair_i": 0.05, "recall": 0.06, "reward_accuracy": 0.07}
    assert "reward_accuracy" not in figures[0]["start"]  # 0 by construction: the start is its own reference
    means = aggregate(figures)
    assert means["dama"]["chair_i"]["mean"] == pytest.approx(0.09 + 0.1)
    assert means["dama"]["chair_i"]["std"] == pytest.approx(0.1)  # sample std of x, x + 0.1, x + 0.2
    assert aggregate(figures[:1])["start"]["recall"] == {"mean": pytest.approx(0.03), "std": 0.0}
    table = markdown_table(means).splitlines()
    assert table[0] == "| held-out | CHAIR_s | CHAIR_i | object recall | held-out reward acc |"
    assert table[2] == "| start | 0.110 ± 0.100 | 0.120 ± 0.100 | 0.130 ± 0.100 | - |"
    assert table[4].startswith("| DAMA | 0.180 ± 0.100 |")

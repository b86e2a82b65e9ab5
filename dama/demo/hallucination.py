"""The demo's hallucination measurements: what each model says about held-out images, and what hardness means.

- `hardness_report`: how CLIP's hardness of each pair follows how much worse its rejected answer is (Pearson
  correlation with its hallucinated words, and the mean hardness by its extra hallucinated objects).
- `chair_before_after`: `dama generate` on the held-out images with each model (the start, DPO, DAMA), scored by
  `dama eval-chair` against the held-out annotation file; `plot_chair` draws the bars and `examples_table` prints a
  few images with every model's answer.
"""

from __future__ import annotations

import difflib
import statistics
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dama.data.formats import write_json_atomic
from dama.evaluation.chair import evaluate_chair, read_responses
from dama.evaluation.generate import DecodingSettings, GenerateOptions, generate_responses
from dama.evaluation.make_pairs import ChairJudge

# Words that change with the noun after them ("a red" / "an orange"): not hallucinations themselves.
ARTICLES = frozenset({"a", "an"})
# The demo's longest answer is 39 tokens of the tiny tokenizer; a model that never stops is cut here.
DEMO_MAX_NEW_TOKENS = 64
CHAIR_BARS = (("chair_s", "CHAIR_s"), ("chair_i", "CHAIR_i"), ("recall", "object recall"))


def hallucinated_word_count(chosen: str, rejected: str) -> int:
    """Words of the rejected answer that a word alignment with the chosen answer does not match (articles aside)."""
    chosen_words = [word for word in chosen.lower().split() if word not in ARTICLES]
    rejected_words = [word for word in rejected.lower().split() if word not in ARTICLES]
    matcher = difflib.SequenceMatcher(a=chosen_words, b=rejected_words, autojunk=False)
    return sum(end - start for tag, _, _, start, end in matcher.get_opcodes() if tag != "equal")


def hardness_report(scored_path: str | Path, annotations: str | Path) -> dict[str, Any]:
    """How CLIP's hardness follows how much worse the rejected answer is, on pairs written by `dama make-pairs`.

    Reads a parquet written by `dama hardness` (columns idx, chosen, rejected, hardness). Returns the Pearson
    correlation of hardness with the hallucinated words of the rejected answer (words a word alignment with the
    chosen answer does not match), and the mean hardness by how many more hallucinated objects the CHAIR judge finds
    in the rejected answer than in the chosen one ("0": the pair differs in recall only, "1", "2+").
    """
    rows = [row for row in pq.read_table(scored_path, columns=["idx", "chosen", "rejected", "hardness"]).to_pylist()
            if row["hardness"] is not None]
    judge = ChairJudge([annotations])
    hardness = [row["hardness"] for row in rows]
    words = [hallucinated_word_count(row["chosen"], row["rejected"]) for row in rows]
    by_level: dict[str, list[float]] = {}
    for row in rows:
        extra = (len(judge.judge(row["rejected"], row["idx"]).hallucinated)
                 - len(judge.judge(row["chosen"], row["idx"]).hallucinated))
        by_level.setdefault(str(extra) if extra < 2 else "2+", []).append(row["hardness"])
    try:
        correlation = statistics.correlation(hardness, words)
    except statistics.StatisticsError:  # fewer than two pairs, or a constant column: no correlation to speak of
        correlation = float("nan")
    return {
        "correlation": correlation,
        "mean_by_level": {level: statistics.fmean(by_level[level]) for level in sorted(by_level)},
        "pairs": len(rows),
    }


def chair_before_after(eval_path: Path, annotations: Path, models: dict[str, Path], output_dir: Path,
                       batch_size: int = 50) -> dict[str, dict[str, Any]]:
    """Greedy answers of each model on the held-out images and their CHAIR reports, by the names in `models`.

    Writes `<name>.jsonl` (the answers) and `<name>.chair.json` (the report, per-response detail included).
    """
    reports = {}
    for name, model_dir in models.items():
        answers = output_dir / f"{name}.jsonl"
        # A demo rerun answers again with the newly trained model: its earlier answers are replaced.
        generate_responses(GenerateOptions(input=eval_path, output=answers, model=model_dir, batch_size=batch_size,
                                           device="cpu", overwrite=True),
                           DecodingSettings(max_new_tokens=DEMO_MAX_NEW_TOKENS), progress=False)
        reports[name] = evaluate_chair(read_responses(answers), [annotations])
        reports[name]["answers"] = read_responses(answers)
        write_json_atomic(output_dir / f"{name}.chair.json", {k: v for k, v in reports[name].items()
                                                               if k != "answers"})
    return reports


def chair_table(reports: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'':>8}  {'CHAIR_s':>8}  {'CHAIR_i':>8}  {'recall':>8}  {'mentions':>8}"]
    for name, report in reports.items():
        lines.append(f"{name:>8}  {report['chair_s']:8.3f}  {report['chair_i']:8.3f}  {report['recall']:8.3f}  "
                     f"{report['mentions']:8d}")
    return "\n".join(lines)


def examples_table(reports: dict[str, dict[str, Any]], count: int = 3) -> str:
    """The first `count` held-out images: their objects and each model's answer with its hallucinated objects."""
    names = list(reports)
    lines = []
    for index in range(min(count, len(reports[names[0]]["answers"]))):
        detail = reports[names[0]]["per_response"][index]
        lines.append(f"image {detail['image_id']}: {', '.join(detail['ground_truth'])}")
        for name in names:
            answer = reports[name]["answers"][index]["response"]
            wrong = reports[name]["per_response"][index]["hallucinated"]
            lines.append(f"  {name:>6}: {answer}")
            lines.append(f"  {'':>6}  hallucinated: {', '.join(wrong) if wrong else 'none'}")
    return "\n".join(lines)


def plot_chair(reports: dict[str, dict[str, Any]], path: Path, labels: dict[str, str] | None = None) -> None:
    """Bars of CHAIR_s, CHAIR_i and object recall per model, labelled `labels[name]` (default: the name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(reports)
    for offset, (name, report) in enumerate(reports.items()):
        positions = [index + (offset - (len(reports) - 1) / 2) * width for index in range(len(CHAIR_BARS))]
        bars = axis.bar(positions, [report[key] for key, _ in CHAIR_BARS], width, label=(labels or {}).get(name, name))
        axis.bar_label(bars, fmt="%.2f", fontsize=8)
    axis.set_xticks(range(len(CHAIR_BARS)), [title for _, title in CHAIR_BARS])
    axis.set_ylim(0, 1.1)
    axis.set_title("Held-out hallucination (CHAIR, lower is better; recall, higher is better)", fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

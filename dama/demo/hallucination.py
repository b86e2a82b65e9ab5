"""The demo's hallucination measurements: what the model says before and after DAMA, and what hardness means.

- `clip_examples`: the training images with their true statements (the chosen answer's sentences) and false ones
  (the rejected answer's sentences that are not in the chosen one), for CLIP's contrastive warm-up.
- `hardness_report`: how CLIP's hardness of each pair follows the number of hallucinated words in its rejected
  answer (Pearson correlation, and the mean hardness per error level).
- `chair_before_after`: `dama generate` on the held-out images with the warmed-up start and with the trained model,
  scored by `dama eval-chair` against the held-out annotation file; `plot_chair` draws the bars and
  `examples_table` prints a few images with both answers.
"""

from __future__ import annotations

import difflib
import statistics
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dama.data.formats import PairRow, default_image_folder, load_preference_rows, write_json_atomic
from dama.demo.tiny_clip import CaptionedImage
from dama.evaluation.chair import evaluate_chair, read_responses
from dama.evaluation.generate import DecodingSettings, GenerateOptions, generate_responses
from dama.offline.splitting import RuleSplitter

# Words that change with the noun after them ("a red" / "an orange"): not hallucinations themselves.
ARTICLES = frozenset({"a", "an"})
# The demo's longest answer is 39 tokens of the tiny tokenizer; a model that never stops is cut here.
DEMO_MAX_NEW_TOKENS = 64
CHAIR_BARS = (("chair_s", "CHAIR_s"), ("chair_i", "CHAIR_i"), ("recall", "object recall"))


def clip_examples(path: str | Path) -> list[CaptionedImage]:
    """Every pair of a demo parquet as an image with the sentences of its chosen (true) and rejected (false) answer."""
    splitter = RuleSplitter()
    examples = []
    for record in load_preference_rows(path):
        pair = PairRow.from_record(record, default_image_folder(path))
        true = tuple(splitter.split(pair.chosen))
        false = tuple(sentence for sentence in splitter.split(pair.rejected) if sentence not in true)
        examples.append(CaptionedImage(pair.load_image(), true, false))
    return examples


def hallucinated_word_count(chosen: str, rejected: str) -> int:
    """Words of the rejected answer that a word alignment with the chosen answer does not match (articles aside)."""
    chosen_words = [word for word in chosen.lower().split() if word not in ARTICLES]
    rejected_words = [word for word in rejected.lower().split() if word not in ARTICLES]
    matcher = difflib.SequenceMatcher(a=chosen_words, b=rejected_words, autojunk=False)
    return sum(end - start for tag, _, _, start, end in matcher.get_opcodes() if tag != "equal")


def hardness_report(scored_path: str | Path) -> dict[str, Any]:
    """Pearson correlation of hardness with hallucinated words in the rejected answer, and mean hardness per level.

    Reads a parquet written by `dama hardness` from the demo data (columns chosen, rejected, origin_split, hardness).
    """
    rows = [row for row in pq.read_table(scored_path, columns=["chosen", "rejected", "origin_split", "hardness"])
            .to_pylist() if row["hardness"] is not None]
    hardness = [row["hardness"] for row in rows]
    words = [hallucinated_word_count(row["chosen"], row["rejected"]) for row in rows]
    by_level: dict[str, list[float]] = {}
    for row in rows:
        by_level.setdefault(row["origin_split"].split("/")[-1], []).append(row["hardness"])
    try:
        correlation = statistics.correlation(hardness, words)
    except statistics.StatisticsError:  # fewer than two pairs, or a constant column: no correlation to speak of
        correlation = float("nan")
    return {
        "correlation": correlation,
        "mean_by_level": {level: statistics.fmean(values) for level, values in by_level.items()},
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


def plot_chair(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """Bars of CHAIR_s, CHAIR_i and object recall per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(reports)
    for offset, (name, report) in enumerate(reports.items()):
        positions = [index + (offset - (len(reports) - 1) / 2) * width for index in range(len(CHAIR_BARS))]
        bars = axis.bar(positions, [report[key] for key, _ in CHAIR_BARS], width, label=name)
        axis.bar_label(bars, fmt="%.2f", fontsize=8)
    axis.set_xticks(range(len(CHAIR_BARS)), [title for _, title in CHAIR_BARS])
    axis.set_ylim(0, 1.1)
    axis.set_title("Held-out hallucination (CHAIR, lower is better; recall, higher is better)", fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

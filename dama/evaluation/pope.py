"""`dama eval-pope`: POPE (Li et al., EMNLP 2023), yes/no object probing on COCO, scored by POPE's own rule.

Question files, as POPE ships them (`output/coco/coco_pope_{random,popular,adversarial}.json` in
github.com/AoiDragon/POPE, JSON lines despite the suffix): one `{"question_id", "image", "text", "label"}` per line,
one file per split; a split is named by its file's stem. LLaVA's variant (`llava_pope_test.jsonl`: the three splits
in one file, each row with a `category` and no `label`, the text followed by the short-answer instruction) is read
too: its rows take their labels from the POPE split files given beside it, the n-th question of a category pairing
with the n-th question of the split whose stem ends in `_<category>`, as LLaVA's `llava/eval/eval_pope.py` pairs them
(this module also checks that the pair names the same image).

An answer is read with POPE's rule (`evaluate.py`): keep the text before its first period, remove the commas, split
it at single spaces; it means "no" when one of the words is exactly `No`, `not` or `no`, and "yes" otherwise (so an
empty answer, "NO" or "Not really" count as yes). "yes" is the positive class:

    accuracy = (TP + TN) / questions     precision = TP / (TP + FP)     recall = TP / (TP + FN)
    F1 = 2 precision recall / (precision + recall)     yes_ratio = answers read as yes / questions

POPE divides by zero where this module reports 0 (no yes answer, or no yes label).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dama.command import run_command
from dama.data.formats import write_json_atomic
from dama.errors import DamaError

NEGATIVE_WORDS = frozenset({"No", "not", "no"})


def pope_says_yes(answer: str) -> bool:
    """POPE's reading of a free-text answer: False when its first sentence holds the word No, not or no."""
    first_sentence = answer.split(".", 1)[0]
    return not NEGATIVE_WORDS.intersection(first_sentence.replace(",", "").split(" "))


@dataclass(frozen=True)
class PopeQuestion:
    """One probe: the split it belongs to, its id in its file, the image, the question and the label (yes: True)."""

    split: str
    question_id: Any
    image: str
    text: str
    label: bool


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DamaError(f"questions file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DamaError(f"{path}, line {number}: not a JSON object ({error}); POPE's question files hold "
                                 "one JSON object per line") from error
            if not isinstance(row, dict) or "question_id" not in row or "image" not in row or "text" not in row:
                raise DamaError(f"{path}, line {number}: expected POPE's question_id, image and text (and label, or "
                                 "category in LLaVA's variant)")
            rows.append(row)
    return rows


def _label(value: Any, where: str) -> bool:
    if value not in ("yes", "no"):
        raise DamaError(f"{where}: label must be 'yes' or 'no', got {value!r}")
    return value == "yes"


def read_pope_questions(paths: Sequence[str | Path]) -> list[PopeQuestion]:
    """The questions of POPE split files and, when given, of LLaVA's combined file (see the module docstring)."""
    if not paths:
        raise DamaError("give at least one --questions file (e.g. coco_pope_random.json)")
    labelled: dict[str, list[PopeQuestion]] = {}
    combined: list[tuple[Path, list[dict[str, Any]]]] = []
    for path in map(Path, paths):
        rows = read_json_lines(path)
        if rows and all("label" not in row for row in rows):
            combined.append((path, rows))
            continue
        if path.stem in labelled:
            raise DamaError(f"two question files are named {path.stem!r}: each split needs its own file name")
        labelled[path.stem] = [
            PopeQuestion(path.stem, row["question_id"], str(row["image"]), str(row["text"]),
                         _label(row.get("label"), f"{path}, question {row['question_id']}")) for row in rows]
    if not combined:
        return [question for split in labelled.values() for question in split]
    questions = []
    for path, rows in combined:
        questions += _pair_with_labels(path, rows, labelled)
    return questions


def _pair_with_labels(path: Path, rows: list[dict[str, Any]], labelled: Mapping[str, list[PopeQuestion]]
                      ) -> list[PopeQuestion]:
    by_category: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if not row.get("category"):
            raise DamaError(f"{path}, question {row['question_id']}: neither a label (POPE's split files) nor a "
                             "category (LLaVA's llava_pope_test.jsonl)")
        by_category.setdefault(str(row["category"]), []).append(row)
    questions = []
    for category, members in by_category.items():
        splits = [name for name in labelled if name == category or name.endswith(f"_{category}")]
        if len(splits) != 1:
            raise DamaError(f"{path} has {category!r} questions: give the POPE split file that labels them (e.g. "
                             f"--questions coco_pope_{category}.json), exactly once")
        truth = labelled[splits[0]]
        if len(truth) != len(members):
            raise DamaError(f"{path} has {len(members)} {category!r} questions but {splits[0]} has {len(truth)}")
        for row, labelled_question in zip(members, truth, strict=True):
            if Path(str(row["image"])).name != Path(labelled_question.image).name:
                raise DamaError(f"{path}, question {row['question_id']} ({row['image']}) does not pair with "
                                 f"{splits[0]} question {labelled_question.question_id} ({labelled_question.image})")
            questions.append(PopeQuestion(splits[0], row["question_id"], str(row["image"]), str(row["text"]),
                                          labelled_question.label))
    return questions


def question_key(question: PopeQuestion) -> str:
    """The `id` that `dama benchmark-prompts pope` gives a question: "<split>/<question_id>"."""
    return f"{question.split}/{question.question_id}"


def match_answers(questions: Sequence[PopeQuestion], answers: Sequence[Mapping[str, Any]]
                  ) -> list[tuple[PopeQuestion, str]]:
    """Each question with its answer's text. An answer's `id` (or `question_id`) is a question's "<split>/<id>" or,
    when that id is unique over the question files, its bare question_id, alone or after "<another file's stem>/"
    (prompts made from LLaVA's combined file). ValueError for unknown, repeated or missing answers."""
    by_key = {question_key(question): question for question in questions}
    bare: dict[str, list[PopeQuestion]] = {}
    for question in questions:
        bare.setdefault(str(question.question_id), []).append(question)
    found: dict[str, str] = {}
    for number, answer in enumerate(answers, start=1):
        identifier = answer.get("id", answer.get("question_id"))
        text = answer.get("response", answer.get("text", answer.get("answer")))
        if identifier is None or not isinstance(text, str):
            raise DamaError(f"answer {number}: expected an `id` (or question_id) and a text `response` (the output "
                             "of `dama generate`)")
        key = str(identifier)
        if key not in by_key:
            candidates = bare.get(key, bare.get(key.rsplit("/", 1)[-1], []))
            if len(candidates) != 1:
                raise DamaError(f"answer {number}: id {identifier!r} names {'several' if candidates else 'no'} "
                                 "question(s) of the question files; give ids as <split>/<question_id> (what "
                                 "`dama benchmark-prompts pope` writes)")
            key = question_key(candidates[0])
        if key in found:
            raise DamaError(f"answer {number}: question {key} is answered twice")
        found[key] = text
    missing = [key for key in by_key if key not in found]
    if missing:
        raise DamaError(f"{len(missing)} of {len(by_key)} questions have no answer (first: {missing[0]}); answer "
                         "every question of the given files, or give only the files that were answered")
    return [(question, found[question_key(question)]) for question in questions]


def pope_metrics(labels: Sequence[bool], says_yes: Sequence[bool]) -> dict[str, float | int]:
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" positive (0 where POPE would divide by zero)."""
    pairs = list(zip(labels, says_yes, strict=True))
    true_pos = sum(1 for label, yes in pairs if label and yes)
    false_pos = sum(1 for label, yes in pairs if not label and yes)
    true_neg = sum(1 for label, yes in pairs if not label and not yes)
    false_neg = sum(1 for label, yes in pairs if label and not yes)
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    return {
        "accuracy": (true_pos + true_neg) / len(pairs) if pairs else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (true_pos + false_pos) / len(pairs) if pairs else 0.0,
        "questions": len(pairs),
    }


def evaluate_pope(answers: Sequence[Mapping[str, Any]], question_files: Sequence[str | Path]) -> dict[str, Any]:
    """`{"splits": {split: metrics}}` for answers to the questions of `question_files`, splits in file order."""
    matched = match_answers(read_pope_questions(question_files), answers)
    splits: dict[str, tuple[list[bool], list[bool]]] = {}
    for question, text in matched:
        labels, says_yes = splits.setdefault(question.split, ([], []))
        labels.append(question.label)
        says_yes.append(pope_says_yes(text))
    return {"splits": {name: pope_metrics(*columns) for name, columns in splits.items()}}


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON lines answers file (`dama generate`'s output, or LLaVA's answer files)."""
    path = Path(path)
    if not path.is_file():
        raise DamaError(f"answers file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DamaError(f"{path}, line {number}: not a JSON object ({error})") from error
    return records


def format_table(report: Mapping[str, Any]) -> str:
    """One row per split, figures in percent as POPE's paper prints them."""
    header = ("split", "questions", "accuracy", "precision", "recall", "F1", "yes ratio")
    rows = [(name, str(m["questions"]), *(f"{100 * m[key]:.2f}" for key in ("accuracy", "precision", "recall", "f1",
                                                                            "yes_ratio")))
            for name, m in report["splits"].items()]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
                     for row in (header, *rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dama eval-pope",
        description="Score yes/no answers to POPE's object probes with POPE's own rule: the first sentence of an "
        "answer means no when it holds the word No, not or no, and yes otherwise. Prints accuracy, precision, recall, "
        "F1 (yes is positive) and the yes-ratio per split (per question file).",
    )
    parser.add_argument("answers", help="JSONL of answers: `dama generate`'s output (id, response) for the prompts "
                        "of `dama benchmark-prompts pope`, or LLaVA's answer files (question_id, text)")
    parser.add_argument("--questions", action="append", required=True, metavar="FILE",
                        help="a POPE question file (coco_pope_random.json, ...: question_id, image, text, label), one "
                        "per split; repeat it for each split. LLaVA's llava_pope_test.jsonl may come too, with the "
                        "split files that label it")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help='also write {"splits": {split: {accuracy, precision, recall, f1, yes_ratio, questions}}} '
                        "(fractions) to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action() -> str:
        report = evaluate_pope(read_answers(args.answers), args.questions)
        if args.json is None:
            return format_table(report)
        write_json_atomic(args.json, report)
        return f"{format_table(report)}\n\nwrote {args.json}"

    return run_command("eval-pope", action)


if __name__ == "__main__":
    sys.exit(main())

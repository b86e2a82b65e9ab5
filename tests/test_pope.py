"""POPE: the answer rule and the metrics worked out by hand, the question files as POPE and LLaVA ship them, the CLI."""

import json

import pytest

from dama.cli import main
from dama.evaluation.benchmark_prompts import SHORT_ANSWER
from dama.evaluation.pope import evaluate_pope, pope_says_yes

# (answer, label) of the "random" split. POPE's rule: the text before the first ".", commas removed, split at " ";
# no when a word is exactly No, not or no.
RANDOM = [
    ("Yes, there is a dog in the image.", "yes"),  # yes: TP
    ("No, there is no car.", "no"),                 # "No" (its comma removed): TN
    ("There is not a cat in the picture", "yes"),   # "not" inside a longer answer: no, FN
    ("Yes. But there is no bus.", "no"),            # only the first sentence counts: yes, FP
    ("", "no"),                                     # empty: no negative word, so yes: FP
    ("NO", "no"),                                   # the rule is case-sensitive: yes, FP
    ("Nothing like that, no", "no"),                # "no," loses its comma: no, TN
    ("I cannot tell but it seems so", "yes"),       # "cannot" is not "not": yes, TP
    ("Not really", "no"),                           # "Not" is not in the list: yes, FP
]
POPULAR = [("Yes", "yes"), ("yes", "yes")]
ADVERSARIAL = [("No", "no"), ("no.", "no")]


def _split_file(tmp_path, name, rows):
    path = tmp_path / f"{name}.json"
    path.write_text("".join(json.dumps({"question_id": n, "image": f"COCO_val2014_{n:012d}.jpg",
                                        "text": f"Is there a thing {n} in the image?", "label": label}) + "\n"
                            for n, (_, label) in enumerate(rows, start=1)))
    return path


@pytest.fixture
def pope_files(tmp_path):
    return {name: _split_file(tmp_path, name, rows) for name, rows in
            (("coco_pope_random", RANDOM), ("coco_pope_popular", POPULAR), ("coco_pope_adversarial", ADVERSARIAL))}


def _answers(tmp_path, rows_by_split, name="answers.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"id": f"{split}/{n}", "image_id": "x", "question": "q", "response": answer})
                            + "\n" for split, rows in rows_by_split.items()
                            for n, (answer, _) in enumerate(rows, start=1)))
    return path


def test_answer_rule():
    assert [pope_says_yes(answer) for answer, _ in RANDOM] == [True, False, False, True, True, True, False, True, True]


def test_hand_worked_metrics(tmp_path, pope_files):
    answers = _answers(tmp_path, {"coco_pope_random": RANDOM, "coco_pope_popular": POPULAR,
                                  "coco_pope_adversarial": ADVERSARIAL})
    report = evaluate_pope([json.loads(line) for line in answers.read_text().splitlines()], list(pope_files.values()))
    assert list(report["splits"]) == ["coco_pope_random", "coco_pope_popular", "coco_pope_adversarial"]
    # random: TP 2, TN 2, FN 1, FP 4 of 9.
    random = report["splits"]["coco_pope_random"]
    assert random["accuracy"] == pytest.approx(4 / 9)
    assert random["precision"] == pytest.approx(2 / 6)
    assert random["recall"] == pytest.approx(2 / 3)
    assert random["f1"] == pytest.approx(2 * (2 / 6) * (2 / 3) / (2 / 6 + 2 / 3))
    assert random["yes_ratio"] == pytest.approx(6 / 9)
    assert random["questions"] == 9
    assert report["splits"]["coco_pope_popular"] == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0,
                                                     "yes_ratio": 1.0, "questions": 2}
    # No yes at all: POPE would divide by zero for precision; reported as 0.
    assert report["splits"]["coco_pope_adversarial"] == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0,
                                                         "f1": 0.0, "yes_ratio": 0.0, "questions": 2}


def test_cli_with_prompts_from_benchmark_prompts(tmp_path, pope_files, capsys):
    prompts = tmp_path / "pope_prompts.jsonl"
    assert main(["benchmark-prompts", "pope", *map(str, pope_files.values()), "--output", str(prompts)]) == 0
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert len(rows) == 13 and rows[0] == {"id": "coco_pope_random/1", "image": "COCO_val2014_000000000001.jpg",
                                           "image_id": "COCO_val2014_000000000001.jpg",
                                           "question": f"Is there a thing 1 in the image?\n{SHORT_ANSWER}"}
    # Answers as `dama generate` writes them: the prompt's id, then the response.
    answers = tmp_path / "answers.jsonl"
    texts = [answer for rows_ in (RANDOM, POPULAR, ADVERSARIAL) for answer, _ in rows_]
    answers.write_text("".join(json.dumps({"id": row["id"], "image_id": row["image_id"], "question": row["question"],
                                           "response": text}) + "\n" for row, text in zip(rows, texts, strict=True)))
    capsys.readouterr()
    out = tmp_path / "pope.json"
    assert main(["eval-pope", str(answers), *[f"--questions={p}" for p in pope_files.values()], "--json",
                 str(out)]) == 0
    table = capsys.readouterr().out
    assert "coco_pope_random" in table and "44.44" in table  # accuracy 4/9 in percent
    report = json.loads(out.read_text())
    assert set(report) == {"splits"}
    assert set(report["splits"]["coco_pope_random"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio",
                                                          "questions"}


def test_llava_combined_file_takes_pope_labels(tmp_path, pope_files):
    """LLaVA's llava_pope_test.jsonl: its own ids, a category, no label; paired in order with POPE's split file."""
    combined = tmp_path / "llava_pope_test.jsonl"
    combined.write_text("".join(json.dumps({"question_id": 7000 + n, "image": f"COCO_val2014_{n:012d}.jpg",
                                            "text": f"Is there a thing {n} in the image?\n{SHORT_ANSWER}",
                                            "category": "random"}) + "\n" for n in range(1, len(RANDOM) + 1)))
    answers = [{"question_id": 7000 + n, "text": answer} for n, (answer, _) in enumerate(RANDOM, start=1)]
    report = evaluate_pope(answers, [combined, pope_files["coco_pope_random"]])
    assert report["splits"]["coco_pope_random"]["accuracy"] == pytest.approx(4 / 9)
    assert report["splits"]["coco_pope_random"]["yes_ratio"] == pytest.approx(6 / 9)


def test_bare_ids_are_fine_in_one_split_file(tmp_path, pope_files):
    answers = [{"id": n, "response": answer} for n, (answer, _) in enumerate(POPULAR, start=1)]
    assert evaluate_pope(answers, [pope_files["coco_pope_popular"]])["splits"]["coco_pope_popular"]["f1"] == 1.0


@pytest.mark.parametrize("case, message", [
    ("ambiguous id", "names several question(s)"),
    ("missing answer", "1 of 2 questions have no answer"),
    ("twice", "is answered twice"),
    ("bad label", "label must be 'yes' or 'no'"),
    ("unlabelled category", "give the POPE split file that labels them"),
])
def test_errors(tmp_path, pope_files, capsys, case, message):
    questions = [pope_files["coco_pope_popular"], pope_files["coco_pope_adversarial"]]
    answers = [{"id": f"coco_pope_popular/{n}", "response": "Yes"} for n in (1, 2)]
    answers += [{"id": f"coco_pope_adversarial/{n}", "response": "No"} for n in (1, 2)]
    if case == "ambiguous id":
        answers[0]["id"] = 1
    elif case == "missing answer":
        questions = [pope_files["coco_pope_popular"]]
        answers = answers[:1]
    elif case == "twice":
        answers.append(answers[0])
    elif case == "bad label":
        questions = [_split_file(tmp_path, "bad", [("", "maybe")])]
    else:
        combined = tmp_path / "llava_pope_test.jsonl"
        combined.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "?", "category": "random"}) + "\n")
        questions = [combined, *questions]
    path = tmp_path / "given.jsonl"
    path.write_text("".join(json.dumps(answer) + "\n" for answer in answers))
    assert main(["eval-pope", str(path), *[f"--questions={q}" for q in questions]]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("dama eval-pope: error:") and message in error, error

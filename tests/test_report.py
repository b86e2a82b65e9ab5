"""`dama eval-report`: the scorers' own --json reports of two models in one table, Markdown and CSV."""

import csv
import json

from dama.cli import main
from dama.evaluation.amber import AmberVocabulary, evaluate_amber
from dama.evaluation.chair import evaluate_chair
from dama.evaluation.pope import evaluate_pope


def _scored_reports(tmp_path):
    """Reports the scorers write for tiny inputs whose figures are easy to follow."""
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [{"id": 1}, {"id": 2}],
                                     "annotations": [{"id": 1, "image_id": 1, "category_id": 18},
                                                     {"id": 2, "image_id": 2, "category_id": 17}],
                                     "categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]}))
    # Response 1 names a dog (right) and a cat (wrong); response 2 a cat (right): Response Hall 1/2, Object Hall 1/3.
    chair = evaluate_chair([{"image_id": 1, "response": "A dog chases a cat outside."},
                            {"image_id": 2, "response": "A cat sleeps on the mat."}], [instances])
    questions = tmp_path / "coco_pope_random.json"
    questions.write_text("".join(json.dumps({"question_id": n, "image": "a.jpg", "text": "?", "label": label}) + "\n"
                                 for n, label in ((1, "yes"), (2, "no"))))
    # One yes right, one no answered yes: precision 1/2, recall 1, F1 2/3.
    pope = evaluate_pope([{"id": 1, "response": "Yes"}, {"id": 2, "response": "Yes"}], [questions])
    annotations = {1: {"id": 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]},
                   2: {"id": 2, "type": "discriminative-hallucination", "truth": "no"}}
    # Nouns dog, cat: CHAIR 1/2, Cover 1/1, Hal 1/1, Cog 1/1; the one "no" question answered No: F1 1.
    amber = evaluate_amber([(1, "A dog and a cat."), (2, "No")], annotations,
                           AmberVocabulary({"dog": [], "cat": []}, frozenset()))
    paths = {}
    for name, report in (("chair", chair), ("pope", pope), ("amber", amber)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(report))
    return paths


def test_table_of_two_models(tmp_path, capsys):
    paths = _scored_reports(tmp_path)
    other_pope = tmp_path / "other_pope.json"
    other_pope.write_text(json.dumps({"splits": {"coco_pope_adversarial": {"f1": 0.8125}}}))
    markdown, table = tmp_path / "table.md", tmp_path / "table.csv"
    assert main(["eval-report", "--model", "dama", str(paths["amber"]), str(paths["chair"]), str(paths["pope"]),
                 "--model", "base", str(other_pope), "--markdown", str(markdown), "--csv", str(table)]) == 0
    printed = capsys.readouterr().out
    assert printed == markdown.read_text()
    rows = list(csv.reader(table.read_text().splitlines()))
    assert rows[0] == ["Model", "Object HalBench Resp. Hall", "Object HalBench Obj. Hall", "AMBER CHAIR",
                       "AMBER Cover", "AMBER Hal", "AMBER Cog", "AMBER F1", "POPE random F1", "POPE adversarial F1"]
    assert rows[1] == ["dama", "50.0", "33.3", "50.0", "100.0", "100.0", "100.0", "100.0", "66.7", ""]
    assert rows[2] == ["base", "", "", "", "", "", "", "", "", "81.2"]
    assert "| base | - | - |" in printed


def test_errors(tmp_path, capsys):
    paths = _scored_reports(tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"loss": 1.0}))
    for argv, message in (
        (["--model", "dama", str(paths["pope"]), str(paths["pope"])], "has two pope reports"),
        (["--model", "dama", str(other)], "is not a report of dama eval-chair"),
        (["--model", "dama"], "give its report files after the name"),
    ):
        assert main(["eval-report", *argv]) == 1
        error = capsys.readouterr().err.strip()
        assert error.startswith("dama eval-report: error:") and message in error, error

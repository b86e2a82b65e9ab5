"""AMBER: both tasks worked out by hand from the rules of AMBER's inference.py, its files' layouts, the CLI."""

import json

import pytest

from dama.cli import main
from dama.evaluation.amber import AmberVocabulary, evaluate_amber, read_amber_responses, singular_in, yes_or_no
from dama.evaluation.benchmark_prompts import SHORT_ANSWER

# relation.json: an object -> the words that also name it. safe_words.txt: words never counted as hallucinated.
RELATIONS = {"dog": ["puppy"], "person": ["man", "woman", "people"], "grass": ["ground"], "ground": ["floor"],
             "cat": [], "frisbee": [], "car": ["vehicle"], "orange": [], "tree": ["leave"]}
SAFE_WORDS = ["orange"]
GENERATIVE = [
    # nouns: man (person), puppy (dog), ground (grass), cat (a hallu object), dog, frisbee (in neither list),
    # orange (a safe word); "Dog" is capitalised, and AMBER's lemmas keep the case: no noun. 7 nouns, 2 hallucinated;
    # covers person, dog, grass (3 of 3); produces cat (1 of 2 hallu objects).
    ({"truth": ["dog", "grass", "person"], "hallu": ["cat", "car"]},
     "Two men and a puppy play on the ground near a cat. The dog chases a frisbee. Dog food and an orange."),
    # An empty description: no noun, no hallucination, covers 0 of 1, produces 0 of 1.
    ({"truth": ["tree"], "hallu": ["dog"]}, ""),
    # vehicle twice (repeats count as nouns, both cover car), women (woman, associated with the hallu object person):
    # 3 nouns, 1 hallucinated; covers 1 of 1, produces 1 of 1.
    ({"truth": ["car"], "hallu": ["person"]}, "A vehicle and vehicles, women."),
    # "ground" is associated with grass and is itself a truth object: AMBER takes the first match in its order (the
    # associated words first), so it covers grass only. 1 noun, 0 hallucinated; covers 1 of 2; no hallu object.
    ({"truth": ["grass", "ground"], "hallu": []}, "ground"),
]
DISCRIMINATIVE = [  # (type, truth, answer)
    ("discriminative-hallucination", "no", "No"),             # No, correct
    ("discriminative-hallucination", "yes", "Yes, there is."),  # Yes, correct
    ("discriminative-hallucination", "no", "yes"),            # Yes, wrong
    ("discriminative-attribute-state", "no", "No."),          # No, correct
    ("discriminative-attribute-number", "yes", "No"),         # No, wrong
    ("discriminative-attribute-action", "yes", ""),           # empty: neither, wrong
    ("discriminative-relation", "no", "Maybe no"),            # first word Maybe: neither, wrong
    ("relation", "no", "NO"),                                 # No, correct (the 'relation' type is relation too)
]


@pytest.fixture
def amber_files(tmp_path):
    annotations = [{"id": n, "type": "generative", **entry} for n, (entry, _) in enumerate(GENERATIVE, start=1)]
    first = len(GENERATIVE) + 1
    annotations += [{"id": first + n, "type": kind, "truth": truth}
                    for n, (kind, truth, _) in enumerate(DISCRIMINATIVE)]
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    (tmp_path / "relation.json").write_text(json.dumps(RELATIONS, indent=4))
    (tmp_path / "safe_words.txt").write_text("\n".join(SAFE_WORDS) + "\n")
    responses = [{"id": n, "response": text} for n, (_, text) in enumerate(GENERATIVE, start=1)]
    responses += [{"id": first + n, "response": answer} for n, (_, _, answer) in enumerate(DISCRIMINATIVE)]
    (tmp_path / "responses.json").write_text(json.dumps(responses, indent=1))
    return tmp_path


def _run(tmp_path, responses, *extra):
    out = tmp_path / "amber.json"
    code = main(["eval-amber", str(responses), "--annotations", str(tmp_path / "annotations.json"), "--relations",
                 str(tmp_path / "relation.json"), "--safe-words", str(tmp_path / "safe_words.txt"), "--json", str(out),
                 *extra])
    assert code == 0
    return json.loads(out.read_text())


def test_hand_worked_generative(amber_files, capsys):
    generative = _run(amber_files, amber_files / "responses.json")["generative"]
    detail = {score["id"]: score for score in generative["per_response"]}
    assert detail[1]["nouns"] == ["man", "puppy", "ground", "cat", "dog", "frisbee", "orange"]
    assert detail[1]["hallucinated"] == ["cat", "frisbee"] and detail[1]["produced_hallu"] == ["cat"]
    assert detail[4]["covered"] == ["grass"]
    assert generative["chair"] == pytest.approx((2 + 0 + 1 + 0) / (7 + 0 + 3 + 1))
    assert generative["cover"] == pytest.approx((3 + 0 + 1 + 1) / (3 + 1 + 1 + 2))
    assert generative["hal"] == pytest.approx(2 / 4)
    assert generative["cog"] == pytest.approx((1 + 0 + 1) / (2 + 1 + 1 + 0))
    printed = capsys.readouterr().out
    assert "CHAIR 27.3" in printed and "Cover 71.4" in printed and "Hal 50.0" in printed and "Cog 50.0" in printed


def test_hand_worked_discriminative(amber_files):
    part = _run(amber_files, amber_files / "responses.json")["discriminative"]
    # Overall: correct 4 of 8; answered No 4 times, 3 of them to a "no" question; 5 questions are "no".
    assert part["accuracy"] == pytest.approx(4 / 8)
    assert part["precision"] == pytest.approx(3 / 4)
    assert part["recall"] == pytest.approx(3 / 5)
    assert part["f1"] == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    # Existence: 2 of 3 correct, P 1/1, R 1/2. Attribute: 1 of 3, P 1/2, R 1/1. Relation: 1 of 2, P 1/1, R 1/2.
    for name, accuracy, precision, recall in (("existence", 2 / 3, 1, 1 / 2), ("attribute", 1 / 3, 1 / 2, 1),
                                              ("relation", 1 / 2, 1, 1 / 2)):
        assert part[name]["accuracy"] == pytest.approx(accuracy)
        assert (part[name]["precision"], part[name]["recall"]) == pytest.approx((precision, recall))
        assert part[name]["f1"] == pytest.approx(2 / 3)
    assert part["state"]["f1"] == 1.0
    # number: one wrong "No": precision 0 of 1, no "no" question (recall 0 where AMBER divides by ~0).
    assert (part["number"]["accuracy"], part["number"]["precision"], part["number"]["recall"]) == (0.0, 0.0, 0.0)
    assert part["action"]["questions"] == 1 and part["action"]["accuracy"] == 0.0


def test_generate_jsonl_and_parts(amber_files):
    """`dama generate`'s JSONL scores like AMBER's JSON list; discriminative answers alone need no vocabulary."""
    lines = amber_files / "answers.jsonl"
    records = json.loads((amber_files / "responses.json").read_text())
    lines.write_text("".join(json.dumps({"id": r["id"], "image_id": "AMBER_1.jpg", "question": "q",
                                         "response": r["response"]}) + "\n" for r in records))
    assert _run(amber_files, lines) == _run(amber_files, amber_files / "responses.json")
    only_yes_no = [(r["id"], r["response"]) for r in records if r["id"] > len(GENERATIVE)]
    annotations = {e["id"]: e for e in json.loads((amber_files / "annotations.json").read_text())}
    report = evaluate_amber(only_yes_no, annotations, vocabulary=None)
    assert set(report) == {"discriminative"}
    one_line = amber_files / "one.jsonl"
    one_line.write_text(json.dumps({"id": 9, "response": "No"}) + "\n")
    assert read_amber_responses(one_line) == [(9, "No")]


def test_words():
    vocabulary = {"man", "glass", "glasses", "bus", "leaf", "leave", "berry", "box"}
    assert [singular_in(word, vocabulary) for word in ("men", "glasses", "buses", "leaves", "berries", "boxes",
                                                       "Bus", "run")] == [
        "man", "glass", "bus", "leaf", "berry", "box", None, None]
    assert singular_in("leaves", {"leave"}) is None  # WordNet's exception list: leaves is leaf only
    assert [yes_or_no(answer) for answer in ("Yes", "no.", " NO, it is not", "Yesterday", "", "Not")] == [
        "Yes", "No", "No", None, None, None]
    assert AmberVocabulary({"dog": ["puppy"]}, frozenset()).nouns("Dogs, a dog-house, puppies.") == ["puppy"]


def test_benchmark_prompts(tmp_path):
    queries = tmp_path / "query_all.json"
    queries.write_text(json.dumps([{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."},
                                   {"id": 1005, "image": "AMBER_1.jpg", "query": "Is the sky sunny in this image?"}]))
    assert main(["benchmark-prompts", "amber", str(queries), "--output", str(tmp_path / "amber.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "amber.jsonl").read_text().splitlines()]
    assert rows == [{"id": 1, "image": "AMBER_1.jpg", "image_id": "AMBER_1.jpg", "question": "Describe this image."},
                    {"id": 1005, "image": "AMBER_1.jpg", "image_id": "AMBER_1.jpg",
                     "question": f"Is the sky sunny in this image?\n{SHORT_ANSWER}"}]


@pytest.mark.parametrize("case, message", [
    ("unknown id", "response id 99 is not in the annotations file"),
    ("no relations", "give --relations relation.json"),
    ("object not in relations", "are not keys of relation.json"),
    ("bad id", "is not an AMBER query id"),
])
def test_errors(amber_files, capsys, case, message):
    records = json.loads((amber_files / "responses.json").read_text())
    extra = ["--relations", str(amber_files / "relation.json")]
    if case == "unknown id":
        records.append({"id": 99, "response": "Yes"})
    elif case == "no relations":
        extra = []
    elif case == "object not in relations":
        (amber_files / "small.json").write_text(json.dumps({"dog": []}))
        extra = ["--relations", str(amber_files / "small.json")]
    else:
        records[0]["id"] = "first"
    path = amber_files / "given.json"
    path.write_text(json.dumps(records))
    assert main(["eval-amber", str(path), "--annotations", str(amber_files / "annotations.json"), *extra]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("dama eval-amber: error:") and message in error, error

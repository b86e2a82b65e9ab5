"""CHAIR: hand-worked responses (synonyms, plurals, multi-word names, no object), the COCO list, the CLI."""

import json

import pytest

from dama.cli import main
from dama.evaluation.chair import ObjectVocabulary, evaluate_chair, read_instances
from dama.evaluation.coco_objects import COCO_SYNONYMS, plural

# A slice of COCO's categories, with COCO's ids. "chair" and "bicycle" are in no image: a mention is hallucinated.
CATEGORIES = [(1, "person"), (2, "bicycle"), (17, "cat"), (18, "dog"), (54, "hot dog"), (62, "chair"),
              (67, "dining table")]
# image id -> category ids annotated in it (dining table twice: instances, not objects, are annotated).
IMAGES = {1: [1, 18, 67, 67], 2: [54, 67], 3: [17], 4: [3]}
RESPONSES = [
    # person (men), dog (puppies), dining table: all there. 3 mentions, 0 hallucinated.
    {"id": "a", "image_id": 1, "response": "Two men walk their puppies past a dining table."},
    # hot dog ("Hot dogs", not a dog), dining table ("table"), dog, chair ("chairs"): 4 mentions, dog and chair wrong.
    {"id": "b", "image_id": 2, "response": "Hot dogs on a table, and a dog sleeps under the chairs."},
    # cat (kitten and cat: one object), bicycle: 2 mentions, bicycle wrong.
    {"id": "c", "image_id": "3", "response": "A kitten next to a bicycle and another cat."},
    # No object at all: counts as a response without hallucination.
    {"id": "d", "image_id": "000000000004.jpg", "response": "A photo of a sunny street."},
]


def _instances(tmp_path, categories=CATEGORIES, images=IMAGES, name="instances.json"):
    annotations = [{"id": n, "image_id": image, "category_id": category}
                   for n, (image, category) in enumerate(((i, c) for i, cs in images.items() for c in cs), start=1)]
    data = {"images": [{"id": image, "file_name": f"{image:012d}.jpg"} for image in images],
            "annotations": annotations,
            "categories": [{"id": number, "name": name} for number, name in [*categories, (3, "car")]]}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _responses(tmp_path, records=RESPONSES):
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_hand_worked_chair(tmp_path):
    report = evaluate_chair(RESPONSES, [_instances(tmp_path)])
    detail = {score["id"]: score for score in report["per_response"]}
    assert detail["a"]["mentioned"] == ["person", "dog", "dining table"] and detail["a"]["hallucinated"] == []
    assert detail["b"]["mentioned"] == ["hot dog", "dining table", "dog", "chair"]
    assert detail["b"]["hallucinated"] == ["dog", "chair"]
    assert detail["b"]["hallucinated_words"] == ["dog", "chairs"]
    assert detail["c"]["mentioned"] == ["cat", "bicycle"] and detail["c"]["hallucinated"] == ["bicycle"]
    assert detail["d"]["mentioned"] == [] and detail["d"]["ground_truth"] == ["car"]
    # CHAIR_s: b and c hallucinate, of 4 responses. CHAIR_i: (0 + 2 + 1 + 0) / (3 + 4 + 2 + 0) mentions.
    # Recall: found 3 + 2 + 1 + 0 of the images' 3 + 2 + 1 + 1 objects.
    assert report["chair_s"] == pytest.approx(2 / 4)
    assert report["chair_i"] == pytest.approx(3 / 9)
    assert report["recall"] == pytest.approx(6 / 7)
    assert (report["responses"], report["mentions"], report["hallucinated_mentions"]) == (4, 9, 3)


def test_longest_phrase_wins_and_punctuation_separates():
    vocabulary = ObjectVocabulary.for_categories(COCO_SYNONYMS)
    found = [(m.text, m.category) for m in vocabulary.mentions("Hot-dogs on the dining tables; a teddy bear, mice.")]
    assert found == [("hot dogs", "hot dog"), ("dining tables", "dining table"), ("teddy bear", "teddy bear"),
                     ("mice", "mouse")]
    # "computer, mice" is two objects; "computer mouse" is one. "train tracks" hide the train.
    assert [m.category for m in vocabulary.mentions("a computer, mice")] == ["laptop", "mouse"]
    assert [m.category for m in vocabulary.mentions("a computer mouse by the train tracks")] == ["mouse"]
    assert [m.category for m in vocabulary.mentions("a baby elephant and a baby")] == ["elephant", "person"]


def test_coco_list_and_plurals():
    assert len(COCO_SYNONYMS) == 80
    assert all(forms[0] == name for name, forms in COCO_SYNONYMS.items())
    assert [plural(word) for word in ("person", "bus", "knife", "puppy", "wine glass", "skis", "toy")] == [
        "people", "buses", "knives", "puppies", "wine glasses", "skis", "toys"]


def test_annotation_files_own_categories_and_synonyms(tmp_path):
    """Categories outside COCO's list are matched by name (or their own synonyms), as the demo's shapes are."""
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps({
        "images": [{"id": 0, "file_name": "demo/eval/00000.png"}],
        "annotations": [{"id": 1, "image_id": 0, "category_id": 1}],
        "categories": [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square", "synonyms": ["blue box"]}],
    }))
    responses = [{"image_id": "00000.png", "response": "There is a red circle and two blue boxes. The dog is red."}]
    report = evaluate_chair(responses, [path])
    assert report["per_response"][0]["mentioned"] == ["red circle", "blue square"]
    assert report["per_response"][0]["hallucinated_words"] == ["blue boxes"]
    assert read_instances([path]).categories == ["red circle", "blue square"]


def test_captions_add_ground_truth(tmp_path):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"annotations": [{"image_id": 3, "caption": "A cat sits on a bike."}]}))
    report = evaluate_chair(RESPONSES[2:3], [_instances(tmp_path)], [captions])
    assert report["chair_s"] == 0.0 and report["per_response"][0]["ground_truth"] == ["bicycle", "cat"]


def test_cli_table_and_json(tmp_path, capsys):
    instances, responses = _instances(tmp_path), _responses(tmp_path)
    assert main(["eval-chair", str(responses), "--annotations", str(instances)]) == 0
    printed = capsys.readouterr().out
    assert "CHAIR_s" in printed and "50.0%" in printed and "33.3%" in printed
    assert "b: hallucinated dog, chairs" in printed
    assert main(["eval-chair", str(responses), "--annotations", str(instances), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"chair_s", "chair_i", "responses", "mentions", "per_response"} <= set(report)
    out = tmp_path / "report.json"
    assert main(["eval-chair", str(responses), "--annotations", str(instances), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["chair_i"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("case, message", [
    ("missing annotations", "does not exist"),
    ("unknown image", "name images the annotations do not hold"),
    ("bad line", "line 2"),
    ("not instances", "lacks the list(s) ['annotations', 'categories']"),
])
def test_cli_errors(tmp_path, capsys, case, message):
    instances, responses = _instances(tmp_path), _responses(tmp_path)
    if case == "missing annotations":
        instances = tmp_path / "nowhere.json"
    elif case == "unknown image":
        responses = _responses(tmp_path, [{"id": 0, "image_id": 99, "response": "a dog"}])
    elif case == "bad line":
        responses.write_text(json.dumps(RESPONSES[0]) + "\n{not json\n")
    else:
        instances.write_text(json.dumps({"images": []}))
    assert main(["eval-chair", str(responses), "--annotations", str(instances)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("dama eval-chair: error:") and message in error and "Traceback" not in error

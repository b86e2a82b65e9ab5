"""Object HalBench's figures worked out by hand from RLAIF-V's rules, and its prompt file as it ships, through
`dama generate` (beam search preset) and `dama eval-chair`."""

import base64
import io
import json

import pytest
from PIL import Image

from dama.cli import main
from dama.demo.data import demo_corpus
from dama.demo.tiny_llava import build_tiny_llava
from dama.evaluation.chair import evaluate_chair

# COCO's ids and names.
CATEGORIES = {1: "person", 2: "bicycle", 3: "car", 17: "cat", 18: "dog", 54: "hot dog", 62: "chair", 63: "couch",
              67: "dining table"}
IMAGES = {1: [1, 18, 67], 2: [54, 67], 3: [17], 4: [3]}
RESPONSES = [
    # Words man, puppy, dining table, dog ("puppies" and "dog": two words of one category): 4, none hallucinated.
    # Categories named correctly: person, dog, dining table (3 of the image's 3).
    {"id": "a", "image_id": 1, "response": "Two men walk their puppies past a dining table and a dog."},
    # hot dog, table, dog, chair ("chairs" and "chair" are one word): 4 words, dog and chair hallucinated; 2 of 2.
    {"id": "b", "image_id": 2, "response": "Hot dogs on a table, and a dog sleeps under the chairs by a chair."},
    # kitten, bicycle, cat: 3 words (kitten and cat both name cat), bicycle hallucinated; 1 of 1.
    {"id": "c", "image_id": 3, "response": "A kitten next to a bicycle and another cat."},
    # No COCO object: left out of Response Hall's denominator; 0 of 1 for recall.
    {"id": "d", "image_id": 4, "response": "A photo of a sunny street."},
    # Three words or fewer: no object extracted, even the hallucinated man; 0 of 1.
    {"id": "e", "image_id": 4, "response": "A man."},
    # woman, cat, sofa (cat repeated): 3 words, cat and sofa (couch) hallucinated; person: 1 of 3.
    {"id": "f", "image_id": 1, "response": "A woman and a cat sit on a sofa with a cat."},
]


def _instances(path, images=IMAGES):
    annotations = [{"id": 100 * image + n, "image_id": image, "category_id": category}
                   for image, categories in images.items() for n, category in enumerate(categories)]
    path.write_text(json.dumps({"images": [{"id": image, "file_name": f"COCO_val2014_{image:012d}.jpg"}
                                           for image in images],
                                "annotations": annotations,
                                "categories": [{"id": i, "name": name} for i, name in CATEGORIES.items()]}))
    return path


def test_hand_worked_object_halbench(tmp_path):
    report = evaluate_chair(RESPONSES, [_instances(tmp_path / "instances.json")])
    # Responses naming an object: a, b, c, f; hallucinating: b, c, f.
    assert report["response_hall"] == pytest.approx(3 / 4)
    assert report["object_hall"] == pytest.approx((0 + 2 + 1 + 2) / (4 + 4 + 3 + 3))
    assert report["object_recall"] == pytest.approx((3 + 2 + 1 + 0 + 0 + 1) / (3 + 2 + 1 + 1 + 1 + 3))
    assert report["object_halbench"] == {"responses_with_objects": 4, "hallucinating_responses": 3,
                                         "object_words": 14, "hallucinated_words": 5, "recalled_objects": 7,
                                         "ground_truth_objects": 11}
    # CHAIR_s keeps all six responses in its denominator, and counts e's man.
    assert report["chair_s"] == pytest.approx(4 / 6)


def test_captions_and_several_instance_files(tmp_path):
    """Their script joins train and val 2014, instances and captions: a couch in a caption of image 1 is there."""
    train = _instances(tmp_path / "instances_train2014.json", {1: [1, 18, 67], 2: [54, 67]})
    val = _instances(tmp_path / "instances_val2014.json", {3: [17], 4: [3]})
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "A man on a couch with his dog."}]}))
    report = evaluate_chair(RESPONSES, [train, val], [captions])
    # f's sofa is now right: f hallucinates cat only; person and couch named (2 of the image's 4 objects now).
    assert report["object_hall"] == pytest.approx((0 + 2 + 1 + 1) / 14)
    assert report["object_recall"] == pytest.approx((3 + 2 + 1 + 0 + 0 + 2) / (4 + 2 + 1 + 1 + 1 + 4))
    assert report["response_hall"] == pytest.approx(3 / 4)


def test_shipped_prompt_file_through_generate_and_eval_chair(tmp_path, capsys):
    """obj_halbench_300_with_image.jsonl's rows: {"image_id", "question", "image" (base64 JPEG)}."""
    build_tiny_llava(demo_corpus(), tmp_path / "model", seed=3)
    rows = []
    for image_id, colour in ((1, (200, 30, 30)), (3, (30, 30, 200))):
        buffer = io.BytesIO()
        Image.new("RGB", (48, 40), colour).save(buffer, format="JPEG")
        rows.append({"image_id": image_id, "question": "Describe this image in detail.",
                     "image": base64.b64encode(buffer.getvalue()).decode()})
    prompts = tmp_path / "obj_halbench_300_with_image.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    answers = tmp_path / "objhal.jsonl"
    assert main(["generate", "--model", str(tmp_path / "model"), "--input", str(prompts), "--output", str(answers),
                 "--preset", "object-halbench", "--max-new-tokens", "5", "--batch-size", "2"]) == 0
    assert json.loads((tmp_path / "objhal.jsonl.meta.json").read_text())["num_beams"] == 3
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [record["image_id"] for record in records] == [1, 3]
    capsys.readouterr()
    out = tmp_path / "objhal.chair.json"
    assert main(["eval-chair", str(answers), "--annotations", str(_instances(tmp_path / "instances.json")),
                 "--json", str(out)]) == 0
    assert "Object HalBench: Response Hall" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert {"response_hall", "object_hall", "object_recall", "chair_s", "chair_i", "recall"} <= set(report)
    assert report["object_halbench"]["ground_truth_objects"] == 3 + 1

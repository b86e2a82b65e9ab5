"""How long the benchmark scorers take at the benchmarks' full sizes, on synthetic inputs (`python -m bench.scoring`).

Inputs, written to a temporary folder from a fixed seed and scored through each command's `main` (reading the files
included):
- Object HalBench: 300 responses of about 120 words against COCO 2014-sized annotation files (82,783 + 40,504
  images, 604,907 + 291,875 instances, 414,113 + 202,654 captions, the sizes of train2014 and val2014) with the
  minimal fields the scorer reads (110 MiB in all; the real instances files also hold segmentation polygons and
  are several times larger, and reading them dominates);
- POPE: three split files of 3,000 questions and 9,000 answers;
- AMBER: 15,220 responses (1,004 descriptions of about 100 words, 14,216 yes/no answers) against a 340-object
  vocabulary.
`--quick` divides every size by 100.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import tempfile
import time
from pathlib import Path

from dama.evaluation import amber, chair, pope
from dama.evaluation.coco_objects import COCO_SYNONYMS

FILLER = ("the", "a", "is", "on", "in", "with", "and", "of", "standing", "near", "large", "small", "there", "image",
          "shows", "sitting", "next", "to", "background", "white", "blue", "scene", "street", "several")
COCO_SIZES = {"train": (82_783, 604_907, 414_113), "val": (40_504, 291_875, 202_654)}


def _sentence(rng: random.Random, nouns: list[str], length: int, noun_share: float = 0.15) -> str:
    return " ".join(rng.choice(nouns) if rng.random() < noun_share else rng.choice(FILLER) for _ in range(length))


def write_object_halbench(root: Path, rng: random.Random, scale: int) -> list[str]:
    names = list(COCO_SYNONYMS)
    nouns = [form for forms in COCO_SYNONYMS.values() for form in forms]
    categories = [{"id": n + 1, "name": name} for n, name in enumerate(names)]
    arguments, next_image = [], 1
    for split, (images, instances, captions) in COCO_SIZES.items():
        images, instances, captions = images // scale, instances // scale, captions // scale
        ids = list(range(next_image, next_image + images))
        next_image += images
        (root / f"instances_{split}2014.json").write_text(json.dumps({
            "images": [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg"} for i in ids],
            "annotations": [{"id": n, "image_id": rng.choice(ids), "category_id": rng.randint(1, 80)}
                            for n in range(instances)],
            "categories": categories}))
        (root / f"captions_{split}2014.json").write_text(json.dumps({
            "annotations": [{"image_id": rng.choice(ids), "caption": _sentence(rng, nouns, 11)}
                            for _ in range(captions)]}))
        arguments += ["--annotations", str(root / f"instances_{split}2014.json"),
                      "--captions", str(root / f"captions_{split}2014.json")]
    responses = root / "objhal.jsonl"
    responses.write_text("".join(json.dumps({"id": n, "image_id": rng.randint(1, next_image - 1), "question": "q",
                                             "response": _sentence(rng, nouns, 120)}) + "\n"
                                 for n in range(max(300 // scale, 3))))
    return [str(responses), *arguments, "--json", str(root / "objhal.json")]


def write_pope(root: Path, rng: random.Random, scale: int) -> list[str]:
    answers, arguments = [], []
    pool = ("Yes", "No", "Yes, there is a dog in the image.", "No, there is no car in the image.", "yes", "no")
    for split in ("random", "popular", "adversarial"):
        path = root / f"coco_pope_{split}.json"
        count = 3000 // scale
        path.write_text("".join(json.dumps({"question_id": n, "image": f"COCO_val2014_{n:012d}.jpg",
                                            "text": "Is there a dog in the image?",
                                            "label": rng.choice(("yes", "no"))}) + "\n" for n in range(1, count + 1)))
        answers += [{"id": f"{path.stem}/{n}", "response": rng.choice(pool)} for n in range(1, count + 1)]
        arguments += ["--questions", str(path)]
    (root / "pope_answers.jsonl").write_text("".join(json.dumps(answer) + "\n" for answer in answers))
    return [str(root / "pope_answers.jsonl"), *arguments, "--json", str(root / "pope.json")]


def write_amber(root: Path, rng: random.Random, scale: int) -> list[str]:
    objects = [f"object{n}" for n in range(340)]
    relations = {name: rng.sample(objects, 2) for name in objects}
    generative, discriminative = max(1004 // scale, 2), 14_216 // scale
    annotations = [{"id": n, "type": "generative", "truth": rng.sample(objects, 6), "hallu": rng.sample(objects, 5)}
                   for n in range(1, generative + 1)]
    kinds = ("discriminative-hallucination", "discriminative-attribute-state", "discriminative-attribute-number",
             "discriminative-attribute-action", "discriminative-relation", "relation")
    annotations += [{"id": n, "type": rng.choice(kinds), "truth": rng.choice(("yes", "no"))}
                    for n in range(generative + 1, generative + discriminative + 1)]
    responses = [{"id": entry["id"], "response": _sentence(rng, objects, 100) if entry["type"] == "generative"
                  else rng.choice(("Yes", "No", "Yes, it is.", "no"))} for entry in annotations]
    (root / "annotations.json").write_text(json.dumps(annotations))
    (root / "relation.json").write_text(json.dumps(relations))
    (root / "safe_words.txt").write_text("object0\nobject1\n")
    (root / "responses.json").write_text(json.dumps(responses))
    return [str(root / "responses.json"), "--annotations", str(root / "annotations.json"), "--relations",
            str(root / "relation.json"), "--safe-words", str(root / "safe_words.txt"),
            "--json", str(root / "amber.json")]


def run(scale: int = 1) -> dict[str, dict[str, float]]:
    """{benchmark: {"seconds", "items"}} for the three scorers, inputs written first (not timed)."""
    rng = random.Random(0)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name, write, command, items in (
            ("Object HalBench", write_object_halbench, chair.main, "objhal.json"),
            ("POPE", write_pope, pope.main, "pope.json"),
            ("AMBER", write_amber, amber.main, "amber.json"),
        ):
            argv = write(root, rng, scale)
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = command(argv)
            seconds = time.perf_counter() - start
            if code != 0:
                raise RuntimeError(f"{name}: the scorer failed on the synthetic input")
            report = json.loads((root / items).read_text())
            count = (report.get("responses") or sum(s["questions"] for s in report.get("splits", {}).values())
                     or report["generative"]["responses"] + report["discriminative"]["questions"])
            results[name] = {"seconds": seconds, "items": count}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every size divided by 100")
    args = parser.parse_args()
    for name, result in run(100 if args.quick else 1).items():
        print(f"{name:<16} {result['items']:>6} items  {result['seconds']:6.2f} s")


if __name__ == "__main__":
    main()

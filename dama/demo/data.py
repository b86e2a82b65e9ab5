"""Synthetic preference pairs in the RLAIF-V parquet format: drawn images, faithful and hallucinating answers.

Each image is a plain background with one to three coloured shapes. The chosen answer describes it correctly; the
rejected answer hallucinates, from one swapped word (a hard pair, small hardness) to every sentence wrong (an easy
pair), so the data has a spread of hardness like real preference data. Everything is a function of the seed.

Each split also gets a COCO-format instances file of its drawn objects (`<split>.instances.json`): one category per
colour and shape ("red circle"), one annotation per object, image ids equal to the rows' `idx`. `dama eval-chair`
scores answers about the images against it exactly as it scores answers about COCO images.
"""

from __future__ import annotations

import argparse
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from dama.data.dataset import ConversationTemplate
from dama.data.formats import write_json_atomic

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
QUESTIONS = (
    "Describe the image.",
    "What do you see in this picture?",
    "Describe the shapes and colours in the image.",
    "What is shown in the image?",
)
# How many of the answer's statements the rejected answer gets wrong, drawn per pair: 1 is hard, all is easy.
ERROR_LEVELS = ("one_word", "half", "all")


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[tuple[str, str], ...]  # (colour, shape)


def draw_scene(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    cell = size // len(scene.objects)
    for slot, (colour, shape) in enumerate(scene.objects):
        radius = rng.randint(cell // 4, max(cell // 4 + 1, cell // 2 - 2))
        cx = slot * cell + cell // 2
        cy = rng.randint(radius, size - radius)
        draw_shape(draw, colour, shape, (cx, cy), radius)
    return image


def draw_shape(draw: ImageDraw.ImageDraw, colour: str, shape: str, centre: tuple[int, int], radius: int) -> None:
    """One filled shape ("circle", "square" or "triangle") of a named colour, inside the square of `radius` around
    `centre` (pixels)."""
    cx, cy = centre
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=COLOURS[colour])


def random_scene(rng: random.Random) -> Scene:
    background = rng.choice(list(COLOURS))
    colours = [c for c in COLOURS if c != background]
    count = rng.randint(1, 3)
    return Scene(background, tuple((rng.choice(colours), rng.choice(SHAPES)) for _ in range(count)))


def describe(scene: Scene) -> list[str]:
    """The answer as a list of statements, in a fixed order: count, each object, background."""
    count = len(scene.objects)
    noun = "shape" if count == 1 else "shapes"
    sentences = [f"The image shows {COUNT_WORDS[count]} {noun}."]
    positions = {1: ["in the middle"], 2: ["on the left", "on the right"],
                 3: ["on the left", "in the middle", "on the right"]}[count]
    for (colour, shape), where in zip(scene.objects, positions, strict=True):
        article = "an" if colour[0] in "aeiou" else "a"
        sentences.append(f"There is {article} {colour} {shape} {where}.")
    sentences.append(f"The background is {scene.background}.")
    return sentences


def hallucinate(scene: Scene, level: str, rng: random.Random) -> list[str]:
    """The answer of a corrupted scene: one word, half of the statements, or all of them wrong.

    The count statement always stays right, so chosen and rejected answers have the same structure.
    """
    wrong_objects = []
    for colour, shape in scene.objects:
        other_colours = [c for c in COLOURS if c not in (colour, scene.background)]
        wrong_objects.append((rng.choice(other_colours), rng.choice([s for s in SHAPES if s != shape])))
    wrong_background = rng.choice([c for c in COLOURS if c != scene.background])
    wrong = describe(Scene(wrong_background, tuple(wrong_objects)))
    if level == "all":
        return wrong
    if level == "one_word":
        slot = rng.randrange(len(scene.objects) + 1)
        if slot == len(scene.objects):
            return describe(Scene(wrong_background, scene.objects))
        objects = list(scene.objects)
        objects[slot] = (wrong_objects[slot][0], objects[slot][1])
        return describe(Scene(scene.background, tuple(objects)))
    truth = describe(scene)
    statements = range(1, len(truth))
    wrong_slots = set(rng.sample(statements, max(1, len(statements) // 2)))
    return [wrong[i] if i in wrong_slots else truth[i] for i in range(len(truth))]


def object_name(colour: str, shape: str) -> str:
    """A drawn object's category name in the demo's annotation files: "red circle"."""
    return f"{colour} {shape}"


def demo_categories() -> list[dict]:
    """Every colour-and-shape object as a COCO-style category (ids from 1); backgrounds are not objects."""
    names = [object_name(colour, shape) for colour in COLOURS for shape in SHAPES]
    return [{"id": number, "name": name, "supercategory": name.split()[-1]}
            for number, name in enumerate(names, start=1)]


def coco_instances(scenes: list[Scene], rows: list[dict], image_size: int) -> dict:
    """A COCO-format instances file for drawn scenes: one image per row (id = the row's idx, file_name = its
    image_path), one annotation per drawn object, the categories of `demo_categories`."""
    category_ids = {category["name"]: category["id"] for category in demo_categories()}
    images, annotations = [], []
    for scene, row in zip(scenes, rows, strict=True):
        images.append({"id": row["idx"], "file_name": row["image_path"], "width": image_size, "height": image_size})
        for colour, shape in scene.objects:
            annotations.append({"id": len(annotations) + 1, "image_id": row["idx"],
                                "category_id": category_ids[object_name(colour, shape)]})
    return {"info": {"description": "dama demo: drawn shapes"}, "images": images, "annotations": annotations,
            "categories": demo_categories()}


def instances_path(split_path: str | Path) -> Path:
    """Where the annotation file of a split's parquet lives: `<split>.instances.json` beside it."""
    split_path = Path(split_path)
    return split_path.with_name(f"{split_path.stem}.instances.json")


def make_rows(num_pairs: int, seed: int, image_size: int, split: str) -> list[dict]:
    """The parquet rows of a split (see `make_scene_rows`)."""
    return [row for _, row in make_scene_rows(num_pairs, seed, image_size, split)]


def make_scene_rows(num_pairs: int, seed: int, image_size: int, split: str) -> list[tuple[Scene, dict]]:
    """The rows of a split with the scene each one was drawn from."""
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for index in range(num_pairs):
        scene = random_scene(rng)
        image = draw_scene(scene, image_size, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        level = ERROR_LEVELS[index % len(ERROR_LEVELS)]
        image_path = f"demo/{split}/{index:05d}.png"
        rows.append((scene, {
            "ds_name": "dama-demo",
            "image": {"bytes": buffer.getvalue(), "path": image_path},
            "question": rng.choice(QUESTIONS),
            "chosen": " ".join(describe(scene)),
            "rejected": " ".join(hallucinate(scene, level, rng)),
            "origin_dataset": "dama-demo",
            "origin_split": f"{split}/{level}",
            "idx": index,
            "image_path": image_path,
        }))
    return rows


def write_parquet(rows: list[dict], path: Path) -> None:
    """Atomic: the parquet appears under its name only once it is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), temporary)
    os.replace(temporary, path)


def make_demo_data(output_dir: str | Path, num_train: int = 384, num_eval: int = 96, seed: int = 0,
                   image_size: int = 64) -> dict[str, Path]:
    """Writes train.parquet and eval.parquet under output_dir, each with its COCO-format annotation file of the drawn
    objects (`instances_path`: train.instances.json, eval.instances.json); returns the parquet paths by split name."""
    output_dir = Path(output_dir)
    paths = {}
    for split, count in (("train", num_train), ("eval", num_eval)):
        paths[split] = output_dir / f"{split}.parquet"
        scenes_and_rows = make_scene_rows(count, seed, image_size, split)
        rows = [row for _, row in scenes_and_rows]
        write_parquet(rows, paths[split])
        write_json_atomic(instances_path(paths[split]),
                          coco_instances([scene for scene, _ in scenes_and_rows], rows, image_size))
    return paths


def demo_corpus(num_scenes: int = 200, seed: int = 0) -> list[str]:
    """Texts in the demo data's vocabulary, for training a tiny tokenizer: the conversation template, the
    questions, and faithful and hallucinated answers at every error level."""
    rng = random.Random(seed)
    template = ConversationTemplate()
    corpus = [f"{template.system} {template.user_role}: {template.assistant_role}:", *QUESTIONS]
    for index in range(num_scenes):
        scene = random_scene(rng)
        corpus.append(" ".join(describe(scene)))
        corpus.append(" ".join(hallucinate(scene, ERROR_LEVELS[index % len(ERROR_LEVELS)], rng)))
    return corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dama make-demo-data",
        description="Write a small synthetic preference dataset in the RLAIF-V parquet format (train and eval "
        "splits): drawn shapes on coloured backgrounds, a faithful chosen answer and a hallucinating rejected one.",
    )
    parser.add_argument("--output-dir", default="outputs/demo/data", help="folder for train.parquet and eval.parquet")
    parser.add_argument("--num-train", type=int, default=384, help="training pairs (default: %(default)s)")
    parser.add_argument("--num-eval", type=int, default=96, help="held-out pairs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="everything is a function of this seed")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_eval < 0 or args.image_size < 16:
        parser.error("need --num-train >= 1, --num-eval >= 0 and --image-size >= 16")
    for split, path in make_demo_data(args.output_dir, args.num_train, args.num_eval, args.seed,
                                      args.image_size).items():
        print(f"{split}: {path}")
    return 0

"""The demo's world: drawn objects with a co-occurrence prior, and captions that name what usually comes along.

Real object hallucination comes from language priors: web captions name objects that usually appear together (a
"fork" beside a "knife", a "chair" beside a "dining table"), sometimes when one of them is not in the picture, and a
model trained on them learns to say the partner whether or not it sees it. The demo world has the same structure:

- eight objects, each a fixed colour and shape ("red circle", "blue square", ...), drawn on a grey background;
- the objects come in `PARTNERS` pairs: an object's partner is in the scene with probability `P_PARTNER`;
- a supervised caption names the objects in a fixed order, and, when an object's partner is absent, names that
  partner in place of another object with probability `P_CAPTION_PARTNER` (more often than not, so a model that
  learnt the captions names the partner by default: it sees, and it still hallucinates). The caption keeps the
  scene's number of objects, as a caption writer who expected the partner would: the hallucination is a swap, so
  a faithful and a hallucinating answer differ in an object's name, not in their length.

Each split is an `{image, question}` parquet (RLAIF-V columns; `chosen` holds the supervised caption, `rejected` is
empty) with a COCO-format instances file of the drawn objects beside it, image ids equal to the rows' `idx`.
Everything is a function of the seed.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from dama.data.dataset import ConversationTemplate
from dama.data.formats import PairRow, default_image_folder, load_preference_rows, write_json_atomic
from dama.demo.data import QUESTIONS, draw_shape, instances_path, write_parquet
from dama.demo.tiny_clip import CaptionedImage

# (colour, shape) of each object; its name is "colour shape", its category id its position + 1.
OBJECTS = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"),
           ("purple", "square"), ("orange", "triangle"), ("white", "circle"), ("black", "square"))
# Objects that usually appear together: indices into OBJECTS.
PARTNERS = ((0, 1), (2, 3), (4, 5), (6, 7))
P_PARTNER = 0.6
P_CAPTION_PARTNER = 0.65
BACKGROUND = (128, 128, 128)
MAX_OBJECTS = 3


def object_names() -> list[str]:
    return [f"{colour} {shape}" for colour, shape in OBJECTS]


def partner_of(index: int) -> int:
    for first, second in PARTNERS:
        if index in (first, second):
            return second if index == first else first
    raise ValueError(f"object {index} has no partner")


@dataclass(frozen=True)
class WorldScene:
    """The objects drawn (indices into OBJECTS, sorted) and the objects the caption names (sorted)."""

    objects: tuple[int, ...]
    named: tuple[int, ...]


def random_world_scene(rng: random.Random) -> WorldScene:
    """An anchor object, its partner with probability P_PARTNER, other objects up to two or three in all; the caption
    swaps one object for the absent partner of another with probability P_CAPTION_PARTNER (when there is one)."""
    anchor = rng.randrange(len(OBJECTS))
    objects = {anchor}
    if rng.random() < P_PARTNER:
        objects.add(partner_of(anchor))
    size = rng.choice((2, 3))
    while len(objects) < size:
        objects.add(rng.randrange(len(OBJECTS)))
    named = set(objects)
    lonely = [index for index in sorted(objects) if partner_of(index) not in objects]
    if lonely and rng.random() < P_CAPTION_PARTNER:
        seen = rng.choice(lonely)
        # The caption keeps its length: the prior's object takes the place of one that is there.
        named.remove(rng.choice([index for index in sorted(objects) if index != seen]))
        named.add(partner_of(seen))
    return WorldScene(tuple(sorted(objects)), tuple(sorted(named)))


def caption(objects: tuple[int, ...]) -> str:
    """One sentence per object, in the objects' fixed order: "There is a red circle. There is a blue square."."""
    return " ".join(f"There is a {colour} {shape}." for colour, shape in (OBJECTS[i] for i in objects))


def draw_world_scene(objects: tuple[int, ...], size: int, rng: random.Random) -> Image.Image:
    """The objects in random left-to-right slots at random heights and sizes."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    slots = rng.sample(range(MAX_OBJECTS), len(objects))
    cell = size // MAX_OBJECTS
    for slot, index in zip(slots, objects, strict=True):
        colour, shape = OBJECTS[index]
        radius = rng.randint(cell // 3, cell // 2 - 1)
        cx = slot * cell + cell // 2
        cy = rng.randint(radius, size - radius - 1)
        draw_shape(draw, colour, shape, (cx, cy), radius)
    return image


def world_categories() -> list[dict]:
    return [{"id": number, "name": name, "supercategory": name.split()[-1]}
            for number, name in enumerate(object_names(), start=1)]


def world_rows(count: int, seed: int, image_size: int, split: str) -> tuple[list[dict], dict]:
    """The parquet rows of a split and its COCO-format instances file."""
    rng = random.Random(f"world-{seed}-{split}")
    rows, images, annotations = [], [], []
    for index in range(count):
        scene = random_world_scene(rng)
        buffer = io.BytesIO()
        draw_world_scene(scene.objects, image_size, rng).save(buffer, format="PNG")
        image_path = f"world/{split}/{index:05d}.png"
        rows.append({
            "ds_name": "dama-demo-world",
            "image": {"bytes": buffer.getvalue(), "path": image_path},
            "question": rng.choice(QUESTIONS),
            "chosen": caption(scene.named),
            "rejected": "",
            "origin_dataset": "dama-demo-world",
            "origin_split": split,
            "idx": index,
            "image_path": image_path,
        })
        images.append({"id": index, "file_name": image_path, "width": image_size, "height": image_size})
        annotations += [{"id": len(annotations) + 1, "image_id": index, "category_id": i + 1} for i in scene.objects]
    instances = {"info": {"description": "dama demo world: drawn objects with a co-occurrence prior"},
                 "images": images, "annotations": annotations, "categories": world_categories()}
    return rows, instances


def make_world_data(output_dir: str | Path, counts: dict[str, int], seed: int = 0,
                    image_size: int = 64) -> dict[str, Path]:
    """Writes `<split>.parquet` and `<split>.instances.json` under output_dir for each split in `counts`."""
    output_dir = Path(output_dir)
    paths = {}
    for split, count in counts.items():
        rows, instances = world_rows(count, seed, image_size, split)
        paths[split] = output_dir / f"{split}.parquet"
        write_parquet(rows, paths[split])
        write_json_atomic(instances_path(paths[split]), instances)
    return paths


def world_corpus() -> list[str]:
    """Texts for the tiny tokenizer: the template, the questions and a caption of every object."""
    template = ConversationTemplate()
    return [f"{template.system} {template.user_role}: {template.assistant_role}:", *QUESTIONS,
            *(caption((index, partner_of(index))) for index in range(len(OBJECTS)))] * 4


def world_clip_examples(path: str | Path) -> list[CaptionedImage]:
    """The images of a world split with a true statement per drawn object and a false one per absent object (the
    hard negatives that teach CLIP to score a wrong object below a right one), from the split's instances file."""
    instances = json.loads(instances_path(path).read_text(encoding="utf-8"))
    drawn: dict[int, set[int]] = {}
    for annotation in instances["annotations"]:
        drawn.setdefault(annotation["image_id"], set()).add(annotation["category_id"] - 1)
    examples = []
    for record in load_preference_rows(path):
        pair = PairRow.from_record(record, default_image_folder(path))
        present = drawn.get(pair.idx, set())
        examples.append(CaptionedImage(
            pair.load_image(),
            true=tuple(caption((index,)) for index in sorted(present)),
            false=tuple(caption((index,)) for index in range(len(OBJECTS)) if index not in present)))
    return examples

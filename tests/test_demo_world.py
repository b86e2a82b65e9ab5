"""The demo world: drawn objects match their annotations, the co-occurrence prior holds, and the captions swap in an
absent partner at the rate the world sets (and never any other absent object)."""

import io
import random

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dama.demo.data import COLOURS, instances_path
from dama.demo.world import (
    OBJECTS,
    P_CAPTION_PARTNER,
    make_world_data,
    partner_of,
    random_world_scene,
    world_clip_examples,
)
from dama.evaluation.chair import evaluate_chair


def test_the_world_is_a_function_of_the_seed(tmp_path):
    first = make_world_data(tmp_path / "a", {"train": 6, "eval": 3}, seed=2, image_size=32)
    second = make_world_data(tmp_path / "b", {"train": 6, "eval": 3}, seed=2, image_size=32)
    other = make_world_data(tmp_path / "c", {"train": 6, "eval": 3}, seed=3, image_size=32)
    assert pq.read_table(first["train"]).to_pylist() == pq.read_table(second["train"]).to_pylist()
    assert pq.read_table(first["train"]).to_pylist() != pq.read_table(other["train"]).to_pylist()
    assert pq.read_table(first["eval"]).num_rows == 3


def test_images_hold_the_annotated_objects_and_captions_swap_in_only_absent_partners(tmp_path):
    path = make_world_data(tmp_path, {"train": 60}, seed=0, image_size=64)["train"]
    rows = pq.read_table(path).to_pylist()
    report = evaluate_chair([{"image_id": row["idx"], "response": row["chosen"]} for row in rows],
                            [instances_path(path)])
    assert 0 < report["chair_s"] < 1  # some captions name an absent object, not all
    names = [f"{colour} {shape}" for colour, shape in OBJECTS]
    for row, scored in zip(rows, report["per_response"], strict=True):
        truth = set(scored["ground_truth"])
        partners = {names[partner_of(names.index(name))] for name in truth}
        # A caption names as many objects as the scene holds, at most one of them an absent partner in another's place.
        assert len(scored["mentioned"]) == len(truth) and len(scored["hallucinated"]) <= 1
        assert set(scored["hallucinated"]) <= partners - truth
        colours = {colour for _, colour in Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").getcolors()
                   if colour in COLOURS.values()}
        assert colours == {COLOURS[name.split()[0]] for name in truth}


def test_the_co_occurrence_prior():
    rng = random.Random(0)
    scenes = [random_world_scene(rng) for _ in range(6000)]
    with_partner = [partner_of(i) in scene.objects for scene in scenes for i in scene.objects]
    assert sum(with_partner) / len(with_partner) > 0.4  # partners usually come together (by chance: about 0.2)
    lonely = [scene for scene in scenes if any(partner_of(i) not in scene.objects for i in scene.objects)]
    swapped = [scene.named != scene.objects for scene in lonely]
    assert sum(swapped) / len(swapped) == pytest.approx(P_CAPTION_PARTNER, abs=0.03)
    assert all(len(scene.named) == len(scene.objects) for scene in scenes)


def test_clip_examples_contrast_drawn_and_absent_objects(tmp_path):
    path = make_world_data(tmp_path, {"train": 4}, seed=1, image_size=32)["train"]
    for example in world_clip_examples(path):
        assert len(example.true) + len(example.false) == len(OBJECTS)
        assert example.true and not set(example.true) & set(example.false)

"""The synthetic demo dataset: RLAIF-V columns, decodable images, deterministic, hard and easy pairs."""

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dama.demo.data import COLOURS, instances_path, main, make_demo_data
from dama.demo.hallucination import hallucinated_word_count
from dama.evaluation.chair import evaluate_chair

RLAIF_V_COLUMNS = {"ds_name", "image", "question", "chosen", "rejected", "origin_dataset", "origin_split", "idx",
                   "image_path"}


def test_writes_rlaif_v_parquet_deterministically(tmp_path):
    first = make_demo_data(tmp_path / "a", num_train=12, num_eval=4, seed=3, image_size=32)
    second = make_demo_data(tmp_path / "b", num_train=12, num_eval=4, seed=3, image_size=32)
    other = make_demo_data(tmp_path / "c", num_train=12, num_eval=4, seed=4, image_size=32)
    train = pq.read_table(first["train"]).to_pylist()
    assert set(train[0]) == RLAIF_V_COLUMNS
    assert len(train) == 12 and pq.read_table(first["eval"]).num_rows == 4
    assert train == pq.read_table(second["train"]).to_pylist()
    assert train != pq.read_table(other["train"]).to_pylist()


def test_answers_are_faithful_and_hallucinated(tmp_path):
    rows = pq.read_table(make_demo_data(tmp_path, num_train=30, num_eval=0, image_size=32)["train"]).to_pylist()
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        assert image.size == (32, 32)
        background = next(name for name, rgb in COLOURS.items() if image.getpixel((0, 0)) == rgb)
        assert f"The background is {background}." in row["chosen"]
        assert row["chosen"] != row["rejected"]
    levels = {row["origin_split"].split("/")[1] for row in rows}
    assert levels == {"one_word", "half", "all"}
    one_word = [row for row in rows if row["origin_split"].endswith("one_word")]
    for row in one_word:
        pairs = zip(row["chosen"].split(), row["rejected"].split(), strict=True)
        differing = [a for a, b in pairs if a != b and a not in ("a", "an")]
        assert len(differing) == 1 and differing[0].rstrip(".") in COLOURS


def test_cli_rejects_bad_sizes(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--output-dir", str(tmp_path), "--num-train", "0"])
    assert stop.value.code == 2
    assert "--num-train >= 1" in capsys.readouterr().err


def test_annotation_files_describe_the_scenes(tmp_path):
    """The chosen answers name exactly the annotated objects; rejected answers name objects that are not there."""
    paths = make_demo_data(tmp_path, num_train=24, num_eval=3, image_size=32)
    instances = json.loads(instances_path(paths["train"]).read_text())
    rows = pq.read_table(paths["train"]).to_pylist()
    assert [image["id"] for image in instances["images"]] == [row["idx"] for row in rows]
    assert len(instances["categories"]) == len(COLOURS) * 3
    chosen = evaluate_chair([{"image_id": row["idx"], "response": row["chosen"]} for row in rows],
                            [instances_path(paths["train"])])
    assert chosen["chair_s"] == 0.0 and chosen["recall"] == 1.0
    rejected = evaluate_chair([{"image_id": row["idx"], "response": row["rejected"]} for row in rows],
                              [instances_path(paths["train"])])
    assert rejected["chair_i"] > 0.3
    assert instances_path(paths["eval"]).is_file()


def test_hallucinated_word_count():
    chosen = "The image shows two shapes. There is a red circle on the left. The background is blue."
    assert hallucinated_word_count(chosen, chosen) == 0
    assert hallucinated_word_count(chosen, chosen.replace("a red", "an orange")) == 1
    assert hallucinated_word_count(chosen, chosen.replace("red circle", "green square")) == 2

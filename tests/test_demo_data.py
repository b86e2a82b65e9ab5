"""The synthetic demo dataset: RLAIF-V columns, decodable images, deterministic, hard and easy pairs."""

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dama.demo.data import COLOURS, main, make_demo_data

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

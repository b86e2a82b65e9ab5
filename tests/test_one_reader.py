"""One reader for every step: `dama hardness`, `dama precompute-ref` and `dama train` read the same image for the same
row, with relative paths resolved under the input's folder (not the working directory) unless an image folder is
given."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import dama.data.formats as formats
from dama.demo.data import demo_corpus
from dama.demo.tiny_clip import build_tiny_clip
from dama.demo.tiny_llava import build_tiny_llava
from dama.offline.hardness import HardnessOptions, compute_hardness
from dama.offline.reference import ReferenceOptions, precompute_reference
from dama.training.arguments import parse_training_arguments
from dama.training.train import build_trainer

IMAGES = {"pic.png": (200, 30, 30), "sub/pic.png": (30, 30, 200)}
ROWS = [
    {"question": "What is shown?", "chosen": "A red square.", "rejected": "A green circle.", "image_path": "pic.png"},
    {"question": "What is shown?", "chosen": "A blue square.", "rejected": "A cat.", "image_path": "sub/pic.png"},
]


def _draw(folder: Path, colour_of: dict[str, tuple[int, int, int]]) -> None:
    for name, colour in colour_of.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), colour).save(folder / name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny_llava(demo_corpus(), root / "llava", seed=0)
    return {"llava": root / "llava", "clip": build_tiny_clip(root / "clip")}


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_every_step_reads_the_same_image_for_a_row(kind, models, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    _draw(data, IMAGES)
    # The same relative names in the working directory, in another colour: a reader resolving there is wrong.
    working = tmp_path / "elsewhere"
    working.mkdir()
    _draw(working, dict.fromkeys(IMAGES, (0, 255, 0)))
    monkeypatch.chdir(working)
    if kind == "json":
        source = data / "pairs.json"
        source.write_text(json.dumps(ROWS))
    else:
        source = data / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), source)

    opened: dict[str, list[tuple[str, Path]]] = {}
    decode = formats._decode

    def recording_decode(where, row_id):
        opened.setdefault(step, []).append((row_id, Path(where).resolve()))
        return decode(where, row_id)

    monkeypatch.setattr(formats, "_decode", recording_decode)
    suffix = source.suffix
    step = "hardness"
    compute_hardness(HardnessOptions(input=source, output=tmp_path / f"scored{suffix}", clip=models["clip"],
                                     batch_size=2, device="cpu"))
    step = "precompute-ref"
    precompute_reference(ReferenceOptions(input=source, output=tmp_path / f"ref{suffix}", model=models["llava"],
                                          batch_size=2, device="cpu"))
    step = "train"
    trainer = build_trainer(parse_training_arguments([
        "--output_dir", str(tmp_path / "run"), "--model_name_or_path", str(models["llava"]),
        "--train_file", str(source), "--reference", "online", "--data_aware", "false", "--use_cpu", "true",
        "--report_to", "none",
    ]))
    for index in range(len(trainer.train_dataset)):
        trainer.train_dataset[index]

    expected = sorted((f"{source.name}:{n}", (data / row["image_path"]).resolve()) for n, row in enumerate(ROWS))
    assert {name: sorted(set(reads)) for name, reads in opened.items()} == {
        "hardness": expected, "precompute-ref": expected, "train": expected,
    }


def test_a_given_image_folder_wins_and_a_relative_path_needs_a_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _draw(folder, {"pic.png": (1, 2, 3)})
    image = formats.open_row_image(None, "pic.png", folder, "x:0")
    assert image.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="row x:0: its image path pic.png is relative and no image folder"):
        formats.open_row_image(None, "pic.png", None, "x:0")
    with pytest.raises(ValueError, match="row x:1 has no image"):
        formats.open_row_image(None, None, folder, "x:1")

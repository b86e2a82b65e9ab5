"""Data: the LLaVA-1.5 template, the exact supervision boundary, CLIP image processing, both input formats,
reference log-probs and hardness columns, the over-long policy; and the tiny LLaVA builders the tests rely on."""

import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dama.data.batch import IGNORE_INDEX
from dama.data.dataset import (
    ConversationTemplate,
    PairEncoder,
    PreferenceDataset,
    num_image_tokens,
)
from dama.data.formats import load_preference_rows
from dama.demo.data import demo_corpus, make_rows
from dama.demo.tiny_llava import build_tiny_llava, build_tiny_processor, tiny_llava_config, train_tiny_tokenizer
from dama.model.loading import load_llava


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(train_tiny_tokenizer(demo_corpus()))


@pytest.fixture(scope="module")
def demo_rows():
    return make_rows(6, seed=5, image_size=40, split="train")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_parquet(rows, path):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _dataset(tmp_path, rows, processor, name="train.parquet", **options):
    path = _write_parquet(rows, tmp_path / name)
    return PreferenceDataset.from_path(path, processor, cache_dir=tmp_path / "cache", **options)


def test_template_prompt_response_boundary_and_labels(tmp_path, processor, demo_rows):
    dataset = _dataset(tmp_path, demo_rows, processor)
    tokenizer, image_id = processor.tokenizer, processor.image_token_id
    assert len(dataset) == 6 and dataset.num_skipped == 0
    for index, row in enumerate(demo_rows):
        example = dataset[index]
        assert example.row_id == f"train.parquet:{index}"
        ids, labels, cut = example.chosen_input_ids, example.chosen_labels, example.prompt_length
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        image_positions = (ids == image_id).nonzero().squeeze(1)
        assert image_positions.numel() == num_image_tokens(processor) == 16
        assert image_positions.tolist() == list(range(image_positions[0], image_positions[0] + 16))

        # The separately tokenized prompt and response are exactly the tokens of the whole conversation.
        text = ConversationTemplate().prompt(row["question"], "<image>") + f" {row['chosen']}</s>"
        whole = tokenizer(text)["input_ids"]
        slot = whole.index(image_id)
        whole = whole[:slot] + [image_id] * 16 + whole[slot + 1:]
        assert ids.tolist() == whole
        assert tokenizer.decode(ids[cut:]) == f" {row['chosen']}</s>"
        assert tokenizer.decode(ids[:cut]).endswith(f"\n{row['question']} ASSISTANT:")
        assert tokenizer.decode(ids[1:cut]).startswith("A chat between a curious user and an artificial")

        assert bool((labels[:cut] == IGNORE_INDEX).all())
        assert torch.equal(labels[cut:], ids[cut:])
        assert torch.equal(example.rejected_input_ids[:cut], ids[:cut])
        assert tokenizer.decode(example.rejected_input_ids[cut:]) == f" {row['rejected']}</s>"
        assert dataset.pair_lengths[index] == ids.numel() + example.rejected_input_ids.numel()


def test_image_token_in_question_is_not_duplicated(processor):
    encoder = PairEncoder(processor)
    plain, tagged = encoder.encode_prompts(["What is shown?", "<image>\nWhat is shown?"])
    assert plain == tagged


def test_clip_processing_resizes_shortest_side_and_centre_crops(tmp_path, processor, demo_rows):
    # 64 x 32: the shortest side is already 32, so the centre crop keeps columns 16-47, all green.
    image = Image.new("RGB", (64, 32), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 16, 32))
    image.paste((0, 0, 255), (48, 0, 64, 32))
    rows = [dict(demo_rows[0], image={"bytes": _png(image), "path": None})]
    dataset = _dataset(tmp_path, rows, processor)
    pixels = dataset[0].pixel_values
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    mean, std = processor.image_processor.image_mean, processor.image_processor.image_std
    green = torch.tensor([(c - m) / s for c, m, s in zip((0.0, 1.0, 0.0), mean, std, strict=True)])
    torch.testing.assert_close(pixels, green[:, None, None].expand(3, 32, 32), atol=1e-2, rtol=0)

    # A larger non-square image goes through the processor unchanged in meaning: same tensor as calling it.
    large = Image.open(io.BytesIO(demo_rows[1]["image"]["bytes"])).convert("RGB").resize((90, 60))
    rows = [dict(demo_rows[1], image={"bytes": _png(large), "path": None})]
    dataset = _dataset(tmp_path, rows, processor, name="large.parquet")
    expected = processor.image_processor(images=large, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(dataset[0].pixel_values, expected)



def test_pad_aspect_ratio_expands_to_a_square_of_llavas_mean_colour(tmp_path, processor, demo_rows):
    # 40 x 20, all red: "pad" centres it on a 40 x 40 square filled with int(255 * CLIP mean) =
    # (int(122.77), int(116.75), int(104.09)) = (122, 116, 104), worked out by hand from the CLIP mean.
    assert processor.image_processor.image_mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = Image.new("RGB", (40, 40), (122, 116, 104))
    square.paste(image, (0, 10))
    rows = [dict(demo_rows[0], image={"bytes": _png(image), "path": None})]
    padded = _dataset(tmp_path, rows, processor, image_aspect_ratio="pad")[0].pixel_values
    torch.testing.assert_close(padded, processor.image_processor(images=square, return_tensors="pt")["pixel_values"][0])
    cropped = _dataset(tmp_path, rows, processor, name="crop.parquet")[0].pixel_values
    torch.testing.assert_close(cropped, processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0])
    with pytest.raises(ValueError, match="image_aspect_ratio must be one of"):
        _dataset(tmp_path, rows, processor, name="bad.parquet", image_aspect_ratio="stretch")


def _token_counts(processor, rows):
    encoder = PairEncoder(processor)
    chosen = encoder.encode_responses([r["chosen"] for r in rows])
    rejected = encoder.encode_responses([r["rejected"] for r in rows])
    return [len(c) for c in chosen], [len(r) for r in rejected]


def test_authors_json_format_with_logps_in_every_form_and_hardness_from_logits(tmp_path, processor, demo_rows):
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for number, row in enumerate(demo_rows[:4]):
        (images / f"{number}.png").write_bytes(row["image"]["bytes"])
        records.append({key: row[key] for key in ("question", "chosen", "rejected", "idx", "origin_dataset")}
                       | {"image_path": f"{number}.png"})
    chosen_counts, rejected_counts = _token_counts(processor, records)
    # The per-supervised-token layout, as a plain list, as its JSON text and as RLAIF-V's {"logps": [...]} text.
    records[0]["logps"] = [-10.0, -0.5, [-0.5] * chosen_counts[0], -20.0, -0.25, [-0.25] * rejected_counts[0]]
    records[1]["logps"] = json.dumps([-3.0, -0.1, [-0.1] * chosen_counts[1], -4.0, -0.2, [-0.2] * rejected_counts[1]])
    records[2]["logps"] = json.dumps({"logps": [-5.0, None, [0.0] * chosen_counts[2], -6.0, None,
                                                [0.0] * rejected_counts[2]]})
    # The authors' text columns of CLIP scores: delta = sum(chosen) - sum(rejected) without a hardness column.
    records[0]["chosen_logits"], records[0]["rejected_logits"] = json.dumps([0.25, 0.5]), json.dumps([0.125])
    records[1] |= {"chosen_logits": [0.5], "rejected_logits": [0.25, 0.125], "hardness": 0.75}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))

    dataset = PreferenceDataset.from_path(path, processor, image_folder=images)
    assert len(dataset) == 4 and not dataset.has_reference_logps
    first, second, third, fourth = (dataset[i] for i in range(4))
    assert (first.ref_chosen_logps, first.ref_chosen_mean_logps) == (-10.0, -0.5)
    assert (first.ref_rejected_logps, first.ref_rejected_mean_logps) == (-20.0, -0.25)
    assert (second.ref_chosen_logps, second.ref_rejected_mean_logps) == (-3.0, -0.2)
    assert third.ref_rejected_logps == -6.0 and third.ref_chosen_mean_logps == pytest.approx(-5.0 / chosen_counts[2])
    assert math.isnan(fourth.ref_chosen_logps) and math.isnan(fourth.ref_rejected_mean_logps)
    assert first.hardness == 0.25 + 0.5 - 0.125 and second.hardness == 0.75 and math.isnan(third.hardness)
    assert dataset.num_with_hardness == 2 and dataset.hardness_mean == pytest.approx((0.625 + 0.75) / 2)
    assert first.row_id == "pairs.json:0" and fourth.row_id == "pairs.json:3"
    expected = processor.image_processor(images=Image.open(images / "3.png").convert("RGB"),
                                         return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(fourth.pixel_values, expected)

    def refused(logps, match):
        path.write_text(json.dumps([dict(records[0], logps=logps)]))
        with pytest.raises(ValueError, match=match):
            PreferenceDataset.from_path(path, processor, image_folder=images)

    refused([-1.0, -0.5, [-0.5] * (chosen_counts[0] - 1), -2.0, -1.0, None],
            r"pairs.json:0: the chosen reference log-probs in `logps` have \d+ per-token values.*dama precompute-ref")
    refused([-1.0, -0.5, None, -2.0, -1.0, None], "no per-token list")
    refused([-1.0, -2.0], "got 2 entries")
    refused({"values": []}, "without a 'logps' key")


def _whole_sequence_logps(dataset, index, seed):
    """Reference values in the authors' layout for pair `index`: a value for every position but the last, filler
    outside the response, and the sum of the response's values in the sum slot."""
    generator = torch.Generator().manual_seed(seed)
    slots = []
    for input_ids, labels in dataset.sequences(index):
        values = (-torch.rand(input_ids.numel() - 1, generator=generator, dtype=torch.float64)).tolist()
        response = values[int((labels == IGNORE_INDEX).sum()) - 1:]
        slots += [math.fsum(response), math.fsum(response) / len(response), values]
    return slots


def test_whole_sequence_logps_of_the_authors_are_used_only_when_they_fit(tmp_path, processor, demo_rows):
    plain = _dataset(tmp_path, demo_rows[:2], processor, name="plain.parquet")
    rows = [dict(row, logps=json.dumps({"logps": _whole_sequence_logps(plain, i, seed=i)}))
            for i, row in enumerate(demo_rows[:2])]
    dataset = _dataset(tmp_path, rows, processor, name="authors.parquet")
    assert dataset.has_reference_logps
    for index in range(2):
        total, mean, _, rejected_total, _, _ = json.loads(rows[index]["logps"])["logps"]
        assert (dataset[index].ref_chosen_logps, dataset[index].ref_chosen_mean_logps) == (total, mean)
        assert dataset[index].ref_rejected_logps == rejected_total

    # Whole-sequence values that fit another template's lengths are still refused: the authors' code used LLaVA's.
    other = ConversationTemplate(system="Hi.")
    other_plain = _dataset(tmp_path, demo_rows[:1], processor, name="other.parquet", template=other)
    other_rows = [dict(demo_rows[0], logps=json.dumps(_whole_sequence_logps(other_plain, 0, seed=3)))]
    with pytest.raises(ValueError, match="LLaVA-1.5's own conversation template"):
        _dataset(tmp_path, other_rows, processor, name="other_ref.parquet", template=other)
    # With the boundary one token off, the response's values do not add up to the stored sum.
    shifted = json.loads(rows[0]["logps"])["logps"]
    shifted[2] = shifted[2][1:] + [-1.0]
    with pytest.raises(ValueError, match="add up to .* not the stored sum"):
        _dataset(tmp_path, [dict(rows[0], logps=json.dumps(shifted))], processor, name="shifted.parquet")


def test_reference_values_of_another_encoding_are_refused(tmp_path, processor, demo_rows):
    rows = [dict(r, ref_chosen_logps=-1.0, ref_rejected_logps=-2.0) for r in demo_rows[:2]]
    path = _write_parquet(rows, tmp_path / "ref.parquet")
    signature = PairEncoder(processor).signature
    assert signature == PairEncoder(processor).signature
    assert signature != PairEncoder(processor, ConversationTemplate(system="Another system text.")).signature
    (tmp_path / "ref.parquet.meta.json").write_text(json.dumps({"encoding": signature, "image_aspect_ratio": "crop"}))
    assert PreferenceDataset.from_path(path, processor, cache_dir=tmp_path / "cache").has_reference_logps
    with pytest.raises(ValueError, match="another template or tokenizer"):
        PreferenceDataset.from_path(path, processor, cache_dir=tmp_path / "cache",
                                    template=ConversationTemplate(system="Another system text."))
    with pytest.raises(ValueError, match="image_aspect_ratio='crop'"):
        PreferenceDataset.from_path(path, processor, cache_dir=tmp_path / "cache", image_aspect_ratio="pad")


def test_select_keeps_matching_rows_with_their_ids(tmp_path, processor, demo_rows):
    rows = [dict(r, origin_split=json.dumps({"model": model, "type": "qa"}), ds_name=name)
            for r, model, name in zip(demo_rows, ["llava15_7b", "OmniLMM-12B", "LLaVA-1.5-7B", "llava15_7b",
                                                  "MiniCPM-Llama3-V", "x"], "aabbab", strict=True)]
    path = _write_parquet(rows, tmp_path / "all.parquet")
    cache = tmp_path / "cache"
    assert load_preference_rows(path, cache_dir=cache, select=["origin_split.model=llava15_7b"])["row_id"] == [
        "all.parquet:0", "all.parquet:3"]
    assert load_preference_rows(path, cache_dir=cache, select=["origin_split.model~LLAVA"])["row_id"] == [
        "all.parquet:0", "all.parquet:2", "all.parquet:3"]
    assert load_preference_rows(path, cache_dir=cache, select=["origin_split.model~llava", "ds_name=b"],
                                limit=1)["row_id"] == ["all.parquet:2"]
    with pytest.raises(ValueError, match=r"values found: origin_split.model: 'llava15_7b' \(2\), "):
        load_preference_rows(path, cache_dir=cache, select=["origin_split.model=llava"])
    with pytest.raises(ValueError, match="has no column 'split'"):
        load_preference_rows(path, cache_dir=cache, select=["split=x"])
    with pytest.raises(ValueError, match="write KEY=VALUE or KEY~VALUE"):
        load_preference_rows(path, cache_dir=cache, select=["origin_split"])
    dataset = PreferenceDataset.from_path(path, processor, cache_dir=cache, select=["ds_name=b"])
    assert [dataset.row_id(i) for i in range(len(dataset))] == ["all.parquet:2", "all.parquet:3", "all.parquet:5"]


def test_project_reference_columns_win_and_means_default_to_sum_over_tokens(tmp_path, processor, demo_rows):
    rows = [dict(r) for r in demo_rows[:2]]
    chosen_counts, rejected_counts = _token_counts(processor, rows)
    rows[0] |= {"ref_chosen_logps": -6.0, "ref_rejected_logps": -9.0, "logps": json.dumps([1, 1, [], 1, 1, []]),
                "hardness": -0.5}
    rows[1] |= {"ref_chosen_logps": None, "ref_rejected_logps": None, "logps": None, "hardness": None}
    dataset = _dataset(tmp_path, rows, processor)
    first, second = dataset[0], dataset[1]
    assert (first.ref_chosen_logps, first.ref_rejected_logps) == (-6.0, -9.0)
    assert first.ref_chosen_mean_logps == pytest.approx(-6.0 / chosen_counts[0])
    assert first.ref_rejected_mean_logps == pytest.approx(-9.0 / rejected_counts[0])
    assert first.hardness == -0.5
    assert math.isnan(second.ref_chosen_logps) and math.isnan(second.hardness)


def test_overlong_pairs_are_an_error_or_a_counted_skip(tmp_path, processor, demo_rows):
    lengths = _dataset(tmp_path, demo_rows, processor).pair_lengths
    prompt = len(PairEncoder(processor).encode_prompts([demo_rows[0]["question"]])[0])
    # Each pair's longest sequence; a budget between the shortest and the longest splits the pairs.
    longest = [prompt + max(n) for n in zip(*_token_counts(processor, demo_rows), strict=True)]
    assert len(set(longest)) > 1, "the demo rows should differ in length"
    limit = sorted(longest)[len(longest) // 2 - 1]
    with pytest.raises(ValueError, match=r"> max_length=\d+\. Responses are never truncated"):
        _dataset(tmp_path, demo_rows, processor, max_length=limit)
    dataset = _dataset(tmp_path, demo_rows, processor, max_length=limit, overlong="skip")
    kept = [i for i, n in enumerate(longest) if n <= limit]
    assert len(dataset) == len(kept) and dataset.num_skipped == len(demo_rows) - len(kept)
    assert dataset.skipped_row_ids == [f"train.parquet:{i}" for i, n in enumerate(longest) if n > limit]
    assert [dataset[i].row_id for i in range(len(dataset))] == [f"train.parquet:{i}" for i in kept]
    assert dataset.pair_lengths == [lengths[i] for i in kept]


def test_folder_of_shards_and_images_by_path(tmp_path, processor, demo_rows):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "pics").mkdir()
    (shards / "pics" / "x.png").write_bytes(demo_rows[0]["image"]["bytes"])
    by_path = dict(demo_rows[0], image={"bytes": None, "path": "pics/x.png"})
    _write_parquet([by_path, demo_rows[1]], shards / "b.parquet")
    _write_parquet([demo_rows[2]], shards / "a.parquet")
    rows = load_preference_rows(shards, cache_dir=tmp_path / "cache")
    assert rows["row_id"] == ["a.parquet:0", "b.parquet:0", "b.parquet:1"]
    assert load_preference_rows(shards, cache_dir=tmp_path / "cache", limit=2).num_rows == 2
    dataset = PreferenceDataset.from_path(shards, processor, cache_dir=tmp_path / "cache")
    expected = processor.image_processor(images=Image.open(shards / "pics" / "x.png").convert("RGB"),
                                         return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(dataset[1].pixel_values, expected)


def test_bad_images_and_options_raise_helpful_errors(tmp_path, processor, demo_rows):
    rows = [dict(demo_rows[0], image={"bytes": None, "path": None}, image_path=None),
            dict(demo_rows[1], image={"bytes": b"not a png", "path": None})]
    dataset = _dataset(tmp_path, rows, processor)
    with pytest.raises(ValueError, match=r"row train.parquet:0 has no image"):
        dataset[0]
    with pytest.raises(ValueError, match=r"row train.parquet:1: cannot read its image"):
        dataset[1]
    with pytest.raises(ValueError, match="overlong must be one of"):
        _dataset(tmp_path, demo_rows, processor, overlong="truncate")
    no_question = [{k: v for k, v in r.items() if k != "question"} for r in demo_rows]
    with pytest.raises(ValueError, match=r"lacks the columns \['question'\]"):
        load_preference_rows(_write_parquet(no_question, tmp_path / "bad.parquet"), cache_dir=tmp_path / "cache")


def test_tiny_llava_saves_and_loads_offline(tmp_path, processor):
    config = tiny_llava_config(processor)
    assert config.image_seq_length == num_image_tokens(processor)
    assert config.image_token_id == processor.image_token_id
    assert config.text_config.num_key_value_heads < config.text_config.num_attention_heads
    model, built = build_tiny_llava(demo_corpus(), tmp_path / "tiny", seed=3)
    loaded, loaded_processor = load_llava(tmp_path / "tiny")
    text = "USER: <image>\nWhat is shown? ASSISTANT: a red circle"
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    inputs = loaded_processor(images=image, text=text, return_tensors="pt")
    assert inputs["input_ids"].tolist() == built(images=image, text=text, return_tensors="pt")["input_ids"].tolist()
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == config.image_seq_length
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
    with pytest.raises(ValueError, match="holds no config.json"):
        load_llava(tmp_path / "missing")

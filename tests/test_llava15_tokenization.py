"""LLaVA-1.5's own tokenization with the real Llama 2 vocabulary, on a checkpoint shaped like llava-1.5-7b-hf.

The expected ids are worked out by hand: the text is cut into SentencePiece pieces here, in the test, and each piece
is looked up in the vocabulary file; nothing calls the encoder under test to make them. They are the ids LLaVA-1.5's
training code (`tokenizer_image_token` with the legacy SentencePiece tokenizer) gives the same conversation.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dama.cli import main
from dama.data.batch import IGNORE_INDEX
from dama.data.dataset import VICUNA_V1_SYSTEM, ConversationTemplate, PairEncoder, PreferenceDataset
from dama.model.loading import load_llava, load_processor
from tests.llava15_shaped import FIXTURE, IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS, PAD_TOKEN_ID, llama2_vocabulary

# "{system} USER: " then "\n{question} ASSISTANT:", piece by piece ("▁" marks a word start, <0x0A> is "\n").
SYSTEM_PIECES = ["▁A", "▁chat", "▁between", "▁a", "▁curious", "▁user", "▁and", "▁an", "▁artificial", "▁intelligence",
                 "▁assistant", ".", "▁The", "▁assistant", "▁gives", "▁helpful", ",", "▁detailed", ",", "▁and", "▁pol",
                 "ite", "▁answers", "▁to", "▁the", "▁user", "'", "s", "▁questions", "."]
# The call on the text before the image ends with the space before "<image>": a bare "▁".
BEFORE_IMAGE = [*SYSTEM_PIECES, "▁US", "ER", ":", "▁"]
# The call on the text after the image starts with SentencePiece's word-boundary prefix, "▁", then the newline.
AFTER_IMAGE = ["▁", "<0x0A>", "What", "▁is", "▁in", "▁the", "▁image", "?", "▁A", "SS", "IST", "ANT", ":"]
QUESTION, CHOSEN, REJECTED = "What is in the image?", "A cat.", "A dog."
CHOSEN_PIECES, REJECTED_PIECES = ["▁A", "▁cat", ".", "</s>"], ["▁A", "▁dog", ".", "</s>"]


def _ids(pieces: list[str]) -> list[int]:
    vocabulary = llama2_vocabulary()
    return [vocabulary[piece] for piece in pieces]


def _png(size=(500, 375)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 140, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    row = {"ds_name": "RLAIF-V-Dataset", "image": {"bytes": _png(), "path": "0.png"}, "question": QUESTION,
           "chosen": CHOSEN, "rejected": REJECTED, "origin_dataset": "test",
           "origin_split": json.dumps({"model": "llava15_7b", "type": "question_answering"}), "idx": "0",
           "image_path": "0.png"}
    pq.write_table(pa.Table.from_pylist([row]), path)
    return path


def test_the_fixture_vocabulary_is_llama2s(llava15_checkpoint):
    """The fixture tokenizer gives the original SentencePiece ids for every reference string without a leading space
    (with one, the original's legacy mode adds another prefix piece: never the case in LLaVA's prompt chunks)."""
    tokenizer = load_processor(llava15_checkpoint).tokenizer
    strings = (FIXTURE / "reference_strings.txt").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (FIXTURE / "reference_ids.txt").read_text(encoding="utf-8").split("\n")
    checked = 0
    for text, ids in zip(strings, expected, strict=False):
        if text and not text.startswith(" "):
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == [int(i) for i in ids.split()], text
            checked += 1
    assert checked >= 25
    assert len(tokenizer) == 32002 and tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]


def test_the_checkpoint_has_llava15s_shape(llava15_checkpoint):
    model, processor = load_llava(llava15_checkpoint)
    config = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert (config.image_token_index, config.pad_token_id, config.text_config.vocab_size) == (32000, 32001, 32064)
    assert (config.text_config.rms_norm_eps, config.text_config.max_position_embeddings) == (1e-5, 4096)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.projector_hidden_act == "gelu"
    tokenizer_config = json.loads((llava15_checkpoint / "tokenizer_config.json").read_text())
    assert tokenizer_config["legacy"] is False
    image_processor = processor.image_processor
    assert (image_processor.size, image_processor.crop_size) == ({"shortest_edge": 336}, {"height": 336, "width": 336})
    assert (processor.patch_size, processor.num_additional_image_tokens) == (14, 1)


def test_a_pair_gets_llava15s_ids_worked_out_from_the_vocabulary(llava15_checkpoint, pair_file):
    processor = load_processor(llava15_checkpoint)
    dataset = PreferenceDataset.from_path(pair_file, processor)
    prompt = [1, *_ids(BEFORE_IMAGE), *[IMAGE_TOKEN_INDEX] * NUM_IMAGE_TOKENS, *_ids(AFTER_IMAGE)]
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = dataset.sequences(0)
    assert chosen_ids.tolist() == prompt + _ids(CHOSEN_PIECES)
    assert rejected_ids.tolist() == prompt + _ids(REJECTED_PIECES)
    assert chosen_labels.tolist() == [IGNORE_INDEX] * len(prompt) + _ids(CHOSEN_PIECES)
    assert rejected_labels.tolist() == [IGNORE_INDEX] * len(prompt) + _ids(REJECTED_PIECES)
    # Why the prompt is tokenized in two calls: one call over the whole prompt loses the 29871 after the image.
    whole = processor.tokenizer(ConversationTemplate().prompt(QUESTION, "<image>"), add_special_tokens=False)
    after_image = whole["input_ids"][whole["input_ids"].index(IMAGE_TOKEN_INDEX) + 1:]
    assert after_image == _ids(AFTER_IMAGE[1:])


def test_show_example_json_on_the_llava15_checkpoint(llava15_checkpoint, pair_file, capsys):
    assert main(["show-example", "--model", str(llava15_checkpoint), "--input", str(pair_file), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    prompt = shown["prompt_ids"]
    first_image = prompt.index(IMAGE_TOKEN_INDEX)
    assert prompt[0] == 1 and shown["num_image_tokens"] == 576
    assert prompt[first_image:first_image + 576] == [IMAGE_TOKEN_INDEX] * 576
    assert prompt[first_image + 576:first_image + 578] == [29871, 13]
    for side, pieces in (("chosen", CHOSEN_PIECES), ("rejected", REJECTED_PIECES)):
        assert shown[side]["input_ids"] == prompt + _ids(pieces)
        assert shown[side]["labels"] == [IGNORE_INDEX] * len(prompt) + _ids(pieces)
    assert PAD_TOKEN_ID not in prompt

    assert main(["show-example", "--model", str(llava15_checkpoint), "--input", str(pair_file)]) == 0
    text = capsys.readouterr().out
    assert "576 of them image tokens" in text and "[32000 x 576] 29871 13 5618" in text
    assert "ASSISTANT:⟦ A cat.</s>⟧" in text and "4 supervised tokens" in text
    assert "A chat between a curious user" in text


def test_show_example_reads_a_config_and_reports_bad_input(llava15_checkpoint, pair_file, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {llava15_checkpoint}\ntrain_file: {pair_file}\n"
                      "system_prompt: A chat between a curious human and an artificial intelligence assistant.\n")
    assert main(["show-example", "--config", str(config), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["prompt_ids"][1:7] == _ids(["▁A", "▁chat", "▁between", "▁a", "▁curious", "▁human"])
    assert main(["show-example", "--config", str(config), "--index", "3"]) == 1
    assert "dama show-example: error:" in capsys.readouterr().err
    assert main(["show-example", "--input", str(pair_file)]) == 1
    assert "give --config with model_name_or_path and train_file, or --model and --input" in capsys.readouterr().err


def test_the_signature_tells_llava15s_template_from_llava_v1s(llava15_checkpoint):
    processor = load_processor(llava15_checkpoint)
    vicuna = PairEncoder(processor)
    llava_v1 = PairEncoder(processor, ConversationTemplate(system=VICUNA_V1_SYSTEM.replace("user", "human")))
    assert vicuna.signature != llava_v1.signature

"""`dama generate --num-beams`: the beams kept against a plain beam search written here (whole forward passes, no
cache, one prompt at a time), the batch not changing an answer, the preset, and errors."""

import json

import pytest
import torch
from PIL import Image

from dama.cli import main
from dama.demo.data import demo_corpus
from dama.demo.tiny_llava import build_tiny_llava
from dama.evaluation.generate import DecodingSettings, ResponseGenerator, load_generation_model

QUESTIONS = ("Describe the image.", "What is shown in this picture?", "What colour is it?")
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))
STEPS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("beams")
    build_tiny_llava(demo_corpus(), root / "model", seed=5)
    model, processor = load_generation_model(root / "model", "float32", "cpu")
    images = [Image.new("RGB", (40, 40), colour) for colour in COLOURS]
    return root, model, processor, images


def reference_beam_search(model, input_ids, pixel_values, num_beams, steps, eos_id):
    """The num_beams best continuations by summed log-probability, extended one token at a time from full forward
    passes. Returns the best after `steps` tokens and its score; asserts that the end token never ranked among the
    2 * num_beams candidates, where finished hypotheses would need the length-normalised bookkeeping."""
    beams = [(input_ids[0].tolist(), 0.0)]
    for _ in range(steps):
        rows = torch.tensor([tokens for tokens, _ in beams])
        logits = model(input_ids=rows, pixel_values=pixel_values.expand(len(beams), -1, -1, -1)).logits[:, -1]
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        candidates = [(score + log_probs[row, token].item(), row, token) for row, (_, score) in enumerate(beams)
                      for token in range(log_probs.shape[1])]
        candidates.sort(key=lambda candidate: -candidate[0])
        assert eos_id not in [token for _, _, token in candidates[:2 * num_beams]], "pick another seed or prompt"
        beams = [(beams[row][0] + [token], score) for score, row, token in candidates[:num_beams]]
    return beams[0][0][input_ids.shape[1]:], beams[0][1]


@torch.no_grad()
def test_beams_match_a_plain_beam_search(tiny):
    _, model, processor, images = tiny
    greedy = ResponseGenerator(model, processor, DecodingSettings(max_new_tokens=STEPS))
    searched = ResponseGenerator(model, processor, DecodingSettings(max_new_tokens=STEPS, num_beams=3))
    tokenizer = processor.tokenizer
    found_better = False
    for question, image in zip(QUESTIONS, images, strict=True):
        input_ids, _ = searched.left_padded([question])
        pixel_values = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        expected, score = reference_beam_search(model, input_ids, pixel_values, 3, STEPS, tokenizer.eos_token_id)
        assert searched([question], [image])[0] == tokenizer.decode(expected, skip_special_tokens=True).strip()
        # One beam is greedy decoding; three find a continuation at least as probable.
        greedy_ids, greedy_score = reference_beam_search(model, input_ids, pixel_values, 1, STEPS,
                                                         tokenizer.eos_token_id)
        assert greedy([question], [image])[0] == tokenizer.decode(greedy_ids, skip_special_tokens=True).strip()
        assert score >= greedy_score - 1e-6
        found_better |= score > greedy_score + 1e-6
    assert found_better, "beam search never beat greedy decoding here: the check above would not catch a no-op"


@torch.no_grad()
def test_batched_beams_equal_one_at_a_time(tiny):
    _, model, processor, images = tiny
    searched = ResponseGenerator(model, processor, DecodingSettings(max_new_tokens=STEPS, num_beams=3))
    alone = [searched([question], [image])[0] for question, image in zip(QUESTIONS, images, strict=True)]
    assert searched(list(QUESTIONS), images) == alone
    one_beam = ResponseGenerator(model, processor, DecodingSettings(max_new_tokens=STEPS, num_beams=1))
    greedy = ResponseGenerator(model, processor, DecodingSettings(max_new_tokens=STEPS))
    assert one_beam(list(QUESTIONS), images) == greedy(list(QUESTIONS), images)


def test_preset_and_options(tiny, tmp_path, capsys, monkeypatch):
    root, _, _, images = tiny
    images[0].save(tmp_path / "a.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"image": "a.png", "question": QUESTIONS[0], "image_id": 1}) + "\n")
    seen = []
    monkeypatch.setattr("dama.evaluation.generate.generate_responses",
                        lambda options, decoding: seen.append(decoding) or {"count": 1, "resumed": 0,
                                                                           "dtype": "float32", "device": "cpu"})
    base = ["generate", "--model", str(root / "model"), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")]
    assert main([*base, "--preset", "object-halbench"]) == 0
    assert main([*base, "--preset", "object-halbench", "--max-new-tokens", "8"]) == 0
    assert "beam search (3 beams)" in capsys.readouterr().out
    assert [(d.num_beams, d.max_new_tokens, d.sample) for d in seen] == [(3, 1024, False), (3, 8, False)]


@pytest.mark.parametrize("options, message", [
    (["--num-beams", "0"], "--num-beams must be at least 1"),
    (["--num-beams", "2", "--sample"], "drop --sample"),
])
def test_errors(tiny, tmp_path, capsys, options, message):
    root = tiny[0]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"image": "a.png", "question": "What?"}) + "\n")
    code = main(["generate", "--model", str(root / "model"), "--input", str(prompts), "--output",
                 str(tmp_path / "o.jsonl"), *options])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and error.startswith("dama generate: error:") and message in error, error

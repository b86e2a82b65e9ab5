"""Checks that keep the end-to-end benchmark honest, on a tiny shape (seconds).

Run: .venv/bin/python -m pytest bench/test_end_to_end.py. The two providers must compute the same training step (loss
and gradients) from the same weights and data, only laid out differently: packed + fused head against padded + full
logits with an image per sequence. Else the benchmark would compare two different computations.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench.end_to_end import (
    BASELINE,
    PROVIDERS,
    Shape,
    add_ratios_and_targets,
    build_setup,
    format_table,
    forward_backward,
    micro_batches,
    run_provider,
    synthetic_pair,
    write_chart,
)
from dama.data.batch import IGNORE_INDEX, PackedBatch, PaddedBatch

# 28 px in 14 px patches: 4 image tokens; short responses, so that a step takes milliseconds.
TINY = Shape(num_pairs=3, hidden_size=32, num_layers=2, steps=2, warmup=1, vocab_size=503, image_size=28,
             patch_size=14, vision_hidden_size=16, response_mean=12)


def test_default_shape_is_llava_15() -> None:
    shape = Shape()
    assert (shape.num_image_tokens, shape.vocab_size) == (576, 32000)
    example = synthetic_pair(shape, torch.Generator().manual_seed(0), "synthetic:0")
    for ids, labels in ((example.chosen_input_ids, example.chosen_labels),
                        (example.rejected_input_ids, example.rejected_labels)):
        assert int((ids == shape.image_token_id).sum()) == 576
        assert bool((labels[: example.prompt_length] == IGNORE_INDEX).all())
        assert torch.equal(labels[example.prompt_length:], ids[example.prompt_length:])
        assert ids[0] == 1 and ids[-1] == 2
        assert 40 <= example.prompt_length - 576 <= 80


def test_providers_compute_the_same_step() -> None:
    examples = micro_batches(TINY)[0]
    setups = {provider: build_setup(provider, TINY) for provider in PROVIDERS}
    batches = {provider: setup.collate(examples) for provider, setup in setups.items()}

    # The layouts really differ: packed without padding vs padded with one image per sequence.
    packed, padded = batches["dama"], batches[BASELINE]
    assert isinstance(packed, PackedBatch) and isinstance(padded, PaddedBatch)
    assert padded.input_ids.numel() > packed.input_ids.numel()
    assert (packed.pixel_values.shape[0], padded.pixel_values.shape[0]) == (TINY.num_pairs, 2 * TINY.num_pairs)
    text_config = {p: s.policy.llava.config.text_config._attn_implementation for p, s in setups.items()}
    assert text_config == {"dama": "dama_packed", BASELINE: "sdpa"}
    assert (setups["dama"].policy.head_kind, setups[BASELINE].policy.head_kind) == ("fused", "full_logits")

    results = {provider: forward_backward(setup, batches[provider]) for provider, setup in setups.items()}
    ours, theirs = results["dama"], results[BASELINE]
    torch.testing.assert_close(ours.losses, theirs.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.mask, theirs.mask)
    ours_params = dict(setups["dama"].policy.llava.named_parameters())
    theirs_params = dict(setups[BASELINE].policy.llava.named_parameters())
    assert ours_params.keys() == theirs_params.keys()
    checked = 0
    for name, param in ours_params.items():
        other = theirs_params[name]
        assert torch.equal(param, other), f"{name}: the providers start from different weights"
        if not param.requires_grad:
            assert param.grad is None and other.grad is None
            continue
        assert param.grad is not None and other.grad is not None, f"{name}: no gradient"
        scale = other.grad.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(param.grad / scale, other.grad / scale, rtol=0, atol=2e-5, msg=name)
        checked += 1
    assert checked > 10


def test_run_writes_records_and_chart(tmp_path) -> None:
    records = [{**run_provider(provider, TINY), "shape": {"hidden_size": 32}} for provider in (BASELINE, "dama")]
    add_ratios_and_targets(records)
    for record in records:
        assert record["status"] == "ok"
        assert record["pairs_per_s"] > 0 and record["peak_bytes"] > 0 and record["rss_peak_bytes"] > 0
        assert len(record["step_times_s"]) == TINY.steps
        json.dumps(record)
    baseline, ours = records
    # The baseline builds the logits of every padded position: its working memory holds at least one copy.
    logits_bytes = baseline["layout_tokens_mean"] * TINY.vocab_size * 4
    assert baseline["peak_bytes"] >= logits_bytes
    assert baseline["padding_fraction"] > 0 and ours["padding_fraction"] == pytest.approx(0)
    assert [t["target"] for t in ours["targets"]] == [">= 1.5x pairs/s", "<= 0.5x peak working memory"]
    assert ours["ratios"]["peak_vs_baseline"] == pytest.approx(ours["peak_bytes"] / baseline["peak_bytes"])
    header, rule, *rows = format_table(records).splitlines()
    assert header.startswith("| provider | layout |") and set(rule) == set("|-")
    for row, record in zip(rows, records, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == header.count("|") - 1
        assert cells[0] == record["provider"] and cells[4] == f"{record['pairs_per_s']:.3f}"
        assert cells[5] == f"{record['ratios']['pairs_per_s_vs_baseline']:.2f}"
    write_chart(records, tmp_path / "end_to_end.png")
    assert (tmp_path / "end_to_end.png").stat().st_size > 0

"""Checks that keep the end-to-end benchmark honest, on a tiny shape (seconds).

Run: .venv/bin/python -m pytest bench/test_end_to_end.py. The three providers must compute the same training step
(loss and gradients) from the same weights and data, only laid out differently: prefix-shared and packed with the
fused head against padded + full logits with an image per sequence. Else the benchmark would compare different
computations. The LLaVA-1.5-7B projection is checked against counts written out by hand.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench.end_to_end import (
    BASELINE,
    PACKED,
    PROVIDERS,
    Shape,
    add_projections,
    add_ratios_and_targets,
    build_setup,
    forward_backward,
    make_collate,
    micro_batches,
    run_provider,
    synthetic_pair,
)
from dama.data.batch import IGNORE_INDEX, PackedBatch, PaddedBatch, PreferenceExample, PrefixSharedBatch

from .end_to_end_report import format_table, write_chart
from .projection import LLAVA_15_7B, attended_pairs, project_step

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

    # The layouts really differ: the prompt once per pair, packed without padding, padded with one image per sequence.
    shared, packed, padded = batches["dama_prefix_shared"], batches[PACKED], batches[BASELINE]
    assert isinstance(shared, PrefixSharedBatch) and isinstance(packed, PackedBatch)
    assert isinstance(padded, PaddedBatch)
    assert padded.input_ids.numel() > packed.input_ids.numel() > shared.input_ids.numel()
    assert [b.pixel_values.shape[0] for b in (shared, packed, padded)] == [TINY.num_pairs] * 2 + [2 * TINY.num_pairs]
    text_config = {p: s.policy.llava.config.text_config._attn_implementation for p, s in setups.items()}
    assert text_config == {"dama_prefix_shared": "dama_packed", PACKED: "dama_packed", BASELINE: "sdpa"}
    assert [setups[p].policy.head_kind for p in PROVIDERS] == ["fused", "fused", "full_logits"]

    results = {provider: forward_backward(setup, batches[provider]) for provider, setup in setups.items()}
    theirs = results[BASELINE]
    theirs_params = dict(setups[BASELINE].policy.llava.named_parameters())
    for provider in ("dama_prefix_shared", PACKED):
        ours = results[provider]
        torch.testing.assert_close(ours.losses, theirs.losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
        assert torch.equal(ours.mask, theirs.mask)
        ours_params = dict(setups[provider].policy.llava.named_parameters())
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
            torch.testing.assert_close(param.grad / scale, other.grad / scale, rtol=0, atol=2e-5,
                                       msg=f"{provider} {name}")
            checked += 1
        assert checked > 10


def test_run_writes_records_and_chart(tmp_path) -> None:
    records = [{**run_provider(provider, TINY), "shape": {"hidden_size": 32}}
               for provider in (BASELINE, PACKED, "dama_prefix_shared")]
    add_projections(records, TINY, num_batches=3)
    add_ratios_and_targets(records)
    for record in records:
        assert record["status"] == "ok"
        assert record["pairs_per_s"] > 0 and record["peak_bytes"] > 0 and record["rss_peak_bytes"] > 0
        assert len(record["step_times_s"]) == TINY.steps
        json.dumps(record)
    baseline, packed, shared = records
    # The baseline builds the logits of every padded position: its working memory holds at least one copy.
    logits_bytes = baseline["layout_tokens_mean"] * TINY.vocab_size * 4
    assert baseline["peak_bytes"] >= logits_bytes
    assert baseline["padding_fraction"] > 0 and packed["padding_fraction"] == pytest.approx(0)
    assert shared["layout"] == "prefix_shared" and shared["layout_tokens_mean"] < packed["layout_tokens_mean"]
    assert [t["ratio"] for t in packed["targets"]] == ["pairs_per_s_vs_baseline", "peak_vs_baseline"]
    assert [t["ratio"] for t in shared["targets"]] == ["pairs_per_s_vs_packed", "peak_vs_packed",
                                                       "projected_flops_fewer_vs_packed",
                                                       "projected_flops_fewer_vs_baseline"]
    assert packed["ratios"]["peak_vs_baseline"] == pytest.approx(packed["peak_bytes"] / baseline["peak_bytes"])
    assert shared["ratios"]["pairs_per_s_vs_packed"] == pytest.approx(shared["pairs_per_s"] / packed["pairs_per_s"])
    assert shared["ratios"]["projected_flops_fewer_vs_packed"] == pytest.approx(
        packed["projection"]["flops"]["total"] / shared["projection"]["flops"]["total"])
    header, rule, *rows = format_table(records).splitlines()
    assert header.startswith("| provider | layout |") and set(rule) == set("|-")
    for row, record in zip(rows, records, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == header.count("|") - 1
        assert cells[0] == record["provider"] and cells[4] == f"{record['pairs_per_s']:.3f}"
        assert cells[5] == f"{record['ratios']['pairs_per_s_vs_baseline']:.2f}"
    write_chart(records, tmp_path / "end_to_end.png", BASELINE)
    assert (tmp_path / "end_to_end.png").stat().st_size > 0


def _pair(index: int, prompt: int, chosen: int, rejected: int) -> PreferenceExample:
    prompt_ids = torch.arange(5, 5 + prompt)

    def sequence(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([prompt_ids, torch.arange(20, 20 + length)])
        return ids, torch.cat([torch.full((prompt,), IGNORE_INDEX), ids[prompt:]])

    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = sequence(chosen), sequence(rejected)
    return PreferenceExample(
        row_id=f"p{index}", prompt_length=prompt, chosen_input_ids=chosen_ids, chosen_labels=chosen_labels,
        rejected_input_ids=rejected_ids, rejected_labels=rejected_labels, pixel_values=torch.zeros(3, 2, 2),
        ref_chosen_logps=0.0, ref_rejected_logps=0.0, ref_chosen_mean_logps=0.0, ref_rejected_mean_logps=0.0,
        hardness=0.0)


def test_projection_counts_by_hand() -> None:
    """Two pairs, (prompt, chosen, rejected) tokens (3, 2, 1) and (2, 1, 4): token, attention and FLOP counts."""
    examples = [_pair(0, 3, 2, 1), _pair(1, 2, 1, 4)]
    shared, packed, padded = (make_collate(provider)(examples) for provider in PROVIDERS)
    # Prefix-shared: [prompt | chosen] causal (5 and 3 tokens); [rejected] over prompt + itself (1 over 4, 4 over 6).
    assert attended_pairs(shared) == 15 + 6 + (1 * 3 + 1) + (4 * 2 + 10)
    # Packed: sequences of 5, 4, 3 and 6 tokens, causal.
    assert attended_pairs(packed) == 15 + 10 + 6 + 21
    # Padded: 4 rows of 6 tokens, causal over the padded length.
    assert attended_pairs(padded) == 4 * 21

    hidden, inter, vocab, layers = 4096, 11008, 32000, 32
    assert (LLAVA_15_7B.hidden_size, LLAVA_15_7B.intermediate_size, LLAVA_15_7B.vocab_size,
            LLAVA_15_7B.layers) == (hidden, inter, vocab, layers)
    ours, theirs = project_step(shared, "fused"), project_step(padded, "full_logits")
    assert ours["tokens"] == 3 + 2 + 1 + 2 + 1 + 4 and theirs["tokens"] == 24
    assert ours["flops"]["decoder_linear"] == 6 * 13 * layers * (4 * hidden ** 2 + 3 * hidden * inter)
    assert ours["flops"]["decoder_attention"] == 12 * hidden * layers * attended_pairs(shared)
    assert ours["flops"]["head"] == 8 * (2 + 1 + 1 + 4) * hidden * vocab  # the scored response tokens only
    assert theirs["flops"]["head"] == 6 * 24 * hidden * vocab
    # The baseline encodes each image once per sequence.
    assert theirs["flops"]["vision_tower"] == 2 * ours["flops"]["vision_tower"] > 0
    assert theirs["flops"]["projector"] == 2 * ours["flops"]["projector"] > 0
    assert ours["flops"]["total"] == sum(v for k, v in ours["flops"].items() if k != "total")
    assert ours["activation_bytes"]["decoder"] == 13 * layers * (8 * hidden + 4 * inter) * 2
    assert ours["activation_bytes"]["logits"] == 0 and theirs["activation_bytes"]["logits"] == 24 * vocab * 4

"""TRL's DPOTrainer as a provider of the end-to-end benchmark, and dama run as plain DPO beside it (tiny shape).

TRL must see the same model, tokens and pixels as dama: its log-probs equal dama's; its reference model is a live
copy of the policy, so its first loss is ln 2; each provider writes a complete record; without trl the provider is
skipped with the reason.
"""

from __future__ import annotations

import math

import pytest
import torch

import bench.end_to_end as end_to_end
from bench.end_to_end import (
    DPO,
    PAD_ID,
    TRL,
    Shape,
    add_mfu,
    add_ratios_and_targets,
    build_llava,
    build_setup,
    micro_batches,
    run_isolated,
    run_provider,
)
from bench.end_to_end_report import format_table
from bench.trl_provider import build_trl_setup, trl_forward_backward, trl_inputs, trl_missing_reason, trl_sequence_logps

TINY = Shape(num_pairs=3, hidden_size=32, num_layers=2, steps=1, warmup=1, vocab_size=503, image_size=28,
             patch_size=14, vision_hidden_size=16, response_mean=12)
needs_trl = pytest.mark.skipif(trl_missing_reason() is not None, reason=str(trl_missing_reason()))


@needs_trl
def test_trl_sees_what_dama_sees_and_starts_at_ln2() -> None:
    examples = micro_batches(TINY)[0]
    trl = build_trl_setup(build_llava(TINY), PAD_ID, TINY.image_size, TINY.patch_size, 1e-6, torch.device("cpu"))
    dama = build_setup(DPO, TINY)
    inputs = trl_inputs(examples, PAD_ID)
    assert inputs["input_ids"].shape[0] == inputs["pixel_values"].shape[0] == 2 * TINY.num_pairs
    with torch.no_grad():
        theirs = trl_sequence_logps(trl, inputs)
        ours = dama.policy(dama.collate(examples))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-4)

    loss = trl_forward_backward(trl, inputs)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)  # the live reference is the policy's copy
    assert all(p.grad is not None for p in trl.params) and len(trl.params) > 10
    reference = trl.trainer.ref_model
    assert not any(p.requires_grad for p in reference.parameters())


@needs_trl
@pytest.mark.parametrize("provider", [DPO, TRL])
def test_dpo_peers_write_records(provider) -> None:
    record = {**run_provider(provider, TINY), "shape": {}}
    assert record["status"] == "ok" and record["layout"] == {DPO: "prefix_shared", TRL: "padded"}[provider]
    assert record["pairs_per_s"] > 0 and record["tokens_per_s"] > 0 and record["peak_bytes"] > 0
    assert record["images_encoded_per_step"] == TINY.num_pairs * (2 if provider == TRL else 1)
    assert record["model_tflop_per_step"] > 0 and record["cuda_peak_bytes"] is None
    assert all(math.isfinite(loss) for loss in record["losses"])
    records = [record]
    add_mfu(records, peak_tflops=1.0)
    add_ratios_and_targets(records)
    assert record["mfu"] == pytest.approx(record["model_tflop_per_s"])
    assert record["ratios"][f"pairs_per_s_vs_{'trl' if provider == TRL else 'dpo'}"] == pytest.approx(1.0)
    header, _, row = format_table(records).splitlines()
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == header.count("|") - 1 and cells[0] == provider


def test_trl_provider_is_skipped_with_the_reason(monkeypatch) -> None:
    monkeypatch.setattr(end_to_end, "trl_missing_reason", lambda: "trl is not installed (pip install -e '.[test]')")
    record = run_isolated(TRL, TINY)
    assert record["status"] == "skipped" and record["reason"] == (
        "trl_dpo skipped: trl is not installed (pip install -e '.[test]')")

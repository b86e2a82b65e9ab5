"""The loss-head benchmark under pytest-benchmark, on small shapes, and the checks that keep it honest.

Run: .venv/bin/python -m pytest bench/test_loss_head.py [--benchmark-enable]. The benchmarks are grouped by regime so
that pytest-benchmark shows naive, liger and dama side by side. The checks: the three providers compute the same loss
and gradients (else the benchmark would compare different computations), the peaked inputs are reproducible and
peaked as the module says, the memory reading is exact on known allocations, and the CLI records a failing provider as
skipped instead of stopping.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch

from bench.loss_head import (
    IGNORE_INDEX,
    LABEL_DRAW_ROWS,
    LOSSES,
    PROVIDERS,
    Case,
    _draw_labels,
    add_ratios,
    add_targets,
    main,
    make_inputs,
    plan_cases,
    run_case,
    run_isolated,
    softmax_summary,
)
from bench.memory import track_peak

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = torch.device("cpu")
# Small enough for the whole file to run in seconds; regime b keeps its shape: a long unsupervised prefix.
SMALL_LAYOUTS = {"a": {"prefix_len": 0, "response_len": 96}, "b": {"prefix_len": 80, "response_len": 16}}
MB = 10_000_000
# Bytes the tracker may see beyond a test's own blocks: scalar tensors that torch wraps around Python numbers.
SLACK = 1024


def small_case(provider: str, regime: str, logits: str = "flat") -> Case:
    return Case(provider=provider, regime=regime, hidden_size=64, vocab_size=2003, num_pairs=2, logits=logits,
                **SMALL_LAYOUTS[regime])


def peaked_case(provider: str = "dama", **fields) -> Case:
    """The benchmark's vocabulary at a small width: 2 pairs of 4 unsupervised and 32 supervised tokens."""
    return Case(provider=provider, regime="b", hidden_size=64, num_pairs=2, prefix_len=4, response_len=32,
                logits="peaked", **fields)


def skip_if_unavailable(provider: str) -> None:
    if provider == "liger" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed")


def forward_backward(provider: str, regime: str, logits: str = "flat", seed: int = 0):
    inputs = make_inputs(small_case(provider, regime, logits), DEVICE, seed=seed)
    loss = LOSSES[provider](inputs)
    loss.backward()
    return inputs, loss.detach()


@pytest.mark.parametrize("regime", ["a", "b"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_loss_head_speed(benchmark, provider: str, regime: str) -> None:
    """Timing only (`pytest bench --benchmark-enable`); the providers agree by the test below."""
    if benchmark.disabled:
        pytest.skip("a timing benchmark: run with --benchmark-enable")
    skip_if_unavailable(provider)
    inputs = make_inputs(small_case(provider, regime), DEVICE)
    loss_fn = LOSSES[provider]
    benchmark.group = f"loss head forward + backward, regime {regime}"

    def clear_grads() -> None:
        inputs.hidden.grad = inputs.weight.grad = None

    def step() -> None:
        loss_fn(inputs).backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.pedantic(step, setup=clear_grads, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("logits", ["flat", "peaked"])
@pytest.mark.parametrize("regime", ["a", "b"])
@pytest.mark.parametrize("provider", ["liger", "dama"])
def test_providers_give_the_same_loss_and_gradients(provider: str, regime: str, logits: str) -> None:
    skip_if_unavailable(provider)
    gold_inputs, gold_loss = forward_backward("naive", regime, logits)
    hidden_scale = gold_inputs.hidden.grad.abs().max().item()
    # A saturated sigmoid would make every gradient near zero and the comparison empty.
    assert hidden_scale > 1e-4
    inputs, loss = forward_backward(provider, regime, logits)
    torch.testing.assert_close(loss, gold_loss, rtol=1e-5, atol=0, msg=f"{provider} loss")
    torch.testing.assert_close(inputs.hidden.grad, gold_inputs.hidden.grad, rtol=0, atol=1e-5 * hidden_scale,
                               msg=f"{provider} hidden grad")
    weight_scale = gold_inputs.weight.grad.abs().max().item()
    torch.testing.assert_close(inputs.weight.grad, gold_inputs.weight.grad, rtol=0, atol=1e-5 * weight_scale,
                               msg=f"{provider} weight grad")
    prefix_len = SMALL_LAYOUTS[regime]["prefix_len"]
    if prefix_len:
        # Unsupervised positions take no part in the loss, whether a provider computes their logits or skips them.
        assert inputs.hidden.grad[:, :prefix_len].abs().max().item() == 0


def test_labels_are_drawn_from_each_rows_softmax() -> None:
    # Two kinds of rows over 3 words, in chunks of LABEL_DRAW_ROWS with a short last one.
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # (V, H)
    kinds = torch.eye(2)  # row kind k has logits weight[:, k]
    num_rows = 12 * LABEL_DRAW_ROWS + 7
    kind_of_row = torch.arange(num_rows) % 2
    uniforms = torch.rand(num_rows, generator=torch.Generator().manual_seed(0))
    labels, label_logps = _draw_labels(kinds[kind_of_row], weight, uniforms)
    for kind in (0, 1):
        log_probs = weight[:, kind].double().log_softmax(0)  # (V,)
        drawn = labels[kind_of_row == kind]
        frequencies = torch.bincount(drawn, minlength=3).double() / len(drawn)
        # 4 standard deviations of a frequency over some 1500 draws.
        torch.testing.assert_close(frequencies, log_probs.exp(), rtol=0, atol=0.05)
        torch.testing.assert_close(label_logps[kind_of_row == kind], log_probs[drawn], rtol=0, atol=1e-6)


def test_peaked_inputs_depend_on_the_seed_alone() -> None:
    fields = ("hidden", "weight", "labels", "seq_ids", "ref_chosen_logps", "ref_rejected_logps")
    first = make_inputs(peaked_case("naive"), CPU, seed=3)
    for again in (make_inputs(peaked_case("naive"), CPU, seed=3), make_inputs(peaked_case("liger"), CPU, seed=3),
                  make_inputs(peaked_case("dama"), CPU, seed=3)):
        for field in fields:
            assert torch.equal(getattr(again, field), getattr(first, field)), field
    other = make_inputs(peaked_case(), CPU, seed=4)
    assert not torch.equal(other.hidden, first.hidden) and not torch.equal(other.labels, first.labels)


def test_peaked_labels_are_words_where_supervised_and_ignored_elsewhere() -> None:
    case = peaked_case()
    labels = make_inputs(case, CPU).labels
    assert labels.shape == (case.num_seqs, case.seq_len) and labels.dtype == torch.int64
    assert (labels[:, : case.prefix_len] == IGNORE_INDEX).all()
    supervised = labels[:, case.prefix_len :]
    assert supervised.min() >= 0 and supervised.max() < case.vocab_size
    with pytest.raises(ValueError, match="hidden_size >= 2"):
        make_inputs(dataclasses.replace(case, hidden_size=1), CPU)


def test_peaked_softmax_is_in_the_stated_band_and_flat_is_near_uniform() -> None:
    peaked = softmax_summary(make_inputs(peaked_case(), CPU))
    assert peaked["summary_rows"] == 128
    assert 2.0 <= peaked["entropy_nats"] <= 3.0
    # Labels drawn from each row's softmax: their mean log-prob is near minus the mean entropy.
    assert abs(peaked["label_logp"] + peaked["entropy_nats"]) < 0.5
    flat = softmax_summary(make_inputs(dataclasses.replace(peaked_case(), logits="flat"), CPU))
    assert math.log(32000) - 1 <= flat["entropy_nats"] <= math.log(32000)


def test_peaked_reference_logps_follow_the_policy() -> None:
    case = peaked_case()
    inputs = make_inputs(case, CPU)
    log_probs = (inputs.hidden.detach().double() @ inputs.weight.detach().double().T).log_softmax(-1)
    supervised = inputs.labels != IGNORE_INDEX
    token_logps = log_probs.gather(-1, torch.where(supervised, inputs.labels, 0).unsqueeze(-1)).squeeze(-1)
    seq_logps = (token_logps * supervised).sum(-1)  # (S,)
    ref_logps = torch.cat([inputs.ref_chosen_logps, inputs.ref_rejected_logps]).double()
    # The policy's own sequence log-probs plus noise of spread sqrt(T): the DPO margins stay moderate.
    assert (seq_logps - ref_logps).abs().max() < 4 * math.sqrt(case.response_len)


def test_track_peak_reports_a_known_allocation() -> None:
    with track_peak(CPU) as reading:
        block = torch.empty(MB, dtype=torch.uint8)
        del block
    assert MB <= reading.working_bytes() <= MB + SLACK


def test_track_peak_replays_frees_in_order() -> None:
    with track_peak(CPU) as reading:
        for _ in range(3):
            # The new block is allocated before the old one is released: two are live at once, never three.
            block = torch.ones(MB // 4)
        del block
    assert 2 * MB <= reading.working_bytes() <= 2 * MB + SLACK


def test_track_peak_ignores_tensors_from_before_the_region() -> None:
    earlier = torch.ones(MB // 4)
    with track_peak(CPU) as reading:
        doubled = earlier * 2
    assert MB <= reading.working_bytes() <= MB + SLACK
    assert doubled.shape == earlier.shape


def test_working_bytes_leaves_out_outputs_even_when_allocated_after_the_peak() -> None:
    with track_peak(CPU) as reading:
        scratch = torch.ones(MB // 4)
        del scratch
        output = torch.ones(MB // 8)
    assert MB <= reading.working_bytes() <= MB + SLACK
    # Subtracting the output from the peak would give 5 MB; the scratch block alone was 10 MB.
    assert MB <= reading.working_bytes([output]) <= MB + SLACK


def test_run_case_measures_the_fused_head_below_the_naive_one() -> None:
    records = {p: run_case(small_case(p, "b"), repeats=1, device=DEVICE) for p in ("naive", "dama")}
    for record in records.values():
        assert record["time_s"] > 0 and record["peak_bytes"] > 0 and record["grad_bytes"] > 0
    # naive holds (S, T, V) logits; dama one chunk of the 32 supervised rows: far less.
    assert records["dama"]["peak_bytes"] < records["naive"]["peak_bytes"] / 4
    # dama's backward counts its d_logits tiles (none filtered in fp32); naive has none.
    assert records["dama"]["tiles"] > 0 and records["dama"]["filtered_tile_share"] == 0.0
    assert records["naive"]["tiles"] is None and records["naive"]["filtered_tile_share"] is None


def test_run_case_reports_the_filtered_tiles_in_bf16() -> None:
    record = run_case(Case(provider="dama", regime="b", hidden_size=64, vocab_size=2003, num_pairs=2, dtype="bf16",
                           **SMALL_LAYOUTS["b"]), repeats=0, device=DEVICE)
    assert record["tiles"] > 0 and 0.0 <= record["filtered_tile_share"] <= 1.0
    assert "gradient filter eps 2^-12" in record["notes"]


def test_targets_follow_the_ratios() -> None:
    def record(provider: str, time_s: float, peak_bytes: int) -> dict:
        return {"provider": provider, "regime": "b", "H": 256, "purpose": "comparison", "status": "ok",
                "time_s": time_s, "peak_bytes": peak_bytes}

    records = [record("naive", 4.0, 1000), record("liger", 1.0, 100), record("dama", 0.4, 10)]
    add_ratios(records)
    add_targets(records)
    verdicts = {t["target"]: t["met"] for t in records[2]["targets"]}
    assert verdicts == {
        ">= 2x faster than naive": True,
        ">= 2x faster than liger": True,
        "working memory <= 5% of naive": True,
        "working memory <= 5% of liger": False,
    }


def test_a_failing_provider_is_recorded_as_skipped() -> None:
    record = run_isolated(Case(provider="missing", regime="b", hidden_size=8, vocab_size=16), repeats=1)
    assert record["status"] == "skipped" and "missing" in record["reason"]


def test_cli_writes_the_records(tmp_path) -> None:
    output = tmp_path / "loss_head.json"
    main(["--providers", "dama", "--regimes", "b", "--shapes", "64", "--repeats", "1", "--output", str(output)])
    (record,) = json.loads(output.read_text())
    for key in ("provider", "regime", "H", "V", "tokens", "supervised_tokens", "time_s", "peak_bytes",
                "rss_peak_bytes", "ratios", "filtered_tile_share", "device", "dtype", "logits", "entropy_nats",
                "label_logp", "torch", "triton", "liger_kernel", "git_commit"):
        assert key in record, key
    assert (record["provider"], record["regime"], record["tokens"], record["supervised_tokens"]) == ("dama", "b", 6288,
                                                                                                     1200)
    assert record["logits"] == "flat" and record["entropy_nats"] > 9


def test_cli_runs_on_peaked_logits(tmp_path, capsys) -> None:
    output = tmp_path / "loss_head_peaked.json"
    main(["--logits", "peaked", "--quick", "--providers", "dama", "--regimes", "b", "--shapes", "64", "--output",
          str(output)])
    (record,) = json.loads(output.read_text())
    assert record["status"] == "ok" and record["logits"] == "peaked"
    assert 2.0 <= record["entropy_nats"] <= 3.0 and record["label_logp"] < 0
    printed = capsys.readouterr().out
    assert "Loss head, peaked logits" in printed and "regime b, H 64: " in printed and "peaked logits); " in printed


def test_the_softmax_summary_is_computed_once_per_regime_and_shape() -> None:
    cases = plan_cases((64, 256), ["a", "b"], ["naive", "dama"], "fp32")
    summarised = [(c.regime, c.hidden_size, c.provider) for c in cases if c.summarise]
    assert summarised == [("a", 64, "naive"), ("b", 64, "naive"), ("a", 256, "naive"), ("b", 256, "naive")]

"""Gradient filtering of the fused head's backward, both paths, against a float64 reference that filters the same
tiles (the Triton path's words in order of mean logit, the torch path's in the vocabulary's order): none filtered,
every tile filtered, and some; likely words gathered into the first tiles; the dtype defaults; the tile counter; bad
thresholds."""

from __future__ import annotations

import pytest
import torch

import dama_kernels
from dama_kernels.checks import (
    TOLERANCES,
    LogprobCase,
    compare_to_gold,
    make_logprob_inputs,
    poisoned_allocations,
    require,
)
from dama_kernels.grad_filter import (
    FILTER_TILE_COLS,
    FILTER_TILE_ROWS,
    count_filtered_tiles,
    default_filter_eps,
    vocabulary_order,
)
from dama_kernels.launch_config import INTERPRETER_BLOCKS
from dama_kernels.linear_logprob_backward import linear_logprob_bwd_triton
from dama_kernels.linear_logprob_forward import linear_logprob_fwd_triton
from dama_kernels.linear_logprob_torch import linear_logprob_bwd_torch, linear_logprob_fwd_torch
from dama_kernels.reference import reference_filtered_grads

IMPLS = ["triton", "torch"]
# The backwards compared with the reference: Triton skipping filtered tiles (words in order of mean logit), Triton
# with dense products (the vocabulary's order), and the torch path.
PATHS = ["triton", "triton_dense", "torch"]
# Both paths filter tiles of the same shape here, so one reference (given each path's word order) serves both.
TILE_ROWS, TILE_COLS = INTERPRETER_BLOCKS.block_n, INTERPRETER_BLOCKS.block_v
# 150 rows = 3 row tiles (the last short) over 2 chunks of 128 rows; 300 columns = 3 vocabulary tiles (the last short).
NUM_TOKENS, HIDDEN_SIZE, VOCAB_SIZE, CHUNK_ROWS = 150, 40, 300, 128


def test_both_paths_use_tiles_of_one_shape():
    assert (FILTER_TILE_ROWS, FILTER_TILE_COLS) == (TILE_ROWS, TILE_COLS)
    assert CHUNK_ROWS % TILE_ROWS == 0  # chunks start on a tile boundary: the reference's tiles from (0, 0) hold


def filtered_backward(path, inputs, grad_out, filter_eps, ignore_index=-100):
    """(d_hidden, d_weight, d_bias) of our backward with `filter_eps`, and the tiles it filtered / computed."""
    hidden, weight, bias, labels = inputs.hidden, inputs.weight, inputs.bias, inputs.labels
    with count_filtered_tiles() as tiles, poisoned_allocations():
        if path.startswith("triton"):
            _, max_logit, log_norm = linear_logprob_fwd_triton(hidden, weight, labels, bias, ignore_index,
                                                               INTERPRETER_BLOCKS)
            grads = linear_logprob_bwd_triton(grad_out, hidden, weight, labels, bias, max_logit, log_norm,
                                              ignore_index, INTERPRETER_BLOCKS, (True, True, True),
                                              chunk_rows=CHUNK_ROWS, filter_eps=filter_eps,
                                              skip_filtered=path == "triton")
        else:
            _, max_logit, log_norm = linear_logprob_fwd_torch(hidden, weight, labels, bias, ignore_index, CHUNK_ROWS)
            grads = linear_logprob_bwd_torch(grad_out, hidden, weight, labels, bias, max_logit, log_norm,
                                             ignore_index, CHUNK_ROWS, (True, True, True), filter_eps)
    return grads, tiles.skipped, tiles.total


# A bias of 10 on the first vocabulary tile keeps every other tile's probabilities below 2^-12 (no miss in 300 draws
# of these inputs in bf16; with 9, 1 draw in 12 left a tile above it).
PEAK_BIAS = 10.0


def make_inputs(dtype, device, peaked=False, ignored_fraction=0.25, peak_bias=PEAK_BIAS):
    """Unit-spread logits over 300 words; `peaked` moves the softmax and every label into the first vocabulary tile
    (`peak_bias` added there: the other tiles then hold about 1e-4 of each row's probability mass)."""
    case = LogprobCase("filter", NUM_TOKENS, HIDDEN_SIZE, VOCAB_SIZE, ignored_fraction=ignored_fraction)
    inputs = make_logprob_inputs(case, torch.float32, device)
    if peaked:
        inputs.bias[:TILE_COLS] += peak_bias
        supervised = inputs.labels != case.ignore_index
        inputs.labels[supervised] %= TILE_COLS
    return type(inputs)(*(None if t is None else t.to(dtype) if t.is_floating_point() else t
                          for t in (inputs.hidden, inputs.weight, inputs.bias, inputs.labels)))


def word_order(path, inputs):
    """The words of the d_logits columns of `path`: in order of mean logit when skipping, else the vocabulary's."""
    return vocabulary_order(inputs.hidden, inputs.weight, inputs.bias) if path == "triton" else None


def check_against_reference(path, dtype, peaked, filter_eps, device):
    """Our filtered gradients against the float64 filtered reference (fp32 reference as the baseline); returns the
    number of filtered tiles (ours and the reference must agree on it) and our gradients."""
    inputs = make_inputs(dtype, device, peaked)
    grad_out = torch.randn(NUM_TOKENS, device=device)
    grads, skipped, total = filtered_backward(path, inputs, grad_out, filter_eps)
    order = word_order(path, inputs)
    reference = [reference_filtered_grads(inputs.hidden, inputs.weight, inputs.labels, inputs.bias, grad_out,
                                          filter_eps, TILE_ROWS, TILE_COLS, compute_dtype=compute_dtype,
                                          vocab_order=order)
                 for compute_dtype in (torch.float64, torch.float32)]
    (*gold, gold_skipped), (*base, _) = reference
    assert total == 3 * 3
    assert skipped == gold_skipped, f"filtered {skipped} tiles, the reference {gold_skipped}"
    for name, grad, gold_grad, base_grad in zip(("d_hidden", "d_weight", "d_bias"), grads, gold, base, strict=True):
        assert grad.dtype == dtype
        require([compare_to_gold(grad, gold_grad, base_grad.to(dtype), TOLERANCES[dtype].grad, name)])
    return skipped, grads


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("filter_eps", [0.0, 2**-12])
def test_no_tile_filtered(path, dtype, filter_eps, device):
    """Unit-spread logits over 300 words: every tile holds probabilities far above 2^-12, so nothing is filtered and
    the gradients are the exact ones."""
    skipped, _ = check_against_reference(path, dtype, False, filter_eps, device)
    assert skipped == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_tile_filtered(path, dtype, device):
    """|onehot - softmax| <= 1 < 2: every tile is filtered and every gradient is exactly zero."""
    skipped, grads = check_against_reference(path, dtype, False, 2.0, device)
    assert skipped == 9
    assert all(bool((grad == 0).all()) for grad in grads)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_some_tiles_filtered(path, dtype, device):
    """Peaked softmax: the first vocabulary tile of each row tile is kept (it holds the labels), the others filtered."""
    skipped, _ = check_against_reference(path, dtype, True, 2**-12, device)
    assert skipped == 6


def scattered_peak_inputs(dtype, device):
    """make_inputs' peak on 128 words spread over the vocabulary, every supervised label among them."""
    inputs = make_inputs(torch.float32, device)
    peak = torch.randperm(VOCAB_SIZE, device=device)[:TILE_COLS]
    inputs.bias[peak] += PEAK_BIAS
    supervised = inputs.labels != -100
    inputs.labels[supervised] = peak[inputs.labels[supervised] % TILE_COLS]
    inputs = type(inputs)(*(None if t is None else t.to(dtype) if t.is_floating_point() else t
                            for t in (inputs.hidden, inputs.weight, inputs.bias, inputs.labels)))
    return inputs, peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_path_gathers_likely_words_into_the_first_tiles(dtype, device):
    """The peak's 128 words spread over the vocabulary (one in every few): in the vocabulary's order every tile holds
    some of them and none is filtered (the torch path, and Triton's dense products); in order of mean logit they fill
    the first tile, and the Triton path that skips filtered tiles filters the other two of each row tile."""
    inputs, peak = scattered_peak_inputs(dtype, device)
    grad_out = torch.randn(NUM_TOKENS, device=device)
    order = vocabulary_order(inputs.hidden, inputs.weight, inputs.bias)
    assert set(order[:TILE_COLS].tolist()) == set(peak.tolist())
    for path, expected in (("torch", 0), ("triton_dense", 0), ("triton", 6)):
        grads, skipped, _ = filtered_backward(path, inputs, grad_out, 2**-12)
        assert skipped == expected, path
        *gold, _ = reference_filtered_grads(inputs.hidden, inputs.weight, inputs.labels, inputs.bias, grad_out, 2**-12,
                                            TILE_ROWS, TILE_COLS, vocab_order=word_order(path, inputs))
        *base, _ = reference_filtered_grads(inputs.hidden, inputs.weight, inputs.labels, inputs.bias, grad_out, 2**-12,
                                            TILE_ROWS, TILE_COLS, compute_dtype=torch.float32,
                                            vocab_order=word_order(path, inputs))
        require([compare_to_gold(grad, gold_grad, base_grad.to(dtype), TOLERANCES[dtype].grad, f"{path} {name}")
                 for name, grad, gold_grad, base_grad in zip(("d_hidden", "d_weight", "d_bias"), grads, gold, base,
                                                             strict=True)])


@pytest.mark.parametrize("skip_filtered_tiles", [True, False])
def test_public_api_passes_skip_filtered_tiles_to_the_backward(skip_filtered_tiles, device):
    """Only the supervised rows are scored: 2 of the 3 vocabulary tiles of each of their row tiles are filtered when
    the words come in order of mean logit, none in the vocabulary's order."""
    inputs, _ = scattered_peak_inputs(torch.bfloat16, device)
    weight = inputs.weight.detach().requires_grad_(True)
    with count_filtered_tiles() as tiles:
        logps = dama_kernels.token_logps(inputs.hidden, weight, inputs.labels, bias=inputs.bias, impl="triton",
                                         skip_filtered_tiles=skip_filtered_tiles)
        logps.sum().backward()
    row_tiles = -(-int((inputs.labels != -100).sum()) // TILE_ROWS)
    assert tiles.skipped == (2 * row_tiles if skip_filtered_tiles else 0)


def test_filtering_moves_the_gradient_beyond_fp32_tolerance(device):
    """The check above can fail: in fp32 the filtered gradient differs from the exact one by more than fp32 allows.

    A lower peak and a higher threshold than above drop more probability mass: the difference was at least 20x the
    margin below over 100 draws."""
    inputs = make_inputs(torch.float32, device, peaked=True, peak_bias=8.0)
    grad_out = torch.randn(NUM_TOKENS, device=device)
    (filtered_hidden, *_), _, _ = filtered_backward("triton", inputs, grad_out, 2**-9)
    (exact_hidden, *_), _, _ = filtered_backward("triton", inputs, grad_out, 0.0)
    scale = exact_hidden.abs().max().item()
    assert (filtered_hidden - exact_hidden).abs().max().item() > 10 * TOLERANCES[torch.float32].grad * scale


def test_ignored_rows_do_not_keep_a_tile(device):
    """A tile whose only rows with large |onehot - softmax| are ignored ones is filtered."""
    inputs = make_inputs(torch.float32, device, ignored_fraction=0.0)
    inputs.labels[:TILE_ROWS] = -100  # the first row tiles' rows all ignored
    grad_out = torch.randn(NUM_TOKENS, device=device)
    for path in PATHS:
        (d_hidden, *_), skipped, _ = filtered_backward(path, inputs, grad_out, 2**-12)
        assert skipped == 3, path  # the three tiles of the ignored rows, none other
        assert bool((d_hidden[:TILE_ROWS] == 0).all())


def test_default_threshold_follows_the_dtype():
    assert default_filter_eps(torch.bfloat16) == 2**-12
    assert default_filter_eps(torch.float16) == 2**-15
    assert default_filter_eps(torch.float32) == 0.0
    assert default_filter_eps(torch.float64) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype, filters", [(torch.bfloat16, True), (torch.float32, False)], ids=str)
def test_public_api_filters_by_default_in_16_bit(impl, dtype, filters, device):
    inputs = make_inputs(dtype, device, peaked=True, ignored_fraction=0.0)
    weight = inputs.weight.detach().requires_grad_(True)
    for grad_filter_eps, expect_filtered in ((None, filters), (0.0, False), (2**-12, True)):
        with count_filtered_tiles() as tiles:
            logps = dama_kernels.token_logps(inputs.hidden, weight, inputs.labels, bias=inputs.bias, impl=impl,
                                             grad_filter_eps=grad_filter_eps)
            logps.sum().backward()
        assert tiles.total > 0
        assert (tiles.skipped > 0) == expect_filtered, grad_filter_eps


def test_counting_is_off_outside_the_block(device):
    inputs = make_logprob_inputs(LogprobCase("filter", 20, 8, 50), torch.float32, device)
    weight = inputs.weight.detach().requires_grad_(True)
    with count_filtered_tiles() as tiles:
        pass
    dama_kernels.token_logps(inputs.hidden, weight, inputs.labels, impl="torch", grad_filter_eps=2.0).sum().backward()
    assert tiles.total == 0 and tiles.skipped_share is None


@pytest.mark.parametrize("value", [-1.0, float("nan"), "auto", True])
def test_bad_threshold_raises_clear_error(value):
    inputs = make_logprob_inputs(LogprobCase("filter", 4, 8, 20), torch.float32, "cpu")
    with pytest.raises(ValueError, match="grad_filter_eps must be a float >= 0"):
        dama_kernels.token_logps(inputs.hidden, inputs.weight, inputs.labels, impl="torch", grad_filter_eps=value)

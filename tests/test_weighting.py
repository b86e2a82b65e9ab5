"""The pure DAMA weighting functions against hand computations on small numbers (paper Eq. 6, 8-15).

Sigmoids used below: s(-1) = 0.2689414213699951, s(-0.5) = 0.3775406687981454, s(0) = 0.5,
s(1/3) = 0.5825702064623147, s(0.5) = 0.6224593312018546, s(1) = 0.7310585786300049, s(2) = 0.8807970779778823.
"""

import math

import pytest
import torch

from dama.method.weighting import (
    alpha_data,
    alpha_model,
    combined_beta,
    ema_target_terms,
    ema_update,
    filter_weights,
    num_to_keep,
    select_pairs,
)

NAN = float("nan")


def _tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# alpha_D = s(delta) / s(delta_bar), NaN -> 1 (paper Eq. 6)


def test_alpha_data_by_hand():
    # delta_bar = 0.5: s(0) / s(0.5) = 0.5 / 0.6224593312018546, s(1) / s(0.5) = 0.7310585786300049 / 0.6224593...
    alpha, num_missing = alpha_data(_tensor([0.0, 1.0, 0.5]), 0.5)
    torch.testing.assert_close(alpha, _tensor([0.8032653298563167, 1.1744680206150417, 1.0]), rtol=1e-14, atol=0)
    assert num_missing.item() == 0


def test_alpha_data_missing_hardness_is_one_and_counted():
    # delta_bar = 0: s(1) / s(0) = 2 * 0.7310585786300049
    alpha, num_missing = alpha_data(torch.tensor([1.0, NAN, NAN], dtype=torch.float32), 0.0)
    assert alpha.dtype == torch.float64
    torch.testing.assert_close(alpha, _tensor([1.4621171572600098, 1.0, 1.0]), rtol=1e-7, atol=0)
    assert num_missing.item() == 2


def test_alpha_data_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D float tensor"):
        alpha_data(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="1-D float tensor"):
        alpha_data(torch.zeros(2, dtype=torch.int64), 0.0)
    with pytest.raises(ValueError, match="hardness_mean must be finite"):
        alpha_data(torch.zeros(2), NAN)


# Filter weights w = exp(-1/2 ((A - R) / width)^2), scaled so that the largest is 1 (docs/method.md section 4)


def test_filter_weights_by_hand():
    # R = 1, width 1: d^2 = [1, 0, 1] -> [exp(-0.5), 1, exp(-0.5)]
    torch.testing.assert_close(
        filter_weights(_tensor([0.0, 1.0, 2.0]), 1.0, 1.0),
        _tensor([0.6065306597126334, 1.0, 0.6065306597126334]), rtol=1e-14, atol=0,
    )
    # width 2: d^2 = [0.25, 0, 0.25] -> exp(-0.125)
    torch.testing.assert_close(
        filter_weights(_tensor([0.0, 1.0, 2.0]), torch.tensor(1.0, dtype=torch.float64), 2.0),
        _tensor([0.8824969025845955, 1.0, 0.8824969025845955]), rtol=1e-14, atol=0,
    )


def test_filter_weights_keep_the_ratios_of_the_raw_gaussian():
    # Raw weights exp(-4.5), exp(-8) with R = 0; divided by the largest: [1, exp(-3.5)].
    weights = filter_weights(_tensor([3.0, 4.0]), 0.0, 1.0)
    torch.testing.assert_close(weights, _tensor([1.0, 0.0301973834223185]), rtol=1e-14, atol=0)
    # 40 widths away the raw weights all underflow to 0; scaled, the nearest keeps weight 1.
    assert math.exp(-0.5 * 40.0**2) == 0.0
    torch.testing.assert_close(filter_weights(_tensor([40.0, 40.5]), 0.0, 1.0)[0], _tensor(1.0))


def test_filter_weights_reject_a_bad_width():
    with pytest.raises(ValueError, match="width must be > 0"):
        filter_weights(_tensor([0.0]), 0.0, 0.0)


# K = floor(keep_ratio * N) and the draw without replacement


@pytest.mark.parametrize(
    ("num_pairs", "keep_ratio", "expected"),
    [(10, 0.8, 8), (5, 0.8, 4), (1, 0.8, 0), (4, 0.2, 0), (3, 0.5, 1), (7, 1.0, 7), (100, 0.57, 57)],
)
def test_num_to_keep(num_pairs, keep_ratio, expected):
    # 0.57 * 100 is 56.99999999999999 in floating point; the count must still be 57.
    assert num_to_keep(num_pairs, keep_ratio) == expected


def test_num_to_keep_rejects_a_bad_ratio():
    with pytest.raises(ValueError, match=r"keep_ratio must lie in \(0, 1\]"):
        num_to_keep(4, 0.0)


def test_select_pairs_keeps_k_distinct_pairs():
    selected, fallback = select_pairs(torch.rand(10, dtype=torch.float64) + 0.1, 0.8, _generator())
    assert selected.dtype == torch.bool and selected.shape == (10,)
    assert int(selected.sum()) == 8 and not fallback


def test_select_pairs_never_picks_a_zero_weight_when_enough_are_positive():
    # Four positive weights, K = floor(0.8 * 5) = 4: the zero-weight pair is never drawn.
    for seed in range(20):
        selected, fallback = select_pairs(_tensor([1.0, 2.0, 0.0, 3.0, 0.5]), 0.8, _generator(seed))
        assert selected.tolist() == [True, True, False, True, True] and not fallback


def test_select_pairs_draws_in_proportion_to_the_weights():
    # K = floor(0.34 * 3) = 1: a single categorical draw with probabilities [0.25, 0.5, 0.25].
    generator, counts = _generator(7), torch.zeros(3)
    for _ in range(4000):
        selected, _ = select_pairs(_tensor([1.0, 2.0, 1.0]), 0.34, generator)
        counts += selected
    # The standard error of each frequency is below 0.008; 0.03 is about four of them.
    torch.testing.assert_close(counts / 4000, torch.tensor([0.25, 0.5, 0.25]), rtol=0, atol=0.03)


def test_select_pairs_is_reproducible_from_the_generator_seed():
    weights = torch.rand(20, dtype=torch.float64) + 0.1
    first, _ = select_pairs(weights, 0.5, _generator(3))
    again, _ = select_pairs(weights, 0.5, _generator(3))
    other, _ = select_pairs(weights, 0.5, _generator(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    ("weights", "keep_ratio"),
    [
        ([1.0], 0.8),  # N < 2
        ([1.0, 1.0, 1.0, 1.0], 0.2),  # K = floor(0.8) = 0
        ([0.0, 0.0, 0.0], 0.8),  # sum 0
        ([1.0, NAN, 1.0], 0.5),  # not finite
        ([1.0, float("inf"), 1.0], 0.5),
        ([1.0, -0.5, 1.0], 0.5),  # negative
        ([1.0, 0.0, 0.0, 0.0, 0.0], 0.8),  # one positive weight for K = 4
    ],
)
def test_select_pairs_falls_back_to_all_pairs(weights, keep_ratio):
    selected, fallback = select_pairs(_tensor(weights), keep_ratio, _generator())
    assert fallback
    assert selected.tolist() == [True] * len(weights)


# alpha_M, release vs paper (docs/method.md section 6)


def test_alpha_model_release_and_paper_by_hand():
    margins = _tensor([0.0, 2.0, -1.0, 10.0])
    selected = torch.tensor([True, True, True, False])
    # release: (s(0) + s(2) + s(-1)) / 3 / s(0.5) = 0.5499128331159592 / 0.6224593312018546
    release = alpha_model(margins, selected, 0.5, "release")
    torch.testing.assert_close(release, _tensor(0.8834518265702251), rtol=1e-14, atol=0)
    # paper: s((0 + 2 - 1) / 3) / s(0.5) = 0.5825702064623147 / 0.6224593312018546
    paper = alpha_model(margins, selected, torch.tensor(0.5, dtype=torch.float64), "paper")
    torch.testing.assert_close(paper, _tensor(0.9359168981168274), rtol=1e-14, atol=0)


def test_alpha_model_ignores_unselected_pairs():
    selected = torch.tensor([True, False])
    assert alpha_model(_tensor([1.0, 50.0]), selected, 1.0, "release").item() == pytest.approx(1.0, abs=1e-15)
    assert alpha_model(_tensor([1.0, -50.0]), selected, 1.0, "paper").item() == pytest.approx(1.0, abs=1e-15)


def test_alpha_model_rejects_bad_input():
    with pytest.raises(ValueError, match="variant must be one of"):
        alpha_model(_tensor([1.0]), torch.tensor([True]), 0.0, "Release")
    with pytest.raises(ValueError, match="bool tensor of shape"):
        alpha_model(_tensor([1.0, 2.0]), torch.tensor([1, 1]), 0.0, "release")
    with pytest.raises(ValueError, match="no True entry"):
        alpha_model(_tensor([1.0, 2.0]), torch.tensor([False, False]), 0.0, "paper")


# beta_C = max(beta * alpha_D * alpha_M, beta_min) (paper Eq. 15)


def test_combined_beta_by_hand_with_the_floor():
    # 0.1 * [1, 2, 0.005] * 0.5 = [0.05, 0.1, 0.00025]; the last is below beta_min = 1e-3.
    beta_c, num_clamped = combined_beta(0.1, _tensor([1.0, 2.0, 0.005]), _tensor(0.5), 1e-3)
    torch.testing.assert_close(beta_c, _tensor([0.05, 0.1, 1e-3]), rtol=1e-15, atol=0)
    assert num_clamped.item() == 1


def test_combined_beta_is_beta_when_both_factors_are_one():
    beta_c, num_clamped = combined_beta(0.1, torch.ones(4, dtype=torch.float64), 1.0, 1e-3)
    assert beta_c.tolist() == [0.1] * 4 and num_clamped.item() == 0


# EMA of the running margin (docs/method.md section 4)


def test_ema_target_terms_release_and_paper():
    margins, selected = _tensor([1.0, 2.0, 3.0, 10.0]), torch.tensor([True, True, True, False])
    total, count = ema_target_terms(margins, selected, "release")  # every pair: 16 / 4
    assert (total.item(), count.item()) == (16.0, 4)
    total, count = ema_target_terms(margins, selected, "paper")  # selected pairs: 6 / 3
    assert (total.item(), count.item()) == (6.0, 3)


def test_ema_update_by_hand():
    # 0.9 * 1 + 0.1 * 4 = 1.3 (release target above); 0.9 * 1 + 0.1 * 2 = 1.1 (paper target)
    assert ema_update(1.0, 4.0, 0.9).item() == pytest.approx(1.3, abs=1e-15)
    assert ema_update(_tensor(1.0), _tensor(2.0), 0.9).item() == pytest.approx(1.1, abs=1e-15)
    assert ema_update(1.0, 4.0, 1.0).item() == 1.0  # gamma = 1 freezes R
    with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
        ema_update(1.0, 4.0, 1.5)

"""DamaMethodConfig and the DamaLoss module in one process: hand-computed steps, plain DPO, state and edge cases.

The hand-computed batch used below (three pairs):
    policy chosen/rejected [-1, -2, -3] / [-2, -1, -5], reference chosen/rejected [-1.5, -2, -2] / [-1.5, -1.5, -4]
    -> chosen log-ratios [0.5, 0, -1], rejected log-ratios [-0.5, 0.5, -1], margins z = [1, -0.5, 0]
    hardness [0.2, NaN, -0.2] with delta_bar = 0 -> alpha_D = [s(0.2) / 0.5, 1, s(-0.2) / 0.5]
                                                 = [1.099667994624956, 1, 0.9003320053750443]
Sigmoids: s(-0.5) = 0.3775406687981454, s(0.2) = 0.549833997312478, s(0.25) = 0.5621765008857981,
s(1) = 0.7310585786300049.
"""

import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from dama.method.config import DamaMethodConfig
from dama.method.loss import DamaLoss, draw_seed

NAN = float("nan")
HAND_HARDNESS = (0.2, NAN, -0.2)
HAND_ALPHA_DATA = (1.099667994624956, 1.0, 0.9003320053750443)
HAND_MARGINS = (1.0, -0.5, 0.0)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _hand_batch(requires_grad: bool = False) -> list[torch.Tensor]:
    values = ([-1.0, -2.0, -3.0], [-2.0, -1.0, -5.0], [-1.5, -2.0, -2.0], [-1.5, -1.5, -4.0])
    return [torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad and i < 2) for i, v in enumerate(values)]


def _hand_hardness() -> torch.Tensor:
    return torch.tensor(HAND_HARDNESS, dtype=torch.float64)


def _random_batch(num_pairs: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logps = [-10 + scale * torch.randn(num_pairs, generator=generator, dtype=torch.float64) for _ in range(4)]
    return [t.requires_grad_(i < 2) for i, t in enumerate(logps)]


def _config(**overrides) -> DamaMethodConfig:
    return DamaMethodConfig(**{"loss_impl": "torch", **overrides})


# The config


def test_config_defaults_follow_docs_method():
    config = DamaMethodConfig()
    assert (config.beta, config.beta_min, config.variant, config.keep_ratio, config.filter_width, config.gamma) == (
        0.1, 1e-3, "release", 0.8, 1.0, 0.9
    )
    assert config.data_aware and config.model_aware and config.outlier_filter and not config.average_logps
    assert (config.ema_update, config.hardness_mean, config.filter_seed, config.loss_impl) == (
        "micro_batch", None, 42, "auto"
    )
    assert all(f.metadata.get("help") for f in dataclasses.fields(DamaMethodConfig))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"beta": 0.0}, "beta must be a finite number > 0"),
        ({"beta_min": -1e-3}, r"beta_min must lie in \[0, beta"),
        ({"beta_min": 0.2}, r"beta_min must lie in \[0, beta"),
        ({"variant": "Paper"}, "variant must be one of"),
        ({"ema_update": "step"}, "ema_update must be one of"),
        ({"loss_impl": "cuda"}, "loss_impl must be one of"),
        ({"keep_ratio": 0.0}, r"keep_ratio must lie in \(0, 1\]"),
        ({"keep_ratio": 1.5}, r"keep_ratio must lie in \(0, 1\]"),
        ({"filter_width": 0.0}, "filter_width must be a finite number > 0"),
        ({"gamma": 1.1}, r"gamma must lie in \[0, 1\]"),
        ({"filter_seed": -1}, "filter_seed must be a non-negative int"),
        ({"hardness_mean": float("inf")}, "hardness_mean must be a finite float or None"),
        ({"grad_filter_eps": -1.0}, "grad_filter_eps must be a number >= 0"),
        ({"grad_filter_eps": float("nan")}, "grad_filter_eps must be a number >= 0"),
        ({"grad_filter_eps": True}, "grad_filter_eps must be a number >= 0"),
    ],
)
def test_config_rejects_invalid_options(overrides, message):
    with pytest.raises(ValueError, match=message):
        DamaMethodConfig(**overrides)


def test_config_parses_with_hf_argument_parser_and_mixes_into_training_arguments(tmp_path):
    from transformers import HfArgumentParser, TrainingArguments

    (config,) = HfArgumentParser(DamaMethodConfig).parse_args_into_dataclasses(
        ["--variant", "paper", "--hardness_mean", "0.05", "--no_data_aware", "--ema_update", "optimizer_step",
         "--grad_filter_eps", "0"]
    )
    assert (config.variant, config.hardness_mean, config.data_aware, config.ema_update, config.grad_filter_eps) == (
        "paper", 0.05, False, "optimizer_step", 0.0
    )
    clashes = {f.name for f in dataclasses.fields(DamaMethodConfig)} & {
        f.name for f in dataclasses.fields(TrainingArguments)
    }
    assert not clashes

    @dataclasses.dataclass
    class Arguments(TrainingArguments, DamaMethodConfig):
        def __post_init__(self):
            super().__post_init__()
            self.validate_method_options()

    parser = HfArgumentParser(Arguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--seed", "3", "--filter_seed", "7", "--report_to", "none"]
    )
    assert (args.seed, args.filter_seed, args.beta) == (3, 7, 0.1)
    with pytest.raises(ValueError, match="keep_ratio must lie"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--keep_ratio", "0", "--report_to", "none"])


# Plain DPO


@pytest.mark.parametrize("with_hardness", [False, True])
def test_both_strategies_off_is_textbook_dpo(with_hardness):
    beta = 0.25
    loss_module = DamaLoss(_config(beta=beta, data_aware=False, model_aware=False))
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = _random_batch(7, seed=1, scale=3.0)
    hardness = torch.randn(7) if with_hardness else None  # ignored when data_aware is off
    output = loss_module(policy_chosen, policy_rejected, ref_chosen, ref_rejected, hardness)

    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    textbook = -F.logsigmoid(beta * logits).mean()
    torch.testing.assert_close(output.loss, textbook, rtol=1e-12, atol=0)
    ours = torch.autograd.grad(output.loss, (policy_chosen, policy_rejected))
    expected = torch.autograd.grad(textbook, (policy_chosen, policy_rejected))
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert output.mask.all() and output.beta.eq(beta).all() and output.alpha_model.item() == 1.0

    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    metrics = output.metrics
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean())
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_rewards.mean())
    torch.testing.assert_close(metrics["rewards/margins"], (chosen_rewards - rejected_rewards).mean())
    torch.testing.assert_close(metrics["rewards/accuracies"], (chosen_rewards > rejected_rewards).double().mean())
    torch.testing.assert_close(metrics["logps/chosen"], policy_chosen.detach().mean())
    torch.testing.assert_close(metrics["logps/rejected"], policy_rejected.detach().mean())


# One step by hand


def test_release_step_by_hand():
    loss_module = DamaLoss(_config(), hardness_mean=0.0)
    selected = torch.tensor([True, True, False])
    output = loss_module(*_hand_batch(), _hand_hardness(), selected)

    # alpha_M = (s(1) + s(-0.5)) / 2 / s(R = 0) = (0.7310585786300049 + 0.3775406687981454) / 2 / 0.5
    alpha_m = 1.1085992474281503
    torch.testing.assert_close(output.alpha_model.item(), alpha_m, rtol=1e-14, atol=0)
    torch.testing.assert_close(output.alpha_data, torch.tensor(HAND_ALPHA_DATA, dtype=torch.float64))
    beta_c = [0.1 * a * alpha_m for a in HAND_ALPHA_DATA]
    torch.testing.assert_close(output.beta, torch.tensor(beta_c, dtype=torch.float64), rtol=1e-14, atol=0)
    # loss = (softplus(-beta_0 * 1) + softplus(-beta_1 * -0.5)) / 2: pair 2 was not selected
    expected = (_softplus(-beta_c[0] * 1.0) + _softplus(beta_c[1] * 0.5)) / 2
    torch.testing.assert_close(output.loss.item(), expected, rtol=1e-12, atol=0)
    assert output.mask.tolist() == [True, True, False] and output.num_selected.item() == 2
    # Release EMA: R = 0.9 * 0 + 0.1 * mean(1, -0.5, 0) over ALL pairs = 0.1 / 6
    torch.testing.assert_close(loss_module.running_margin.item(), 0.1 / 6, rtol=1e-14, atol=0)
    assert loss_module.missing_hardness.item() == 1 and output.metrics["dama/missing_hardness"].item() == 1


def test_paper_step_by_hand_differs_from_release():
    loss_module = DamaLoss(_config(variant="paper"), hardness_mean=0.0)
    selected = torch.tensor([True, True, False])
    output = loss_module(*_hand_batch(), _hand_hardness(), selected)
    # alpha_M = s(mean(1, -0.5)) / s(0) = s(0.25) / 0.5 = 0.5621765008857981 / 0.5, not release's 1.1085992474281503
    torch.testing.assert_close(output.alpha_model.item(), 1.1243530017715962, rtol=1e-14, atol=0)
    # Paper EMA: R = 0.1 * mean over the SELECTED pairs = 0.1 * 0.25, not release's 0.1 / 6
    torch.testing.assert_close(loss_module.running_margin.item(), 0.025, rtol=1e-14, atol=0)


def test_the_next_step_uses_the_previous_running_margin():
    loss_module = DamaLoss(_config(), hardness_mean=0.0)
    selected = torch.tensor([True, True, False])
    for _ in range(2):
        output = loss_module(*_hand_batch(), _hand_hardness(), selected)
    # Step 2 divides by s(R_1) with R_1 = 0.1 / 6, then R_2 = 0.9 * R_1 + 0.1 * (1 / 6).
    running_1 = 0.1 / 6
    alpha_m = (_sigmoid(1.0) + _sigmoid(-0.5)) / 2 / _sigmoid(running_1)
    torch.testing.assert_close(output.alpha_model.item(), alpha_m, rtol=1e-14, atol=0)
    torch.testing.assert_close(output.metrics["dama/running_margin"].item(), running_1, rtol=1e-14, atol=0)
    torch.testing.assert_close(loss_module.running_margin.item(), 0.9 * running_1 + 0.1 / 6, rtol=1e-14, atol=0)
    assert (loss_module.num_steps.item(), loss_module.num_updates.item()) == (2, 2)


def test_optimizer_step_mode_updates_once_per_optimizer_step():
    loss_module = DamaLoss(_config(ema_update="optimizer_step"), hardness_mean=0.0)
    selected = torch.tensor([True, True, False])
    alphas = [loss_module(*_hand_batch(), _hand_hardness(), selected).alpha_model.item() for _ in range(2)]
    # Both micro-batches saw R = 0; nothing moved before the optimizer step.
    assert alphas == [pytest.approx(1.1085992474281503, rel=1e-14)] * 2
    assert (loss_module.running_margin.item(), loss_module.num_updates.item()) == (0.0, 0)
    loss_module.end_optimizer_step()
    # One update towards the mean over both micro-batches (all six pairs): 0.1 * (1 / 6)
    torch.testing.assert_close(loss_module.running_margin.item(), 0.1 / 6, rtol=1e-14, atol=0)
    assert (loss_module.num_steps.item(), loss_module.num_updates.item()) == (2, 1)
    loss_module.end_optimizer_step()  # nothing recorded since: no second update
    assert loss_module.num_updates.item() == 1
    output = loss_module(*_hand_batch(), _hand_hardness(), selected)
    torch.testing.assert_close(
        output.alpha_model.item(), (_sigmoid(1.0) + _sigmoid(-0.5)) / 2 / _sigmoid(0.1 / 6), rtol=1e-14, atol=0
    )


def test_running_statistics_by_hand():
    loss_module = DamaLoss(_config(data_aware=False))
    loss_module(*_hand_batch(), selected=torch.tensor([True, True, True]))
    # margins [1, -0.5, 0]: population std sqrt(mean(z^2) - mean(z)^2) = sqrt(1.25 / 3 - 1 / 36)
    torch.testing.assert_close(
        loss_module.running_margin_std.item(), 0.1 * math.sqrt(1.25 / 3 - 1 / 36), rtol=1e-12, atol=0
    )
    base_losses = [_softplus(-0.1 * z) for z in HAND_MARGINS]
    loss_mean = sum(base_losses) / 3
    loss_std = math.sqrt(sum(x * x for x in base_losses) / 3 - loss_mean**2)
    torch.testing.assert_close(loss_module.running_loss_mean.item(), 0.1 * loss_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss_module.running_loss_std.item(), 0.1 * loss_std, rtol=1e-9, atol=0)


def test_eval_mode_leaves_the_state_untouched():
    loss_module = DamaLoss(_config(), hardness_mean=0.0)
    loss_module(*_random_batch(6, seed=2), torch.zeros(6))
    before = {k: v.clone() for k, v in loss_module.state_dict().items()}
    loss_module.eval()
    first = loss_module(*_random_batch(6, seed=3), torch.full((6,), NAN))
    again = loss_module(*_random_batch(6, seed=3), torch.full((6,), NAN))
    for name, value in loss_module.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(first.mask, again.mask) and first.loss.item() == again.loss.item()


# State and resume


@pytest.mark.parametrize("ema_update", ["micro_batch", "optimizer_step"])
def test_state_dict_round_trip_continues_identically(ema_update):
    config = _config(ema_update=ema_update, keep_ratio=0.6)
    original = DamaLoss(config, hardness_mean=0.05)
    for step in range(3):
        original(*_random_batch(8, seed=step, scale=2.0), torch.randn(8))
        if step != 1:  # leave micro-batches pending across the checkpoint in optimizer_step mode
            original.end_optimizer_step()
    resumed = DamaLoss(config)
    resumed.load_state_dict(original.state_dict())
    assert resumed.hardness_mean == 0.05
    for step in range(3, 6):
        hardness = torch.randn(8)
        outputs = [m(*_random_batch(8, seed=step, scale=2.0), hardness) for m in (original, resumed)]
        for m in (original, resumed):
            m.end_optimizer_step()
        assert torch.equal(outputs[0].mask, outputs[1].mask)
        assert outputs[0].loss.item() == outputs[1].loss.item()
        assert outputs[0].metrics.keys() == outputs[1].metrics.keys()
        for name, value in outputs[0].metrics.items():
            assert torch.equal(value, outputs[1].metrics[name]), name
    for name, value in original.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_a_cast_state_is_refused():
    loss_module = DamaLoss(_config(data_aware=False)).to(torch.float32)
    with pytest.raises(ValueError, match="keep the module in float64"):
        loss_module(*_hand_batch())


# Edge cases


def test_a_single_pair_is_selected_and_the_fallback_counted():
    loss_module = DamaLoss(_config(data_aware=False))
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (torch.tensor([v], dtype=torch.float64)
                                                                for v in (-1.0, -3.0, -2.0, -2.5))
    output = loss_module(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    # z = (-1 + 2) - (-3 + 2.5) = 1.5; alpha_M = s(1.5) / s(0); loss = softplus(-0.1 * alpha_M * 1.5)
    alpha_m = _sigmoid(1.5) / 0.5
    assert output.mask.tolist() == [True] and output.alpha_model.item() == pytest.approx(alpha_m, rel=1e-14)
    assert output.loss.item() == pytest.approx(_softplus(-0.1 * alpha_m * 1.5), rel=1e-12)
    assert output.metrics["dama/filter_fallbacks"].item() == 1 and loss_module.filter_fallbacks.item() == 1


def test_zero_filter_weights_fall_back_to_all_pairs():
    # Margins [0, 0.1, 100, 200, 300] around R = 0: all but two weights underflow to 0 even after scaling by the
    # largest (exp(-5000)), fewer than K = 4 positive weights, so the filter keeps every pair and counts it.
    loss_module = DamaLoss(_config(data_aware=False))
    zeros = torch.zeros(5, dtype=torch.float64)
    policy_chosen = torch.tensor([0.0, 0.1, 100.0, 200.0, 300.0], dtype=torch.float64)
    output = loss_module(policy_chosen, zeros, zeros, zeros)
    assert output.mask.all() and output.num_selected.item() == 5
    assert loss_module.filter_fallbacks.item() == 1


def test_non_finite_margins_are_an_error():
    loss_module = DamaLoss(_config(data_aware=False))
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = _hand_batch()
    policy_chosen[1] = NAN
    with pytest.raises(ValueError, match="reward margins of the global batch are not all finite"):
        loss_module(policy_chosen, policy_rejected, ref_chosen, ref_rejected)


def test_missing_hardness_gets_alpha_one_is_counted_and_warned(caplog):
    loss_module = DamaLoss(_config(), hardness_mean=0.3)
    with caplog.at_level(logging.WARNING, logger="dama.method.loss"):
        output = loss_module(*_hand_batch(), torch.tensor([NAN, 0.3, NAN], dtype=torch.float64))
    assert output.alpha_data.tolist() == [1.0, 1.0, 1.0]  # delta = delta_bar also gives 1
    assert loss_module.missing_hardness.item() == 2 and output.metrics["dama/missing_hardness"].item() == 2
    assert "have no hardness" in caplog.text


def test_data_aware_needs_a_hardness_mean_and_a_hardness():
    with pytest.raises(ValueError, match="needs the dataset's mean hardness delta_bar"):
        DamaLoss(_config())(*_hand_batch(), torch.zeros(3))
    with pytest.raises(ValueError, match="needs a per-pair hardness tensor"):
        DamaLoss(_config(), hardness_mean=0.0)(*_hand_batch())
    with pytest.raises(ValueError, match=r"hardness must have shape \(3,\)"):
        DamaLoss(_config(), hardness_mean=0.0)(*_hand_batch(), torch.zeros(4))


def test_config_hardness_mean_overrides_the_dataset_value():
    loss_module = DamaLoss(_config(hardness_mean=1.0), hardness_mean=0.0)
    assert loss_module.hardness_mean == 1.0
    output = loss_module(*_hand_batch(), torch.tensor([1.0, 1.0, 1.0]))
    assert output.alpha_data.tolist() == [1.0, 1.0, 1.0]  # s(1) / s(delta_bar = 1)
    loss_module = DamaLoss(_config())
    loss_module.set_hardness_mean(0.0)
    assert loss_module.hardness_mean == 0.0


def test_injected_selection_replaces_the_draw():
    loss_module = DamaLoss(_config(data_aware=False, keep_ratio=0.5))
    selected = torch.tensor([False, True, True])
    output = loss_module(*_hand_batch(), selected=selected)
    assert output.mask.tolist() == [False, True, True] and output.num_selected.item() == 2
    # alpha_M over the injected pairs only: (s(-0.5) + s(0)) / 2 / s(0)
    assert output.alpha_model.item() == pytest.approx((_sigmoid(-0.5) + 0.5) / 2 / 0.5, rel=1e-14)
    assert loss_module.filter_fallbacks.item() == 0
    with pytest.raises(ValueError, match="selected keeps no pair"):
        loss_module(*_hand_batch(), selected=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="selected must be a bool tensor"):
        loss_module(*_hand_batch(), selected=torch.ones(3))


def test_beta_floor_clamps_and_counts():
    # hardness -20 with delta_bar 0: alpha_D = s(-20) / 0.5 ~ 4e-9, so beta * alpha_D * alpha_M << beta_min.
    loss_module = DamaLoss(_config(model_aware=False), hardness_mean=0.0)
    output = loss_module(*_hand_batch(), torch.tensor([-20.0, 0.0, 0.0]))
    assert output.beta.tolist() == [1e-3, 0.1, 0.1]
    assert output.metrics["dama/beta_clamped"].item() == 1 and loss_module.beta_clamped.item() == 1
    assert output.metrics["dama/beta_min"].item() == 1e-3


def test_the_draw_is_reproducible_from_the_seed_and_changes_every_step():
    # Equal margins keep R at 0 and the weights uniform: the masks depend on the seed and the step only.
    zeros = torch.zeros(20, dtype=torch.float64)
    masks = {}
    for name, seed in (("first", 42), ("again", 42), ("other_seed", 7)):
        loss_module = DamaLoss(_config(data_aware=False, filter_seed=seed))
        masks[name] = [loss_module(zeros, zeros, zeros, zeros).mask for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(masks["first"], masks["again"], strict=True))
    assert all(int(mask.sum()) == 16 for mask in masks["first"])
    assert not torch.equal(masks["first"][0], masks["first"][1])
    assert not torch.equal(masks["first"][1], masks["first"][2])
    assert not torch.equal(masks["first"][0], masks["other_seed"][0])
    assert draw_seed(42, 0) != draw_seed(7, 0) and draw_seed(42, 0) != draw_seed(42, 1)


def test_metrics_are_complete_and_scalar():
    loss_module = DamaLoss(_config(), hardness_mean=0.0)
    output = loss_module(*_random_batch(5, seed=4), torch.randn(5))
    expected = {
        "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
        "logps/rejected", "dama/alpha_data_mean", "dama/alpha_data_min", "dama/alpha_data_max", "dama/alpha_model",
        "dama/beta_mean", "dama/beta_min", "dama/beta_max", "dama/beta_clamped", "dama/selected",
        "dama/running_margin", "dama/filter_fallbacks", "dama/missing_hardness", "dama/running_margin_std",
        "dama/running_loss_mean", "dama/running_loss_std",
    }
    assert set(output.metrics) == expected
    assert all(v.dim() == 0 and not v.requires_grad for v in output.metrics.values())
    assert output.metrics["dama/selected"].item() == 4  # floor(0.8 * 5)
    assert output.world_size == 1 and output.loss_for_ddp.item() == output.loss.item()


def test_float32_inputs_give_float32_losses_and_gradients():
    loss_module = DamaLoss(_config(), hardness_mean=0.0)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (t.detach().float() for t in _random_batch(6, seed=5))
    policy_chosen.requires_grad_()
    output = loss_module(policy_chosen, policy_rejected, ref_chosen, ref_rejected, torch.zeros(6))
    output.loss.backward()
    assert output.loss.dtype == torch.float32 and policy_chosen.grad.dtype == torch.float32
    # Only selected pairs receive a gradient: d loss / d z_i = -beta_i s(-beta_i z_i) / K for i in S, 0 otherwise.
    margins = ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)).detach().double()
    expected = -output.beta * torch.sigmoid(-output.beta * margins) * output.mask / output.num_selected
    torch.testing.assert_close(policy_chosen.grad.double(), expected, rtol=1e-5, atol=1e-8)

"""dama_sigmoid_loss: Triton kernels (interpreter on the CPU) and the torch path against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import dama_kernels
from dama_kernels.checks import LOSS_CASES, check_dama_sigmoid_loss, require
from dama_kernels.launch_config import LOSS_BLOCK

IMPLS = ["triton", "torch"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LOSS_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(impl, case, dtype, device):
    require(check_dama_sigmoid_loss(case, dtype, impl, device))


def test_grid_covers_the_hard_cases():
    """One pair, an odd count, more than two kernel blocks, a per-pair beta, a float mask with a global count."""
    counts = {case.num_pairs for case in LOSS_CASES}
    assert 1 in counts and any(n % 2 for n in counts - {1}) and max(counts) > 2 * LOSS_BLOCK
    assert any(case.beta is None for case in LOSS_CASES)
    assert any(case.mask == "float" and case.num_selected for case in LOSS_CASES)


def make_logps(num_pairs, dtype, device, spread=20.0):
    """Sequence log-probs of the size real responses have (tens to hundreds of nats), as (P,) tensors."""
    return [(torch.randn(num_pairs, device=device) * spread - 100).to(dtype) for _ in range(4)]


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_margins_stay_finite(impl, device):
    policy_chosen = torch.tensor([1e4, -1e4, 0.0, 300.0, -300.0], device=device, requires_grad=True)
    zeros = torch.zeros(5, device=device)
    out = dama_kernels.dama_sigmoid_loss(policy_chosen, zeros, zeros, zeros, 1.0, impl=impl)
    out.loss.backward()
    expected_losses = torch.tensor([0.0, 1e4, 0.6931472, 0.0, 300.0], device=device)
    torch.testing.assert_close(out.losses, expected_losses, rtol=1e-6, atol=1e-6)
    expected_grad = torch.tensor([0.0, -1.0, -0.5, 0.0, -1.0], device=device) / 5
    torch.testing.assert_close(policy_chosen.grad, expected_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_reaches_policy_only(impl, device):
    logps = [t.requires_grad_(True) for t in make_logps(8, torch.float32, device)]
    beta = torch.full((8,), 0.1, device=device, requires_grad=True)
    mask = torch.ones(8, device=device, requires_grad=True)
    out = dama_kernels.dama_sigmoid_loss(*logps, beta, mask=mask, impl=impl)
    out.loss.backward()
    assert logps[0].grad is not None and logps[1].grad is not None
    assert logps[2].grad is None and logps[3].grad is None
    assert beta.grad is None and mask.grad is None
    for detached in (out.margins, out.chosen_rewards, out.rejected_rewards):
        assert not detached.requires_grad


def test_torch_path_gradcheck_float64():
    logps = make_logps(6, torch.float64, "cpu", spread=2.0)
    beta = torch.rand(6, dtype=torch.float64) + 0.1
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)

    def fn(policy_chosen, policy_rejected):
        out = dama_kernels.dama_sigmoid_loss(policy_chosen, policy_rejected, logps[2] + 90, logps[3] + 90, beta,
                                             mask=mask, impl="torch")
        return out.loss, out.losses

    inputs = tuple(t.detach().clone().requires_grad_(True) for t in logps[:2])
    assert torch.autograd.gradcheck(fn, inputs)


def test_triton_and_torch_agree(device):
    logps = make_logps(300, torch.float32, device)
    beta = torch.rand(300, device=device)
    outs = [dama_kernels.dama_sigmoid_loss(*logps, beta, impl=impl) for impl in IMPLS]
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(policy_chosen_logps=torch.zeros(4, 1)), r"policy_chosen_logps must be \(P,\)"),
        (dict(policy_chosen_logps=torch.zeros(0)), "P >= 1"),
        (dict(ref_rejected_logps=torch.zeros(3)), r"ref_rejected_logps must have shape \(4,\)"),
        (dict(policy_rejected_logps=torch.zeros(4, dtype=torch.long)), "dtype torch.int64"),
        (dict(beta=torch.ones(3)), r"beta must be a float or have shape \(4,\)"),
        (dict(beta=float("nan")), "beta has non-finite values"),
        (dict(mask=torch.ones(5)), r"mask must be a float or have shape \(4,\)"),
        (dict(num_selected=0), "num_selected must be a positive scalar"),
        (dict(impl="fast"), "impl must be one of"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, message):
    args = dict(policy_chosen_logps=torch.zeros(4), policy_rejected_logps=torch.zeros(4),
                ref_chosen_logps=torch.zeros(4), ref_rejected_logps=torch.zeros(4), beta=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        dama_kernels.dama_sigmoid_loss(**args)

"""dama_sigmoid_loss: Triton kernels (interpreter on the CPU) and the torch path against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import dama_kernels
from dama_kernels.reference import reference_dama_sigmoid_loss
from tests.kernel_checks import assert_matches_gold, poisoned_allocations

IMPLS = ["triton", "torch"]
OUTPUT_NAMES = ("loss", "losses", "margins", "chosen_rewards", "rejected_rewards")


def make_logps(num_pairs, dtype, device, spread=20.0):
    """Sequence log-probs of the size real responses have (tens to hundreds of nats), as (P,) tensors."""
    return [(torch.randn(num_pairs, device=device) * spread - 100).to(dtype) for _ in range(4)]


def run_both(impl, logps, beta, grad_loss, grad_losses, **kwargs):
    """Ours and the float64 / fp32 references: values and gradients w.r.t. the two policy inputs."""
    results = {}
    for name in ("ours", "gold", "base"):
        policy = [t.detach().clone().requires_grad_(True) for t in logps[:2]]
        if name == "ours":
            with poisoned_allocations():
                out = dama_kernels.dama_sigmoid_loss(*policy, *logps[2:], beta, impl=impl, **kwargs)
                objective = out.loss * grad_loss + (out.losses * grad_losses).sum()
                grads = torch.autograd.grad(objective, policy)
        else:
            dtype = torch.float64 if name == "gold" else torch.float32
            out = reference_dama_sigmoid_loss(*policy, *logps[2:], beta, compute_dtype=dtype, **kwargs)
            objective = out[0] * grad_loss + (out[1] * grad_losses.to(dtype)).sum()
            grads = torch.autograd.grad(objective, policy)
        results[name] = (list(out), list(grads))
    return results


def check(results, dtype):
    (ours, ours_grads), (gold, gold_grads), (base, base_grads) = (results[k] for k in ("ours", "gold", "base"))
    for name, value, gold_value, base_value in zip(OUTPUT_NAMES, ours, gold, base, strict=True):
        assert_matches_gold(value, gold_value, base_value, torch.float32, name)
    for name, grad, gold_grad, base_grad in zip(("d_policy_chosen", "d_policy_rejected"), ours_grads, gold_grads,
                                                base_grads, strict=True):
        assert grad.dtype == dtype
        assert_matches_gold(grad, gold_grad, base_grad.to(dtype), dtype, name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_pairs", [1, 37, 2500])  # one pair, an odd count, more than two kernel blocks
def test_matches_reference_per_pair_beta_and_mask(impl, num_pairs, device):
    logps = make_logps(num_pairs, torch.float32, device)
    beta = torch.rand(num_pairs, device=device) * 0.3 + 1e-3
    mask = torch.rand(num_pairs, device=device) < 0.7
    grad_loss, grad_losses = torch.tensor(1.7), torch.randn(num_pairs, device=device)
    check(run_both(impl, logps, beta, grad_loss, grad_losses, mask=mask, base_beta=0.1), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs(impl, dtype, device):
    logps = make_logps(29, dtype, device)
    check(run_both(impl, logps, 0.1, torch.tensor(1.0), torch.zeros(29, device=device)), dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_global_normaliser_and_float_mask(impl, device):
    """num_selected given by a data-parallel caller: the loss is the local masked sum over the global count."""
    logps = make_logps(16, torch.float32, device)
    mask = (torch.rand(16, device=device) < 0.5).float()
    check(run_both(impl, logps, 0.25, torch.tensor(-0.5), torch.zeros(16, device=device), mask=mask,
                   num_selected=40.0), torch.float32)


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

"""The fused head's per-call cost: no tensor value is read on the host (a sync on a GPU) unless asked.

On CUDA tensors the value checks run only with DAMA_KERNELS_CHECK_VALUES=1, and gather_supervised=False skips the
search for ignored rows. Here, on the CPU, the CUDA rule is applied by switching the checks off, and every aten op that
hands a value to the host (`_local_scalar_dense`, behind .item() and bool(tensor), and nonzero, which must learn its
size) is recorded.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dama_kernels
import dama_kernels.functional as functional
from dama_kernels.checks import LogprobCase, make_logprob_inputs

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class HostReadRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def training_step(impl: str, gather_supervised: bool, ignored_fraction: float = 0.0) -> list[torch.Tensor]:
    """sequence_logps of four sequences and the DAMA loss of their two pairs, forward and backward."""
    case = LogprobCase("step", 70, 24, 150, ignored_fraction=ignored_fraction)
    inputs = make_logprob_inputs(case, torch.float32, "cpu")
    hidden, weight = (t.detach().requires_grad_(True) for t in (inputs.hidden, inputs.weight))
    seq_ids = torch.arange(70) % 4
    logps = dama_kernels.sequence_logps(hidden, weight, inputs.labels, seq_ids, 4, bias=inputs.bias, impl=impl,
                                        gather_supervised=gather_supervised)
    ref = torch.full((2,), -200.0)
    out = dama_kernels.dama_sigmoid_loss(logps[:2], logps[2:], ref, ref, torch.rand(2), mask=torch.ones(2) > 0,
                                         base_beta=0.1, impl=impl)
    return torch.autograd.grad(out.loss, (hidden, weight))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_step_reads_no_value_on_the_host_when_checks_are_off(impl, monkeypatch):
    monkeypatch.setattr(functional, "checks_values", lambda device: False)
    recorder = HostReadRecorder()
    with recorder:
        training_step(impl, gather_supervised=False)
    assert recorder.reads == []


def test_the_checks_and_the_row_search_are_what_reads_values():
    """The recorder above can fail: with the checks on, or with the search for ignored rows, values are read."""
    for gather_supervised in (True, False):
        recorder = HostReadRecorder()
        with recorder:
            training_step("torch", gather_supervised)
        assert recorder.reads, gather_supervised


def test_value_checks_follow_the_device_and_the_switch(monkeypatch):
    monkeypatch.delenv(functional.CHECK_VALUES_VARIABLE, raising=False)
    assert functional.checks_values(torch.device("cpu"))
    assert not functional.checks_values(torch.device("cuda", 0))
    monkeypatch.setenv(functional.CHECK_VALUES_VARIABLE, "1")
    assert functional.checks_values(torch.device("cuda", 0))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_scoring_every_row_gives_the_gathered_result(impl):
    """gather_supervised=False runs the ignored rows through the kernels: log-prob 0 and no gradient for them."""
    torch.manual_seed(0)
    gathered = training_step(impl, True, ignored_fraction=0.4)
    torch.manual_seed(0)
    every_row = training_step(impl, False, ignored_fraction=0.4)
    for a, b in zip(gathered, every_row, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

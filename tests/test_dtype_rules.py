"""What the log-prob kernels receive in a real run: autocast's dtype as F.linear would take it, TF32 as cuBLAS would."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import dama_kernels
import dama_kernels.linear_logprob_function as function_module
from dama_kernels.launch_config import INTERPRETER_BLOCKS
from dama_kernels.linear_logprob_backward import linear_logprob_d_logits_launch
from dama_kernels.linear_logprob_forward import linear_logprob_fwd_launch
from dama_kernels.reference import reference_token_logps

LAUNCHERS = ("linear_logprob_fwd_triton", "linear_logprob_bwd_triton", "linear_logprob_fwd_torch",
             "linear_logprob_bwd_torch")


@pytest.fixture
def received(monkeypatch):
    """Records, per launcher call, the dtypes of hidden / weight / bias and whether autocast was still on."""
    calls = []

    def spy(name, launcher):
        def wrapped(*args):
            hidden, weight, bias = (args[1], args[2], args[4]) if "bwd" in name else (args[0], args[1], args[3])
            calls.append({
                "launcher": name,
                "dtypes": (hidden.dtype, weight.dtype, None if bias is None else bias.dtype),
                "autocast": torch.is_autocast_enabled(hidden.device.type),
            })
            return launcher(*args)
        return wrapped

    for name in LAUNCHERS:
        monkeypatch.setattr(function_module, name, spy(name, getattr(function_module, name)))
    return calls


@pytest.fixture
def fp32_precision():
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


def make_inputs(dtype=torch.float32, weight_dtype=None, num_tokens=70, hidden_size=40, vocab_size=150):
    hidden = torch.randn(num_tokens, hidden_size).to(dtype).requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size) / hidden_size**0.5).to(weight_dtype or dtype).requires_grad_()
    bias = torch.randn(vocab_size).to(weight_dtype or dtype).requires_grad_()
    labels = torch.randint(0, vocab_size, (num_tokens,))
    labels[::7] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_autocast_inputs_reach_the_kernels_as_f_linear_takes_them(impl, autocast_dtype, input_dtypes, received):
    hidden, weight, bias, labels = make_inputs(*input_dtypes)
    with torch.autocast("cpu", dtype=autocast_dtype):
        expected = F.linear(hidden, weight, bias).dtype
        out = dama_kernels.token_logps(hidden, weight, labels, bias=bias, impl=impl)
    assert expected == autocast_dtype
    out.backward(torch.randn_like(out))

    assert [call["launcher"] for call in received] == [f"linear_logprob_fwd_{impl}", f"linear_logprob_bwd_{impl}"]
    for call in received:
        assert call["dtypes"] == (expected, expected, expected)
        assert not call["autocast"], "autocast must be off inside the head, else the torch path's matmul is 16-bit"
    # The softmax stays fp32: values match float64 maths on the autocast-rounded inputs to fp32 accuracy.
    assert out.dtype == torch.float32
    gold = reference_token_logps(hidden.to(expected), weight.to(expected), labels, bias.to(expected))
    torch.testing.assert_close(out.double(), gold, rtol=0, atol=2e-5)
    # The casts are differentiable: each input gets its gradient in its own dtype.
    for tensor in (hidden, weight, bias):
        assert tensor.grad is not None and tensor.grad.dtype == tensor.dtype


def test_autocast_leaves_float64_alone_like_f_linear(received):
    hidden, weight, bias, labels = make_inputs(torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(hidden, weight, bias).dtype
        out = dama_kernels.token_logps(hidden, weight, labels, bias=bias, impl="torch")
    assert expected == torch.float64
    assert received[0]["dtypes"] == (torch.float64,) * 3
    assert out.dtype == torch.float64


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_no_autocast_for_the_tensors_device_means_no_cast(impl, received):
    hidden, weight, bias, labels = make_inputs()
    dama_kernels.token_logps(hidden, weight, labels, bias=bias, impl=impl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on a machine without CUDA, torch warns that it disables CUDA autocast
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert F.linear(hidden, weight, bias).dtype == torch.float32
            dama_kernels.token_logps(hidden, weight, labels, bias=bias, impl=impl)
    assert [call["dtypes"] for call in received] == [(torch.float32,) * 3] * 2


def test_mixed_dtypes_outside_autocast_are_refused():
    hidden, weight, bias, labels = make_inputs(torch.float16, torch.float32)
    with pytest.raises(ValueError, match="must share a dtype"):
        dama_kernels.token_logps(hidden, weight, labels, impl="torch")


def dot_arguments(dtype: torch.dtype) -> list[tuple[bool, str]]:
    """(UPCAST_DOT, INPUT_PRECISION) of the forward and the backward's d_logits launches for `dtype` (meta tensors)."""
    hidden = torch.empty(8, 16, dtype=dtype, device="meta")
    weight = torch.empty(32, 16, dtype=dtype, device="meta")
    labels = torch.empty(8, dtype=torch.int64, device="meta")
    per_token = torch.empty(8, device="meta")
    forward = linear_logprob_fwd_launch(hidden, weight, labels, None, INTERPRETER_BLOCKS)[0]
    d_logits = torch.empty(8, 32, dtype=dtype, device="meta")
    backward = linear_logprob_d_logits_launch(d_logits, hidden, weight, labels, None, per_token, per_token, per_token,
                                              -100, INTERPRETER_BLOCKS)
    return [(launch.arguments["UPCAST_DOT"], launch.arguments["INPUT_PRECISION"]) for launch in (forward, backward)]


@pytest.mark.parametrize(
    "precision, dtype, expected",
    [
        ("highest", torch.float32, (True, "ieee")),
        ("high", torch.float32, (True, "tf32x3")),
        ("medium", torch.float32, (True, "tf32x3")),
        ("high", torch.bfloat16, (False, "ieee")),
        ("highest", torch.float16, (False, "ieee")),
    ],
)
def test_fp32_products_follow_float32_matmul_precision_on_a_gpu(precision, dtype, expected, fp32_precision,
                                                                monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # build the launch a GPU would get (nothing is launched)
    fp32_precision(precision)
    assert dot_arguments(dtype) == [expected, expected]


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_interpreter_always_upcasts_to_ieee(precision, fp32_precision, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fp32_precision(precision)
    for dtype in (torch.float32, torch.bfloat16):
        assert dot_arguments(dtype) == [(True, "ieee")] * 2

"""The attention kernels of packed and prefix-shared rows: PyTorch's varlen_attn and flash-attn's varlen function.

On the CPU: the varlen_attn call site against varlen_attn's documented contract, for both causal forms it has had
(`is_causal=True` in PyTorch 2.10-2.11, `window_size=(-1, 0)` from 2.12) and with or without `enable_gqa`. A stand-in
checks every argument and computes the attention from the bounds it is given, so wrong bounds give wrong values.
On CUDA: both kernels against the float64 reference, values and gradients, for both layouts; and the policy's
forward and backward with every host sync made an error.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

import dama.model.attention as attention
from dama.model.attention import _flash_varlen, _torch_varlen, _varlen_call_form, packed_attention

from .test_attention import _bounds, _dense_reference, _prefix_shared_segments

PAIRS = [(3, 5, 5), (1, 1, 9), (6, 12, 1), (2, 4, 2)]


def _reference_by_segments(query, key, value, cu_q, cu_k, scale, causal, groups):
    """Per segment k: queries q[cu_q[k]:cu_q[k+1]] over keys k[cu_k[k]:cu_k[k+1]], causal aligned bottom right (query
    i of Lq sees keys j <= i + Lk - Lq), head h reading key head h // groups; float64."""
    outputs = []
    for (qa, qb), (ka, kb) in zip(pairwise(cu_q.tolist()), pairwise(cu_k.tolist()), strict=True):
        keys = key[ka:kb].double().repeat_interleave(groups, dim=1)
        values = value[ka:kb].double().repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[qa:qb].double(), keys) * scale
        if causal:
            hidden = torch.ones(qb - qa, kb - ka, dtype=torch.bool).triu((kb - ka) - (qb - qa) + 1)
            scores = scores.masked_fill(hidden, -math.inf)
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values))
    return torch.cat(outputs).to(query.dtype)


def _varlen_attn_by_its_contract(calls: list, causal_form: str, takes_gqa: bool):
    """A stand-in for torch.nn.attention.varlen.varlen_attn with the signature of one release, written from its
    documentation: query (T_q, H_q, D), key/value (T_k, H_kv, D), int32 cumulative bounds on the inputs' device,
    Python-int max lengths, H_q == H_kv unless enable_gqa. It records its arguments and computes the answer."""

    def check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, causal, enable_gqa):
        assert query.dim() == key.dim() == value.dim() == 3 and key.shape == value.shape
        assert query.shape[2] == key.shape[2] and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        for bounds in (cu_seq_q, cu_seq_k):
            assert bounds.dtype == torch.int32 and bounds.device == query.device and bounds.dim() == 1
        assert cu_seq_q.shape == cu_seq_k.shape
        assert (int(cu_seq_q[-1]), int(cu_seq_k[-1])) == (query.shape[0], key.shape[0])
        assert type(max_q) is int and type(max_k) is int
        assert max_q == int((cu_seq_q[1:] - cu_seq_q[:-1]).max()) and max_k == int((cu_seq_k[1:] - cu_seq_k[:-1]).max())
        if enable_gqa:
            assert query.shape[1] % key.shape[1] == 0
        else:
            assert query.shape[1] == key.shape[1], "varlen_attn refuses H_q != H_kv without enable_gqa"
        calls.append({"cu_q": cu_seq_q.tolist(), "cu_k": cu_seq_k.tolist(), "max": (max_q, max_k), "causal": causal,
                      "gqa": enable_gqa, "key_rows": key.shape[0], "kv_heads": key.shape[1]})
        groups = query.shape[1] // key.shape[1]
        return _reference_by_segments(query, key, value, cu_seq_q, cu_seq_k, scale, causal, groups)

    if causal_form == "is_causal":  # PyTorch 2.10-2.11
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        is_causal=False):
            return check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, is_causal, False)
    elif takes_gqa:  # 2.13
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
            assert window_size in ((-1, -1), (-1, 0))
            return check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size == (-1, 0),
                         enable_gqa)
    else:  # 2.12
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), seqused_k=None):
            assert window_size in ((-1, -1), (-1, 0))
            return check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size == (-1, 0), False)

    return varlen_attn


@pytest.mark.parametrize("release", [("is_causal", False), ("window_size", False), ("window_size", True)],
                         ids=["torch-2.10", "torch-2.12", "torch-2.13"])
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_varlen_call_site_keeps_the_contract(monkeypatch, release, layout, heads):
    calls = []
    stand_in = _varlen_attn_by_its_contract(calls, *release)
    monkeypatch.setattr(attention, "_torch_varlen", lambda: stand_in)
    monkeypatch.setattr(attention, "_resolve_impl", lambda impl, query, dropout: "varlen")
    (query_lengths, key_index, key_lengths), allowed = _prefix_shared_segments(PAIRS)
    num_heads, num_kv_heads = heads
    query = torch.randn(allowed.shape[0], num_heads, 8, requires_grad=True)
    key, value = (torch.randn(allowed.shape[0], num_kv_heads, 8, requires_grad=True) for _ in range(2))
    if layout == "prefix_shared":
        segments = {"key_index": key_index, "cu_seqlens_k": _bounds(key_lengths), "max_seqlen_k": max(key_lengths)}
    else:
        # The same tokens as one segment per pair: every token sees its pair's earlier tokens.
        query_lengths = key_lengths = [p + c + r for p, c, r in PAIRS]
        allowed = torch.zeros_like(allowed)
        for a, b in pairwise(_bounds(query_lengths).tolist()):
            allowed[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        segments = {}
    output = packed_attention(query, key, value, _bounds(query_lengths), max(query_lengths), scaling=0.5, **segments)
    expected = _dense_reference(query, key, value, allowed, 0.5)
    torch.testing.assert_close(output, expected.float(), atol=2e-5, rtol=1e-5)
    grad_output = torch.randn_like(output)
    grads = torch.autograd.grad(output, (query, key, value), grad_output)
    expected_grads = torch.autograd.grad(expected, (query, key, value), grad_output.double())
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad.float(), atol=5e-5, rtol=1e-4)

    (call,) = calls
    assert call["cu_q"] == _bounds(query_lengths).tolist() and call["cu_k"] == _bounds(key_lengths).tolist()
    assert call["max"] == (max(query_lengths), max(key_lengths)) and call["key_rows"] == sum(key_lengths)
    assert call["causal"] is True
    grouped = num_heads != num_kv_heads
    assert call["gqa"] == (grouped and release[1])
    # Without enable_gqa the key/value heads are repeated before the call; with it they go as they are.
    assert call["kv_heads"] == (num_heads if grouped and not release[1] else num_kv_heads)


def test_varlen_call_site_reads_no_bound_values(monkeypatch):
    """The kernel path hands the bounds on without reading them (on a GPU a read waits for the device): bounds that
    the collator would refuse reach the kernel untouched, and only the "segments" path checks them."""
    calls = []
    monkeypatch.setattr(attention, "_torch_varlen", lambda: lambda *args, **kwargs: calls.append(args) or args[0])
    monkeypatch.setattr(attention, "_varlen_call_form", lambda function: ({"window_size": (-1, 0)}, True))
    monkeypatch.setattr(attention, "_resolve_impl", lambda impl, query, dropout: impl)
    query = torch.randn(6, 2, 4)
    unchecked = torch.tensor([0, 4, 4, 6], dtype=torch.int32)  # an empty segment
    packed_attention(query, query, query, unchecked, 4, impl="varlen")
    assert calls[0][3] is unchecked or torch.equal(calls[0][3], unchecked)
    with pytest.raises(ValueError, match="rise strictly from 0 to the 6 packed tokens"):
        packed_attention(query, query, query, unchecked, 4, impl="segments")
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D integer tensor"):
        packed_attention(query, query, query, unchecked.float(), 4, impl="varlen")
    with pytest.raises(ValueError, match="one key segment per query segment"):
        packed_attention(query, query, query, _bounds([4, 2]), 4, key_index=torch.arange(6),
                         cu_seqlens_k=_bounds([6]), max_seqlen_k=6, impl="varlen")


def test_varlen_call_form_follows_the_signature():
    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False):
        return query

    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
            enable_gqa=False):
        return query

    def neither(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
        return query

    assert _varlen_call_form(old) == ({"is_causal": True}, False)
    assert _varlen_call_form(new) == ({"window_size": (-1, 0)}, True)
    with pytest.raises(ValueError, match="takes neither window_size nor is_causal"):
        _varlen_call_form(neither)
    if _torch_varlen() is not None:  # the installed torch's own function has one of the two forms
        assert _varlen_call_form(_torch_varlen())[0] in ({"is_causal": True}, {"window_size": (-1, 0)})


KERNELS = [
    pytest.param("varlen", marks=pytest.mark.skipif(not torch.cuda.is_available() or _torch_varlen() is None,
                                                    reason="needs CUDA and torch >= 2.10")),
    pytest.param("flash_attn", marks=pytest.mark.skipif(not torch.cuda.is_available() or _flash_varlen() is None,
                                                        reason="needs CUDA and flash-attn")),
]


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
def test_kernel_matches_the_float64_reference(impl, layout, heads):
    """|kernel - gold| <= 2 |exact bf16 path - gold| + 2e-3 max |gold|, for the output and the three gradients."""
    pairs = [(40, 33, 130), (7, 1, 64), (600, 150, 170)]
    (query_lengths, key_index, key_lengths), allowed = _prefix_shared_segments(pairs)
    if layout == "packed":
        query_lengths = [p + c + r for p, c, r in pairs]
        segments = {}
        allowed = torch.zeros_like(allowed)
        for a, b in pairwise(_bounds(query_lengths).tolist()):
            allowed[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    else:
        segments = {"key_index": key_index.cuda(), "cu_seqlens_k": _bounds(key_lengths).cuda(),
                    "max_seqlen_k": max(key_lengths)}
    num_tokens, (num_heads, num_kv_heads) = allowed.shape[0], heads
    inputs = [torch.randn(num_tokens, h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for h in (num_heads, num_kv_heads, num_kv_heads)]
    bounds = _bounds(query_lengths).cuda()
    grad_output = torch.randn(num_tokens, num_heads, 64, device="cuda", dtype=torch.bfloat16)
    gold = _dense_reference(*inputs, allowed.cuda(), 64 ** -0.5)
    gold_grads = torch.autograd.grad(gold, inputs, grad_output.double())
    results = {}
    for name in (impl, "segments"):
        output = packed_attention(*inputs, bounds, max(query_lengths), impl=name, **segments)
        results[name] = (output, *torch.autograd.grad(output, inputs, grad_output))
    for part, expected in enumerate((gold, *gold_grads)):
        error = (results[impl][part].double() - expected).abs().max()
        baseline = (results["segments"][part].double() - expected).abs().max()
        assert error <= 2 * baseline + 2e-3 * expected.abs().max(), (part, float(error), float(baseline))

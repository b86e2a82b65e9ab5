"""token_logps / sequence_logps: Triton kernels (interpreter on the CPU) and the chunked torch path against float64."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dama_kernels
from dama_kernels.checks import (
    FP32_DIRECT,
    LOGPROB_CASES,
    TOLERANCES,
    LogprobCase,
    check_sequence_logps,
    check_token_logps,
    compare_to_gold,
    make_logprob_inputs,
    poisoned_allocations,
    require,
)
from dama_kernels.launch_config import INTERPRETER_BLOCKS, LinearLogprobBlocks
from dama_kernels.linear_logprob_backward import (
    CHUNK_ROW_MULTIPLE,
    D_LOGITS_CHUNK_BYTES,
    MAX_ROUNDED_CHUNKS,
    backward_chunk_rows,
    linear_logprob_bwd_triton,
)
from dama_kernels.linear_logprob_forward import linear_logprob_fwd_triton
from dama_kernels.reference import reference_sequence_logps, reference_token_logps

IMPLS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The LLaVA-sized head (a few G multiply-adds) is for `dama selftest`; the interpreter takes the others in seconds.
CASES = [case for case in LOGPROB_CASES if case.multiply_adds <= 10**8]


def make_inputs(num_tokens, hidden_size, vocab_size, dtype, device, *, ignore_index=-100, logit_scale=1.0,
                ignored_fraction=0.25, with_bias=True):
    case = LogprobCase("test", num_tokens, hidden_size, vocab_size, logit_scale, ignored_fraction, ignore_index,
                       with_bias)
    inputs = make_logprob_inputs(case, dtype, device)
    return inputs.hidden, inputs.weight, inputs.bias, inputs.labels


def leaf(tensor):
    return None if tensor is None else tensor.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logps_matches_reference(impl, case, dtype, device):
    require(check_token_logps(case, dtype, impl, device, chunk_size=32))  # several chunks on the torch path


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequence_logps_matches_reference(impl, case, dtype, device):
    require(check_sequence_logps(case, dtype, impl, device))


def test_grid_covers_the_hard_cases():
    """The grid keeps what the checks above must see: one token, no bias, a positive ignore_index, peaked and
    ill-conditioned logits, a hidden size that is not a multiple of the K step."""
    assert any(case.num_tokens == 1 for case in CASES)
    assert any(not case.with_bias and case.ignore_index >= 0 for case in CASES)
    assert {case.well_conditioned for case in CASES if case.logit_scale > 1} == {True, False}
    assert any(case.hidden_size % 64 and case.vocab_size > 256 and case.num_tokens > 128 for case in CASES)


def test_vocab_split_forward_matches_single_range(device):
    """The split-vocabulary grid (used on GPUs when N is small) combines its partial normalisers exactly."""
    hidden, weight, bias, labels = make_inputs(77, 48, 700, torch.float32, device)
    single, max_single, norm_single = linear_logprob_fwd_triton(hidden, weight, labels, bias, -100, INTERPRETER_BLOCKS)
    split_blocks = LinearLogprobBlocks(block_n=64, block_v=128, block_h=64, vocab_splits=3)
    split, max_split, norm_split = linear_logprob_fwd_triton(hidden, weight, labels, bias, -100, split_blocks)
    gold = reference_token_logps(hidden, weight, labels, bias)
    torch.testing.assert_close(split.double(), gold, rtol=0, atol=2e-5)
    torch.testing.assert_close(max_split + norm_split, max_single + norm_single, rtol=0, atol=2e-5)
    torch.testing.assert_close(split, single, rtol=0, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_partial_requires_grad(impl, needs, device):
    hidden, weight, bias, labels = make_inputs(65, 20, 140, torch.float32, device)
    inputs = [t.detach().clone().requires_grad_(need) for t, need in zip((hidden, weight, bias), needs, strict=True)]
    out = dama_kernels.token_logps(inputs[0], inputs[1], labels, bias=inputs[2], impl=impl)
    grad_out = torch.randn(65, device=device)
    out.backward(grad_out)
    gold_inputs = [leaf(t) for t in (hidden, weight, bias)]
    gold = reference_token_logps(gold_inputs[0], gold_inputs[1], labels, gold_inputs[2])
    gold.backward(grad_out.double())
    for tensor, gold_tensor, need in zip(inputs, gold_inputs, needs, strict=True):
        if need:
            torch.testing.assert_close(tensor.grad, gold_tensor.grad, rtol=1e-4, atol=1e-5)
        else:
            assert tensor.grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logps_packed_any_order(impl, device):
    """Sequences of lengths 1, 70 (longer than a block), 5 and 0 supervised tokens, tokens interleaved at random."""
    lengths = [1, 70, 5, 12]
    num_seqs = len(lengths)
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    seq_ids = seq_ids[torch.randperm(len(seq_ids))].to(device)
    hidden, weight, bias, labels = make_inputs(len(seq_ids), 36, 260, torch.float32, device, ignored_fraction=0.2)
    labels[seq_ids == 3] = -100  # sequence 3: every token ignored
    labels[seq_ids == 0] = 7
    inputs = [leaf(t) for t in (hidden, weight, bias)]
    grad_out = torch.randn(num_seqs, device=device)
    with poisoned_allocations():
        out = dama_kernels.sequence_logps(inputs[0], inputs[1], labels, seq_ids, num_seqs, bias=inputs[2], impl=impl)
        grads = torch.autograd.grad(out, inputs, grad_out)
    gold_inputs = [leaf(t) for t in (hidden, weight, bias)]
    gold = reference_sequence_logps(gold_inputs[0], gold_inputs[1], labels, seq_ids, num_seqs, gold_inputs[2])
    gold_grads = torch.autograd.grad(gold, gold_inputs, grad_out.double())
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-4)
    for grad, gold_grad in zip(grads, gold_grads, strict=True):
        torch.testing.assert_close(grad, gold_grad, rtol=1e-4, atol=1e-5)
    assert out[3] == 0
    assert (grads[0][seq_ids == 3] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_every_token_ignored(impl, device):
    hidden, weight, bias, labels = make_inputs(9, 16, 40, torch.float32, device)
    labels[:] = -100
    inputs = [leaf(t) for t in (hidden, weight, bias)]
    seq_ids = torch.zeros(9, dtype=torch.long, device=device)
    out = dama_kernels.sequence_logps(inputs[0], inputs[1], labels, seq_ids, 2, bias=inputs[2], impl=impl)
    assert torch.equal(out, torch.zeros(2, device=device))


def test_torch_path_gradcheck_float64():
    hidden, weight, bias, labels = make_inputs(11, 6, 13, torch.float64, "cpu")
    inputs = tuple(leaf(t) for t in (hidden, weight, bias))

    def fn(h, w, b):
        return dama_kernels.token_logps(h, w, labels, bias=b, impl="torch", chunk_size=4)

    assert torch.autograd.gradcheck(fn, inputs)


class LargestOutputRecorder(TorchDispatchMode):
    """Records the largest tensor (in bytes) any aten op produces while active, forward and backward.

    Bytes rather than elements: the Triton interpreter copies kernel arguments as untyped (uint8) storages.
    """

    def __init__(self):
        super().__init__()
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest_bytes = max(self.largest_bytes, tensor.numel() * tensor.element_size())
        return out


def test_torch_path_never_allocates_tokens_by_vocab():
    num_tokens, hidden_size, vocab_size, chunk = 512, 32, 1000, 64
    hidden, weight, bias, labels = make_inputs(num_tokens, hidden_size, vocab_size, torch.float32, "cpu")
    inputs = [leaf(t) for t in (hidden, weight, bias)]
    recorder = LargestOutputRecorder()
    with recorder:
        out = dama_kernels.token_logps(inputs[0], inputs[1], labels, bias=inputs[2], impl="torch", chunk_size=chunk)
        out.sum().backward()
    # The chunk's fp32 logits are the largest working tensor; the (V, H) weight gradient is an output, not working
    # memory.
    assert recorder.largest_bytes >= chunk * vocab_size * 4
    assert recorder.largest_bytes <= max(chunk * vocab_size, vocab_size * hidden_size) * 4
    assert recorder.largest_bytes < num_tokens * vocab_size * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_never_allocates_tokens_by_vocab(dtype, device):
    num_tokens, hidden_size, vocab_size, chunk = 512, 32, 1000, 64
    hidden, weight, bias, labels = make_inputs(num_tokens, hidden_size, vocab_size, dtype, device)
    _, max_logit, log_norm = linear_logprob_fwd_triton(hidden, weight, labels, bias, -100, INTERPRETER_BLOCKS)
    grad_out = torch.randn(num_tokens, device=device)
    recorder = LargestOutputRecorder()
    with recorder:
        linear_logprob_bwd_triton(grad_out, hidden, weight, labels, bias, max_logit, log_norm, -100,
                                  INTERPRETER_BLOCKS, (True, True, True), chunk_rows=chunk)
    # One chunk's d_logits (or its fp32 copy on the CPU) is the largest working tensor; the (V, H) fp32 d_weight
    # accumulator is the gradient itself. An (N, V) tensor in the input dtype or wider breaks the last bound.
    assert recorder.largest_bytes >= chunk * vocab_size * dtype.itemsize
    assert recorder.largest_bytes <= max(chunk * vocab_size, vocab_size * hidden_size) * 4
    assert recorder.largest_bytes < num_tokens * vocab_size * dtype.itemsize


def reference_grads(hidden, weight, bias, labels, grad_out, compute_dtype):
    """Gradients of the reference token log-probs w.r.t. (hidden, weight, bias), computed in `compute_dtype`."""
    leaves = [t.detach().requires_grad_(True) for t in (hidden, weight, bias)]
    out = reference_token_logps(leaves[0], leaves[1], labels, leaves[2], -100, compute_dtype)
    return torch.autograd.grad(out, leaves, grad_out.to(compute_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk_rows", [64, 50])
def test_triton_backward_chunks_match_one_chunk(dtype, chunk_rows, device):
    """Chunks of 64 rows (4 chunks: a 16-bit d_weight is summed in its own dtype) and of 50 rows (5 chunks, not a
    multiple of the row block: more than MAX_ROUNDED_CHUNKS, so a 16-bit d_weight is summed in fp32), the last one
    short, against one chunk of all 217 rows."""
    num_tokens = 217
    assert (-(-num_tokens // chunk_rows) <= MAX_ROUNDED_CHUNKS) == (chunk_rows == 64)
    hidden, weight, bias, labels = make_inputs(num_tokens, 40, 300, dtype, device)
    _, max_logit, log_norm = linear_logprob_fwd_triton(hidden, weight, labels, bias, -100, INTERPRETER_BLOCKS)
    grad_out = torch.randn(num_tokens, device=device)

    def backward(chunk_rows):
        with poisoned_allocations():
            return linear_logprob_bwd_triton(grad_out, hidden, weight, labels, bias, max_logit, log_norm, -100,
                                             INTERPRETER_BLOCKS, (True, True, True), chunk_rows=chunk_rows)

    chunked, single = backward(chunk_rows), backward(None)
    gold_grads, base_grads = (reference_grads(hidden, weight, bias, labels, grad_out, compute_dtype)
                              for compute_dtype in (torch.float64, torch.float32))
    names = ("d_hidden", "d_weight", "d_bias")
    for name, grad, one_chunk, gold_grad, base_grad in zip(names, chunked, single, gold_grads, base_grads,
                                                           strict=True):
        assert grad.dtype == dtype
        require([compare_to_gold(grad, gold_grad, base_grad.to(dtype), TOLERANCES[dtype].grad, name)])
        # Only the order of the fp32 sums differs (matmuls of other heights, chunks added up), plus one rounding to
        # the output dtype per chunk of a d_weight summed in it: at most two units in the last place of the largest
        # element, and fp32 sums within the direct fp32 bound. A misplaced or lost chunk is far outside.
        scale = one_chunk.abs().max().item()
        torch.testing.assert_close(grad, one_chunk, rtol=0, atol=max(2 * torch.finfo(dtype).eps, FP32_DIRECT) * scale)


def test_backward_chunk_rows():
    # LLaVA-1.5's head in 16-bit: 2048 rows fill 128 MiB, so a few pairs' responses are a single chunk.
    assert backward_chunk_rows(32064, torch.bfloat16) == 2048
    assert backward_chunk_rows(32064, torch.float32) == 1024
    for vocab_size in (50, 32064, 151936, 10**6):
        rows = backward_chunk_rows(vocab_size, torch.float16)
        assert rows % CHUNK_ROW_MULTIPLE == 0
        assert rows == CHUNK_ROW_MULTIPLE or rows * vocab_size * 2 <= D_LOGITS_CHUNK_BYTES


def test_textbook_dpo_equivalence(device):
    """sequence_logps + dama_sigmoid_loss with a constant beta and no mask == DPO from full logits."""
    num_pairs, lengths, hidden_size, vocab_size, beta = 3, [9, 4, 15, 1, 7, 11], 24, 90, 0.1
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).to(device)  # chosen 0..2, rejected 3..5
    hidden, weight, _, labels = make_inputs(len(seq_ids), hidden_size, vocab_size, torch.float32, device,
                                            with_bias=False)
    ref_logps = torch.randn(2 * num_pairs, device=device) * 5 - 30
    for impl in IMPLS:
        h, w = leaf(hidden), leaf(weight)
        logps = dama_kernels.sequence_logps(h, w, labels, seq_ids, 2 * num_pairs, impl=impl)
        out = dama_kernels.dama_sigmoid_loss(logps[:num_pairs], logps[num_pairs:], ref_logps[:num_pairs],
                                             ref_logps[num_pairs:], beta, impl=impl)
        grads = torch.autograd.grad(out.loss, (h, w))

        th, tw = leaf(hidden), leaf(weight)
        logits = th @ tw.T
        token = logits.log_softmax(-1).gather(1, labels.clamp(min=0)[:, None])[:, 0] * (labels != -100)
        seq = torch.zeros(2 * num_pairs, device=device).index_add(0, seq_ids, token)
        pi_logratios = seq[:num_pairs] - seq[num_pairs:]
        ref_logratios = ref_logps[:num_pairs] - ref_logps[num_pairs:]
        textbook = -torch.nn.functional.logsigmoid(beta * (pi_logratios - ref_logratios)).mean()
        textbook_grads = torch.autograd.grad(textbook, (th, tw))
        torch.testing.assert_close(out.loss, textbook, rtol=1e-5, atol=1e-6)
        for grad, expected in zip(grads, textbook_grads, strict=True):
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(hidden=a["hidden"][0]), "hidden must be 2-D"),
        (lambda a: a.update(weight=a["weight"][:, :5]), "weight must be"),
        (lambda a: a.update(weight=a["weight"].double()), "must share a dtype"),
        (lambda a: a.update(hidden=a["hidden"].int(), weight=a["weight"].int()), "dtype torch.int32"),
        (lambda a: a.update(labels=a["labels"][:3]), "labels must have shape"),
        (lambda a: a.update(labels=a["labels"].float()), "labels must be an integer"),
        (lambda a: a["labels"].__setitem__(2, 999), r"labels has values outside \[0, 50\)"),
        (lambda a: a["labels"].__setitem__(2, -1), "first offenders"),
        (lambda a: a.update(bias=a["bias"][:4]), "bias must have shape"),
        (lambda a: a.update(seq_ids=a["seq_ids"] + 5), r"seq_ids has values outside \[0, 2\)"),
        (lambda a: a.update(impl="cuda"), "impl must be one of"),
        (lambda a: a.update(chunk_size=0), "chunk_size must be a positive"),
        (lambda a: a.update(num_seqs=2.0), "num_seqs must be"),
    ],
)
def test_bad_input_raises_clear_error(change, message):
    hidden, weight, bias, labels = make_inputs(10, 8, 50, torch.float32, "cpu", ignored_fraction=0.0)
    args = dict(hidden=hidden, weight=weight, labels=labels, seq_ids=torch.zeros(10, dtype=torch.long), num_seqs=2,
                bias=bias, impl="torch", chunk_size=None)
    change(args)
    with pytest.raises(ValueError, match=message):
        dama_kernels.sequence_logps(args["hidden"], args["weight"], args["labels"], args["seq_ids"], args["num_seqs"],
                                    bias=args["bias"], impl=args["impl"], chunk_size=args["chunk_size"])


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, _, labels = make_inputs(4, 8, 20, torch.float32, "cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        dama_kernels.token_logps(hidden, weight, labels, impl="triton")


def test_triton_rejects_float64(device):
    # On the device the triton path runs on (CUDA, or the CPU under the interpreter), so that the dtype is the problem.
    hidden, weight, _, labels = make_inputs(4, 8, 20, torch.float64, device)
    with pytest.raises(ValueError, match="impl='triton' takes float16, bfloat16, float32"):
        dama_kernels.token_logps(hidden, weight, labels, impl="triton")


def test_sequence_sums_accumulate_in_float64():
    """Hundreds of token log-probs per response: the sum must not drift like an fp32 running sum does."""
    token_values = -torch.rand(3000) * 12  # (M,) fp32, like real per-token log-probs
    seq_ids = torch.randint(0, 3, (3000,))
    exact = torch.zeros(3, dtype=torch.float64).index_add(0, seq_ids, token_values.double())
    sums = dama_kernels.sum_per_sequence(token_values, seq_ids, 3)
    assert sums.dtype == torch.float32
    # One fp32 rounding of the exact sum (|sum| ~ 6000, ulp ~ 5e-4).
    torch.testing.assert_close(sums.double(), exact, rtol=1e-7, atol=0)

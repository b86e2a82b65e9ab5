"""Packed (varlen) attention: exact against per-sequence attention, inside transformers' Llama and LLaVA.

The exact per-segment path runs here (CPU), and the flash-attn call site against flash-attn's contract;
tests/test_attention_kernels.py checks the varlen_attn call site and runs both kernels on CUDA.
"""

import copy
import math
from itertools import pairwise

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dama.data.collator import PackedCollator, PaddedCollator
from dama.data.dataset import PreferenceDataset
from dama.demo.data import demo_corpus, make_demo_data
from dama.demo.tiny_llava import build_tiny_llava
from dama.model.attention import (
    ATTENTION_NAME,
    cu_seqlens_from_position_ids,
    packed_attention,
    packed_attention_forward,
    register_packed_attention,
    use_packed_attention,
)
from dama_kernels.functional import sequence_logps

# (atol, rtol) per comparison.
TOLERANCES = {
    "fp32_vs_fp64": (2e-5, 1e-5),
    "fp64": (1e-12, 1e-12),
    "model_fp32": (2e-5, 1e-5),
    "grad_fp32": (5e-5, 1e-4),
}


def _close(actual, expected, kind):
    atol, rtol = TOLERANCES[kind]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


def _bounds(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _reference_attention(query, key, value, lengths, causal, scaling=None):
    """Per-sequence softmax attention in float64, written out: the specification of packed_attention."""
    query, key, value = (t.double() for t in (query, key, value))
    groups = query.shape[1] // key.shape[1]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    outputs, start = [], 0
    for length in lengths:
        rows = slice(start, start + length)
        heads = []
        for head in range(query.shape[1]):
            scores = query[rows, head] @ key[rows, head // groups].T * scaling  # (L, L)
            if causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
            heads.append(scores.softmax(-1) @ value[rows, head // groups])
        outputs.append(torch.stack(heads, dim=1))
        start += length
    return torch.cat(outputs)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)])
def test_packed_attention_matches_per_sequence_reference(causal, heads):
    lengths = [1, 5, 17, 1, 2, 9]
    num_tokens, (num_heads, num_kv_heads), head_dim = sum(lengths), heads, 8
    query = torch.randn(num_tokens, num_heads, head_dim, requires_grad=True)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, requires_grad=True)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, requires_grad=True)
    output = packed_attention(query, key, value, _bounds(lengths), causal=causal, scaling=0.3)
    expected = _reference_attention(query, key, value, lengths, causal, scaling=0.3)
    _close(output, expected, "fp32_vs_fp64")

    grad_output = torch.randn_like(output)
    grads = torch.autograd.grad(output, (query, key, value), grad_output)
    expected_grads = torch.autograd.grad(expected, (query, key, value), grad_output.double())
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        _close(grad, expected_grad, "fp32_vs_fp64")


def test_packed_attention_gradcheck_fp64():
    lengths = [1, 3, 4]
    query = torch.randn(8, 4, 3, dtype=torch.float64, requires_grad=True)
    key = torch.randn(8, 2, 3, dtype=torch.float64, requires_grad=True)
    value = torch.randn(8, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: packed_attention(q, k, v, _bounds(lengths)), (query, key, value), fast_mode=True
    )
    _close(packed_attention(query, key, value, _bounds(lengths)),
           _reference_attention(query, key, value, lengths, causal=True), "fp64")


def test_packed_attention_rejects_bad_input():
    query, key = torch.randn(6, 4, 8), torch.randn(6, 3, 8)
    with pytest.raises(ValueError, match="multiple of the 3 key/value heads"):
        packed_attention(query, key, key, _bounds([6]))
    key = torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="rise strictly from 0 to the 6 packed tokens"):
        packed_attention(query, key, key, torch.tensor([0, 4, 4, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="rise strictly from 0 to the 6 packed tokens"):
        packed_attention(query, key, key, torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="integer tensor"):
        packed_attention(query, key, key, torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="impl must be one of"):
        packed_attention(query, key, key, _bounds([6]), impl="triton")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs flash-attn installed and CUDA"):
            packed_attention(query, key, key, _bounds([6]), impl="flash_attn")
        with pytest.raises(ValueError, match=r"needs torch >= 2.10 \(torch.nn.attention.varlen\), CUDA fp16/bf16"):
            packed_attention(query, key, key, _bounds([6]), impl="varlen")


def _prefix_shared_segments(pairs):
    """Segments of the prefix_shared layout for (prompt, chosen, rejected) lengths: ((query lengths, key index, key
    lengths), the allowed (N, N) mask written out token by token, as the layout specifies it)."""
    query_lengths, key_index, key_lengths, start = [], [], [], 0
    num_tokens = sum(p + c + r for p, c, r in pairs)
    allowed = torch.zeros(num_tokens, num_tokens, dtype=torch.bool)
    for prompt, chosen, rejected in pairs:
        prompt_rows = list(range(start, start + prompt))
        chosen_rows = list(range(start + prompt, start + prompt + chosen))
        rejected_rows = list(range(start + prompt + chosen, start + prompt + chosen + rejected))
        for sequence in (prompt_rows + chosen_rows, prompt_rows + rejected_rows):
            for i, row in enumerate(sequence):
                allowed[row, sequence[: i + 1]] = True  # every earlier token of its own sequence and itself
        query_lengths += [prompt + chosen, rejected]
        key_index += prompt_rows + chosen_rows + prompt_rows + rejected_rows
        key_lengths += [prompt + chosen, prompt + rejected]
        start += prompt + chosen + rejected
    return (query_lengths, torch.tensor(key_index), key_lengths), allowed


def _dense_reference(query, key, value, allowed, scaling):
    """softmax(q k^T * scaling) v over the whole row with an explicit (N, N) mask, in float64."""
    query, key, value = (t.double() for t in (query, key, value))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query, key) * scaling
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), value)


PREFIX_SHARED_PAIRS = [(3, 5, 5), (1, 1, 9), (6, 12, 1), (2, 4, 2)]


@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_key_index_segments_match_a_dense_masked_reference(heads):
    (query_lengths, key_index, key_lengths), allowed = _prefix_shared_segments(PREFIX_SHARED_PAIRS)
    num_tokens, (num_heads, num_kv_heads), head_dim = allowed.shape[0], heads, 8
    query = torch.randn(num_tokens, num_heads, head_dim, requires_grad=True)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, requires_grad=True)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, requires_grad=True)
    output = packed_attention(query, key, value, _bounds(query_lengths), key_index=key_index,
                              cu_seqlens_k=_bounds(key_lengths), scaling=0.4)
    expected = _dense_reference(query, key, value, allowed, 0.4)
    _close(output, expected, "fp32_vs_fp64")
    grad_output = torch.randn_like(output)
    grads = torch.autograd.grad(output, (query, key, value), grad_output)
    expected_grads = torch.autograd.grad(expected, (query, key, value), grad_output.double())
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        _close(grad, expected_grad, "fp32_vs_fp64")


def test_key_index_segments_gradcheck_fp64():
    (query_lengths, key_index, key_lengths), allowed = _prefix_shared_segments([(2, 2, 3), (1, 3, 1)])
    tensors = [torch.randn(allowed.shape[0], heads, 3, dtype=torch.float64, requires_grad=True)
               for heads in (4, 2, 2)]

    def attention(q, k, v):
        return packed_attention(q, k, v, _bounds(query_lengths), key_index=key_index,
                                cu_seqlens_k=_bounds(key_lengths))

    assert torch.autograd.gradcheck(attention, tuple(tensors), fast_mode=True)
    _close(attention(*tensors), _dense_reference(*tensors, allowed, 3 ** -0.5), "fp64")


def _flash_varlen_by_its_contract(calls):
    """A stand-in for flash_attn_varlen_func written from flash-attn's documented contract (per segment k: queries
    q[cu_q[k]:cu_q[k+1]], keys k[cu_k[k]:cu_k[k+1]], causal aligned bottom right, GQA by head groups), recording
    its arguments: it checks the arguments the flash branch hands over, on the CPU."""

    def flash(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
              causal=False):
        calls.append({"cu_q": cu_seqlens_q, "cu_k": cu_seqlens_k, "max_q": max_seqlen_q, "max_k": max_seqlen_k,
                      "k_rows": k.shape[0], "contiguous": k.is_contiguous() and v.is_contiguous()})
        groups = q.shape[1] // k.shape[1]
        outputs = []
        for (qa, qb), (ka, kb) in zip(pairwise(cu_seqlens_q.tolist()), pairwise(cu_seqlens_k.tolist()), strict=True):
            keys = k[ka:kb].repeat_interleave(groups, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q[qa:qb], keys) * softmax_scale
            if causal:
                hidden = torch.ones(qb - qa, kb - ka, dtype=torch.bool).triu((kb - ka) - (qb - qa) + 1)
                scores = scores.masked_fill(hidden, -math.inf)
            outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ka:kb].repeat_interleave(groups, 1)))
        return torch.cat(outputs)

    return flash


@pytest.mark.parametrize("with_key_index", [False, True])
def test_flash_branch_hands_flash_attn_the_right_segments(monkeypatch, with_key_index):
    import dama.model.attention as attention

    calls = []
    monkeypatch.setattr(attention, "_flash_varlen", lambda: _flash_varlen_by_its_contract(calls))
    monkeypatch.setattr(attention, "_resolve_impl", lambda impl, query, dropout: "flash_attn")
    (query_lengths, key_index, key_lengths), allowed = _prefix_shared_segments(PREFIX_SHARED_PAIRS)
    query, key, value = (torch.randn(allowed.shape[0], heads, 8) for heads in (4, 2, 2))
    if with_key_index:
        segments = {"key_index": key_index, "cu_seqlens_k": _bounds(key_lengths)}
        expected = _dense_reference(query, key, value, allowed, 0.5)
    else:
        query_lengths = [p + c + r for p, c, r in PREFIX_SHARED_PAIRS]
        segments, key_lengths = {}, query_lengths
        expected = _reference_attention(query, key, value, query_lengths, causal=True, scaling=0.5)
    output = packed_attention(query, key, value, _bounds(query_lengths), scaling=0.5, **segments)
    _close(output, expected, "fp32_vs_fp64")
    (call,) = calls
    assert call["cu_q"].dtype == call["cu_k"].dtype == torch.int32 and call["contiguous"]
    assert call["cu_q"].tolist() == _bounds(query_lengths).tolist()
    assert call["cu_k"].tolist() == _bounds(key_lengths).tolist() and call["k_rows"] == sum(key_lengths)
    assert (call["max_q"], call["max_k"]) == (max(query_lengths), max(key_lengths))


def test_key_index_rejects_bad_input():
    query = torch.randn(6, 2, 4)
    bounds = _bounds([4, 2])
    with pytest.raises(ValueError, match="needs cu_seqlens_k"):
        packed_attention(query, query, query, bounds, key_index=torch.arange(6))
    with pytest.raises(ValueError, match="point into the 6 tokens"):
        packed_attention(query, query, query, bounds, key_index=torch.tensor([0, 1, 2, 3, 0, 6]),
                         cu_seqlens_k=_bounds([4, 2]))
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        packed_attention(query, query, query, bounds, key_index=torch.tensor([0, 1, 2, 4, 5]),
                         cu_seqlens_k=_bounds([3, 2]))
    with pytest.raises(ValueError, match="one key segment per query segment"):
        packed_attention(query, query, query, bounds, key_index=torch.arange(6), cu_seqlens_k=_bounds([6]))
    with pytest.raises(ValueError, match="must equal cu_seqlens"):
        packed_attention(query, query, query, bounds, cu_seqlens_k=_bounds([3, 3]))
    with pytest.raises(ValueError, match="needs cu_seq_lens_q and cu_seq_lens_k"):
        packed_attention_forward(torch.nn.Module(), query[None].transpose(1, 2), query[None].transpose(1, 2),
                                 query[None].transpose(1, 2), None, key_index=torch.arange(6))


def test_cu_seqlens_from_position_ids():
    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 0]])
    assert cu_seqlens_from_position_ids(position_ids).tolist() == [0, 3, 4, 6, 11, 12]
    assert cu_seqlens_from_position_ids(torch.arange(5)[None]).dtype == torch.int32


def test_attention_forward_refuses_masks_and_caches():
    module = torch.nn.Module()
    query = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match="without an attention mask"):
        packed_attention_forward(module, query, query, query, torch.zeros(1, 1, 6, 6))
    with pytest.raises(ValueError, match="use_cache=False"):
        packed_attention_forward(module, query, torch.randn(1, 4, 9, 8), torch.randn(1, 4, 9, 8), None)
    bounds = _bounds([2, 4])
    with pytest.raises(ValueError, match="cu_seqlens_k must equal cu_seqlens"):
        packed_attention_forward(module, query, query, query, None, cu_seq_lens_q=bounds, cu_seq_lens_k=_bounds([3, 3]))
    output, weights = packed_attention_forward(module, query, query, query, None, cu_seq_lens_q=bounds)
    assert output.shape == (1, 6, 4, 8) and weights is None


def test_registration_makes_transformers_dispatch_to_packed_attention():
    name = register_packed_attention()
    assert ALL_ATTENTION_FUNCTIONS[name] is packed_attention_forward
    with pytest.raises(ValueError, match="got a padding mask"):
        ALL_MASK_ATTENTION_FUNCTIONS[name](attention_mask=torch.tensor([[1, 1, 0]]))
    assert ALL_MASK_ATTENTION_FUNCTIONS[name](attention_mask=torch.ones(1, 3, dtype=torch.bool)) is None


def _tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def _packed_inputs(sequences):
    lengths = [s.shape[0] for s in sequences]
    bounds = _bounds(lengths)
    return {
        "input_ids": torch.cat(sequences)[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
        "max_length_q": max(lengths), "max_length_k": max(lengths),
        "use_cache": False,
    }


def test_llama_packed_matches_padded_eager_logits_logps_and_grads():
    padded_model = _tiny_llama()
    packed_model = copy.deepcopy(padded_model)
    use_packed_attention(packed_model)
    assert packed_model.config._attn_implementation == ATTENTION_NAME
    assert padded_model.config._attn_implementation == "eager"

    lengths = [1, 7, 3, 12, 2, 1, 5]
    sequences = [torch.randint(0, 101, (n,)) for n in lengths]
    # Supervise a random subset of each sequence's next tokens (the last token has no next token).
    targets = [torch.where(torch.rand(n) < 0.6, torch.cat([s[1:], s.new_full((1,), -100)]), -100)
               for s, n in zip(sequences, lengths, strict=True)]
    num_seqs, longest = len(lengths), max(lengths)

    padded_ids = torch.zeros(num_seqs, longest, dtype=torch.long)
    mask = torch.zeros(num_seqs, longest, dtype=torch.long)
    padded_targets = torch.full((num_seqs, longest), -100)
    for row, (seq, target) in enumerate(zip(sequences, targets, strict=True)):
        padded_ids[row, : seq.shape[0]], mask[row, : seq.shape[0]], padded_targets[row, : seq.shape[0]] = seq, 1, target
    padded = padded_model(input_ids=padded_ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    packed = packed_model(**_packed_inputs(sequences), output_hidden_states=True)

    start = 0
    for row, length in enumerate(lengths):
        _close(packed.logits[0, start:start + length], padded.logits[row, :length], "model_fp32")
        start += length

    weight_a, weight_b = padded_model.lm_head.weight, packed_model.lm_head.weight
    padded_logps = sequence_logps(padded.hidden_states[-1].reshape(-1, 48), weight_a, padded_targets.reshape(-1),
                                  torch.arange(num_seqs).repeat_interleave(longest), num_seqs)
    packed_logps = sequence_logps(packed.hidden_states[-1][0], weight_b, torch.cat(targets),
                                  torch.arange(num_seqs).repeat_interleave(torch.tensor(lengths)), num_seqs)
    _close(packed_logps, padded_logps, "model_fp32")

    grad_output = torch.randn(num_seqs)
    (padded_logps * grad_output).sum().backward()
    (packed_logps * grad_output).sum().backward()
    for (name, a), b in zip(padded_model.named_parameters(), packed_model.parameters(), strict=True):
        assert b.grad is not None, name
        _close(b.grad, a.grad, "grad_fp32")


def test_llama_packed_bounds_from_position_ids_and_sdpa_agree():
    model = _tiny_llama()
    use_packed_attention(model)
    sequences = [torch.randint(0, 101, (n,)) for n in (4, 1, 6)]
    inputs = _packed_inputs(sequences)
    expected = model(**inputs).logits
    without_bounds = {k: v for k, v in inputs.items() if not k.startswith(("cu_seq", "max_length"))}
    _close(model(**without_bounds).logits, expected, "model_fp32")
    # The bounds given as keywords reach the attention: one segment over all tokens lets the sequences mix.
    whole = torch.tensor([0, 11], dtype=torch.int32)
    leaked = model(**(inputs | {"cu_seq_lens_q": whole, "cu_seq_lens_k": whole, "max_length_q": 11})).logits
    assert not torch.allclose(leaked[:, 4:], expected[:, 4:], atol=1e-3)

    model.set_attn_implementation("sdpa")
    _close(model(**inputs).logits, expected, "model_fp32")


def test_packed_attention_refuses_padding_mask_in_model():
    model = _tiny_llama()
    use_packed_attention(model)
    with pytest.raises(ValueError, match="got a padding mask"):
        model(input_ids=torch.randint(0, 101, (2, 5)), attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
              use_cache=False)


@pytest.fixture(scope="module")
def llava_batch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    paths = make_demo_data(folder / "data", num_train=3, num_eval=0, image_size=40)
    model, processor = build_tiny_llava(demo_corpus(), seed=1)
    dataset = PreferenceDataset.from_path(paths["train"], processor, cache_dir=folder / "cache", max_length=512)
    examples = [dataset[i] for i in range(len(dataset))]
    return model, processor, examples


def _policy_logps(model, batch, hidden):
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.supervised_positions)
    return sequence_logps(flat, model.lm_head.weight, batch.supervised_target_ids, batch.supervised_seq_ids,
                          batch.num_seqs)


def test_llava_packed_with_shared_images_matches_padded_eager(llava_batch):
    model, processor, examples = llava_batch
    padded_model = copy.deepcopy(model)
    padded_model.set_attn_implementation("eager")
    packed_model = copy.deepcopy(model)
    use_packed_attention(packed_model)
    assert packed_model.config.text_config._attn_implementation == ATTENTION_NAME
    assert packed_model.config.vision_config._attn_implementation != ATTENTION_NAME

    # Baseline: the usual layout, each sequence with its own copy of the image (the image encoded twice per pair).
    padded = PaddedCollator(processor.tokenizer.pad_token_id)(examples)
    hidden = padded_model.model(**padded.model_inputs(),
                                pixel_values=padded.pixel_values[padded.image_index]).last_hidden_state
    padded_logps = _policy_logps(padded_model, padded, hidden)

    # Packed: each image through the vision tower once, its features placed into both sequences of its pair.
    packed = PackedCollator()(examples)
    features = packed_model.model.get_image_features(pixel_values=packed.pixel_values, return_dict=True)
    assert len(features.pooler_output) == len(examples)
    features.pooler_output = [features.pooler_output[i] for i in packed.image_index.tolist()]
    hidden = packed_model.model(**packed.model_inputs(), mm_encoder_outputs={"image": features}).last_hidden_state
    packed_logps = _policy_logps(packed_model, packed, hidden)

    assert hidden.shape[:2] == (1, packed.num_tokens)
    _close(packed_logps, padded_logps, "model_fp32")
    assert bool((packed_logps < 0).all())

    grad_output = torch.randn(packed.num_seqs)
    (padded_logps * grad_output).sum().backward()
    (packed_logps * grad_output).sum().backward()
    checked = set()
    for (name, a), b in zip(padded_model.named_parameters(), packed_model.parameters(), strict=True):
        if a.grad is None:
            # CLIP's last layer and post-layernorm: LLaVA reads the features at layer -2.
            assert b.grad is None, name
            continue
        _close(b.grad, a.grad, "grad_fp32")
        checked.add(name.split(".")[1])
    assert {"vision_tower", "multi_modal_projector", "language_model"} <= checked

"""Collators: the packed row (bounds, positions, shift within sequences, supervised gather, image slots), the
prefix-shared row (one prompt per pair, its attention segments), the padded baseline, packed and padded scoring the
same log-probs as a per-sequence loop, and token-budget batching."""

import math
from itertools import pairwise

import pytest
import torch

from dama.data.batch import IGNORE_INDEX, PackedBatch, PreferenceExample, PrefixSharedBatch, split_chosen_rejected
from dama.data.collator import (
    LAYOUTS,
    PackedCollator,
    PaddedCollator,
    PrefixSharedCollator,
    TokenBudgetBatchSampler,
    layout_pair_lengths,
    make_collator,
)
from dama.data.dataset import PreferenceDataset
from dama.demo.data import demo_corpus, make_demo_data
from dama.demo.tiny_llava import build_tiny_processor, train_tiny_tokenizer
from dama_kernels.functional import sequence_logps

VOCAB, HIDDEN = 37, 16
# (atol, rtol) for log-probs of the two layouts and of the per-sequence loop (fp32, same maths, other order).
LOGPS_TOLERANCE = (1e-4, 1e-5)


def _example(row: int, prompt: int, chosen: int, rejected: int, image_size: int = 4, **values) -> PreferenceExample:
    """A pair with random ids; prompt tokens unsupervised, a few response tokens unsupervised too (ignored)."""
    prompt_ids = torch.randint(0, VOCAB, (prompt,))

    def sequence(length):
        ids = torch.cat([prompt_ids, torch.randint(0, VOCAB, (length,))])
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        return ids, labels

    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = sequence(chosen), sequence(rejected)
    reference = {name: values.get(name, math.nan) for name in (
        "ref_chosen_logps", "ref_rejected_logps", "ref_chosen_mean_logps", "ref_rejected_mean_logps", "hardness")}
    return PreferenceExample(
        row_id=f"rows:{row}", prompt_length=prompt, chosen_input_ids=chosen_ids, chosen_labels=chosen_labels,
        rejected_input_ids=rejected_ids, rejected_labels=rejected_labels,
        pixel_values=torch.full((3, image_size, image_size), float(row)), **reference,
    )


def _examples():
    # Sequence lengths 1 (nothing supervised), 2, odd and longer ones; P = 3.
    return [
        _example(0, prompt=1, chosen=0, rejected=3, ref_chosen_logps=-1.5, hardness=0.25),
        _example(1, prompt=4, chosen=7, rejected=1, ref_rejected_logps=-2.5),
        _example(2, prompt=2, chosen=11, rejected=5),
    ]


def _sequences(examples):
    """(input_ids, labels) per sequence in the documented order: all chosen, then all rejected."""
    return ([(e.chosen_input_ids, e.chosen_labels) for e in examples]
            + [(e.rejected_input_ids, e.rejected_labels) for e in examples])


def test_packed_layout(device):
    examples = _examples()
    batch = PackedCollator()(examples).to(device)
    sequences = _sequences(examples)
    lengths = [ids.numel() for ids, _ in sequences]
    assert batch.num_pairs == 3 and batch.num_seqs == 6 and batch.num_tokens == sum(lengths)
    assert batch.input_ids.shape == batch.position_ids.shape == (1, sum(lengths))
    assert batch.input_ids[0].cpu().tolist() == torch.cat([ids for ids, _ in sequences]).tolist()
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert batch.max_seqlen == max(lengths) and isinstance(batch.max_seqlen, int)
    assert batch.position_ids[0].cpu().tolist() == [p for n in lengths for p in range(n)]
    assert batch.seq_ids.cpu().tolist() == [s for s, n in enumerate(lengths) for _ in range(n)]

    # Shift within each sequence: the target of t is the label of t + 1, and nothing at a sequence's last token.
    for seq, (_, labels) in enumerate(sequences):
        start, end = batch.cu_seqlens[seq].item(), batch.cu_seqlens[seq + 1].item()
        targets = batch.target_ids[start:end].cpu()
        assert targets[-1] == IGNORE_INDEX
        assert targets[:-1].tolist() == labels[1:].tolist()
    supervised = (batch.target_ids != IGNORE_INDEX).nonzero().squeeze(1)
    assert torch.equal(batch.supervised_positions, supervised)
    assert torch.equal(batch.supervised_target_ids, batch.input_ids[0, supervised + 1])
    assert torch.equal(batch.supervised_seq_ids, batch.seq_ids[supervised])
    assert batch.supervised_counts.cpu().tolist() == [int((lab != IGNORE_INDEX).sum()) for _, lab in sequences]
    assert batch.supervised_counts[0] == 0  # the length-1 chosen sequence of pair 0

    assert batch.image_index.cpu().tolist() == [0, 1, 2, 0, 1, 2]
    assert batch.pixel_values.shape == (3, 3, 4, 4)
    assert batch.pixel_values[:, 0, 0, 0].cpu().tolist() == [0.0, 1.0, 2.0]
    assert batch.row_ids == ["rows:0", "rows:1", "rows:2"]
    assert batch.ref_chosen_logps.dtype == torch.float32 and batch.ref_chosen_logps[0] == -1.5
    assert batch.ref_rejected_logps[1] == -2.5 and bool(batch.ref_chosen_logps[1:].isnan().all())
    assert batch.hardness[0] == 0.25 and bool(batch.hardness[1:].isnan().all())

    inputs = batch.model_inputs()
    assert inputs["cu_seq_lens_q"] is batch.cu_seqlens and inputs["max_length_k"] == batch.max_seqlen
    assert inputs["use_cache"] is False and set(inputs) >= {"input_ids", "position_ids"}
    chosen, rejected = batch.split_chosen_rejected(torch.arange(6))
    assert chosen.tolist() == [0, 1, 2] and rejected.tolist() == [3, 4, 5]


def test_prefix_shared_layout(device):
    examples = [_example(0, prompt=1, chosen=1, rejected=3, hardness=0.5), _example(1, prompt=4, chosen=7, rejected=1),
                _example(2, prompt=2, chosen=11, rejected=5)]
    batch = PrefixSharedCollator()(examples).to(device)
    packed = PackedCollator()(examples)
    assert isinstance(batch, PrefixSharedBatch) and batch.num_pairs == 3 and batch.num_seqs == 6
    # Per pair: [prompt | chosen response | rejected response], the prompt once.
    row, positions, query_lengths, key_index, key_lengths, start = [], [], [], [], [], 0
    for e in examples:
        prompt, chosen = e.prompt_length, e.chosen_input_ids.numel()
        rejected = e.rejected_input_ids.numel() - prompt
        row += e.chosen_input_ids.tolist() + e.rejected_input_ids[prompt:].tolist()
        positions += list(range(chosen)) + list(range(prompt, prompt + rejected))
        query_lengths += [chosen, rejected]
        key_index += list(range(start, start + chosen))
        key_index += list(range(start, start + prompt)) + list(range(start + chosen, start + chosen + rejected))
        key_lengths += [chosen, prompt + rejected]
        start += chosen + rejected
    assert batch.input_ids[0].cpu().tolist() == row and batch.num_tokens == len(row) == 35
    assert batch.position_ids[0].cpu().tolist() == positions
    assert batch.cu_seqlens.dtype == batch.cu_seqlens_k.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, *torch.tensor(query_lengths).cumsum(0).tolist()]
    assert batch.cu_seqlens_k.tolist() == [0, *torch.tensor(key_lengths).cumsum(0).tolist()]
    assert batch.key_index.cpu().tolist() == key_index
    assert (batch.max_seqlen, batch.max_seqlen_k) == (max(query_lengths), max(key_lengths))

    # Every sequence scores the same targets, in the same order, as in the packed layout; each scoring position's
    # next token in its own sequence is its target.
    assert torch.equal(batch.supervised_counts.cpu(), packed.supervised_counts)
    assert bool((batch.supervised_positions[1:] >= batch.supervised_positions[:-1]).all())
    for seq in range(6):
        ours = batch.supervised_seq_ids == seq
        theirs = packed.supervised_seq_ids == seq
        assert batch.supervised_target_ids[ours].tolist() == packed.supervised_target_ids[theirs].tolist()
    # Pair 0: the prompt's only token scores the chosen response's first token and the rejected response's first.
    assert batch.supervised_positions[:2].tolist() == [0, 0] and batch.supervised_seq_ids[:2].tolist() == [0, 3]
    assert batch.supervised_target_ids[:2].tolist() == [row[1], row[2]]
    assert batch.image_index.cpu().tolist() == [0, 1, 2] and batch.hardness[0] == 0.5

    inputs = batch.model_inputs()
    assert inputs["key_index"] is batch.key_index and inputs["cu_seq_lens_k"] is batch.cu_seqlens_k
    assert inputs["max_length_q"] == batch.max_seqlen and inputs["use_cache"] is False
    assert batch.num_tokens == sum(layout_pair_lengths(
        [e.chosen_input_ids.numel() + e.rejected_input_ids.numel() for e in examples],
        [e.prompt_length for e in examples], "prefix_shared"))


def test_prefix_shared_collator_rejects_pairs_without_a_shared_prompt():
    with pytest.raises(ValueError, match="a response of at least one token on each side"):
        PrefixSharedCollator()([_example(0, prompt=2, chosen=0, rejected=3)])
    with pytest.raises(ValueError, match="a prompt of at least one token"):
        PrefixSharedCollator()([_example(0, prompt=0, chosen=2, rejected=3)])
    example = _example(0, prompt=3, chosen=2, rejected=2)
    example.rejected_input_ids[1] = (example.rejected_input_ids[1] + 1) % VOCAB
    with pytest.raises(ValueError, match="differ within their first prompt_length=3 tokens"):
        PrefixSharedCollator()([example])


def test_make_collator_and_layout_lengths():
    assert LAYOUTS[0] == "prefix_shared"
    assert isinstance(make_collator("prefix_shared"), PrefixSharedCollator)
    assert isinstance(make_collator("packed"), PackedCollator)
    assert make_collator("padded", pad_token_id=0).pad_token_id == 0
    with pytest.raises(ValueError, match="layout must be one of"):
        make_collator("shared")
    assert layout_pair_lengths([10, 20], [4, 5], "prefix_shared") == [6, 15]
    assert layout_pair_lengths([10, 20], [4, 5], "padded") == [10, 20]
    with pytest.raises(ValueError, match="layout must be one of"):
        layout_pair_lengths([10], [4], "shared")


def test_padded_layout():
    examples = _examples()
    batch = PaddedCollator(pad_token_id=VOCAB - 1)(examples)
    sequences = _sequences(examples)
    width = max(ids.numel() for ids, _ in sequences)  # the longest sequence: 2 prompt + 11 response tokens
    assert width == 13
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.target_ids.shape == (6, width)
    for row, (ids, labels) in enumerate(sequences):
        length = ids.numel()
        assert batch.input_ids[row, :length].tolist() == ids.tolist()
        assert bool((batch.input_ids[row, length:] == VOCAB - 1).all())
        assert batch.attention_mask[row].tolist() == [1] * length + [0] * (width - length)
        assert batch.target_ids[row, : length - 1].tolist() == labels[1:].tolist()
        assert bool((batch.target_ids[row, length - 1:] == IGNORE_INDEX).all())
    flat_ids = batch.input_ids.reshape(-1)
    assert torch.equal(batch.supervised_target_ids, flat_ids[batch.supervised_positions + 1])
    assert torch.equal(batch.supervised_seq_ids, batch.supervised_positions // width)
    assert batch.image_index.tolist() == [0, 1, 2, 0, 1, 2]
    assert batch.model_inputs()["attention_mask"] is batch.attention_mask


def _toy_hidden(input_ids, positions, starts, embed, previous, position_embed):
    """A stand-in for a causal model: hidden[t] sees token t, token t - 1 of the SAME sequence and t's position."""
    prior = torch.cat([input_ids.new_full((1,), VOCAB), input_ids[:-1]])
    prior = torch.where(starts, VOCAB, prior)
    return embed[input_ids] + previous[prior] + position_embed[positions]


def test_both_layouts_score_what_a_per_sequence_loop_scores():
    examples = _examples()
    embed, previous = torch.randn(VOCAB, HIDDEN), torch.randn(VOCAB + 1, HIDDEN)
    position_embed, weight = torch.randn(64, HIDDEN), torch.randn(VOCAB, HIDDEN)

    expected = []
    for ids, labels in _sequences(examples):
        positions = torch.arange(ids.numel())
        hidden = _toy_hidden(ids, positions, positions == 0, embed, previous, position_embed)
        logps = (hidden @ weight.T).log_softmax(-1)
        supervised = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(1)
        expected.append(logps[supervised, labels[1:][supervised]].sum())
    expected = torch.stack(expected)

    packed = PackedCollator()(examples)
    positions = packed.position_ids[0]
    hidden = _toy_hidden(packed.input_ids[0], positions, positions == 0, embed, previous, position_embed)
    padded = PaddedCollator(pad_token_id=0)(examples)
    width = padded.input_ids.shape[1]
    padded_positions = torch.arange(width).repeat(padded.num_seqs)
    padded_hidden = _toy_hidden(padded.input_ids.reshape(-1), padded_positions, padded_positions == 0, embed,
                                previous, position_embed)
    for batch, states in ((packed, hidden), (padded, padded_hidden)):
        scored = sequence_logps(states.index_select(0, batch.supervised_positions), weight,
                                batch.supervised_target_ids, batch.supervised_seq_ids, batch.num_seqs)
        torch.testing.assert_close(scored, expected, atol=LOGPS_TOLERANCE[0], rtol=LOGPS_TOLERANCE[1])
    # Scoring all N rows with the shifted targets gives the same sums.
    whole = sequence_logps(hidden, weight, packed.target_ids, packed.seq_ids, packed.num_seqs)
    torch.testing.assert_close(whole, expected, atol=LOGPS_TOLERANCE[0], rtol=LOGPS_TOLERANCE[1])


def test_packed_batch_of_real_pairs_places_one_image_run_per_sequence(tmp_path):
    processor = build_tiny_processor(train_tiny_tokenizer(demo_corpus()))
    paths = make_demo_data(tmp_path / "data", num_train=4, num_eval=0, image_size=40)
    dataset = PreferenceDataset.from_path(paths["train"], processor, cache_dir=tmp_path / "cache")
    batch = PackedCollator()([dataset[i] for i in range(3)])
    assert isinstance(batch, PackedBatch) and batch.pixel_values.shape == (3, 3, 32, 32)
    is_image = batch.input_ids[0] == processor.image_token_id
    assert int(is_image.sum()) == batch.num_seqs * 16
    for seq in range(batch.num_seqs):
        start, end = batch.cu_seqlens[seq].item(), batch.cu_seqlens[seq + 1].item()
        assert batch.input_ids[0, start] == processor.tokenizer.bos_token_id
        run = is_image[start:end].nonzero().squeeze(1)
        assert run.numel() == 16 and run[-1] - run[0] == 15
        # The first scored token of every sequence is the first response token, scored from the prompt's end.
        first = batch.supervised_positions[batch.supervised_seq_ids == seq][0]
        assert first - start == dataset[seq % 3].prompt_length - 1
    assert batch.num_tokens == sum(dataset.pair_lengths[:3])


def test_collators_reject_bad_input():
    with pytest.raises(ValueError, match="empty list of examples"):
        PackedCollator()([])
    with pytest.raises(ValueError, match="must share one shape"):
        PackedCollator()([_example(0, 2, 3, 3, image_size=4), _example(1, 2, 3, 3, image_size=8)])
    with pytest.raises(ValueError, match="pad_token_id must be a token id"):
        PaddedCollator(pad_token_id=None)
    with pytest.raises(ValueError, match="S = 2P even"):
        split_chosen_rejected(torch.zeros(5))
    batch = PackedCollator()(_examples())
    with pytest.raises(ValueError, match=r"expected \(6, ...\) per-sequence values"):
        batch.split_chosen_rejected(torch.zeros(4))


def test_token_budget_batches_cover_every_pair_within_budget():
    lengths = torch.randint(10, 100, (57,)).tolist()
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=250, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(57))
    assert all(sum(lengths[i] for i in b) <= 250 for b in batches)
    assert len(sampler) == len(batches)
    # Greedy: a batch was closed only because its successor's first pair did not fit.
    for current, following in pairwise(batches):
        assert sum(lengths[i] for i in current) + lengths[following[0]] > 250
    assert list(sampler) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches

    in_order = list(TokenBudgetBatchSampler(lengths, max_tokens=250, max_pairs=2, shuffle=False))
    assert [i for b in in_order for i in b] == list(range(57)) and max(len(b) for b in in_order) == 2
    dropped = list(TokenBudgetBatchSampler([5, 5, 5], max_tokens=10, shuffle=False, drop_last=True))
    assert dropped == [[0, 1]]


def test_token_budget_rejects_pairs_longer_than_the_budget():
    with pytest.raises(ValueError, match=r"2 pairs are longer than max_tokens=50 .* at least 80"):
        TokenBudgetBatchSampler([10, 60, 80], max_tokens=50)
    with pytest.raises(ValueError, match="max_tokens must be a positive"):
        TokenBudgetBatchSampler([10], max_tokens=0)

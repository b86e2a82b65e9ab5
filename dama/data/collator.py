"""Collators of preference pairs into the batch layouts of dama.data.batch (prefix-shared, packed, padded) and the
token-budget batch sampler."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from dama.errors import DamaError
from dama.options import LAYOUTS

from ..model.attention import check_packed_segments
from .batch import IGNORE_INDEX, PackedBatch, PaddedBatch, PreferenceBatch, PreferenceExample, PrefixSharedBatch

# The micro-batch layouts, the default first.


def _sequences(examples: Sequence[PreferenceExample]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(input ids, labels) of the S sequences in the collators' order: all chosen, then all rejected."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    input_ids = [e.chosen_input_ids for e in examples] + [e.rejected_input_ids for e in examples]
    labels = [e.chosen_labels for e in examples] + [e.rejected_labels for e in examples]
    for ids, lab in zip(input_ids, labels, strict=True):
        if ids.dim() != 1 or ids.shape != lab.shape or ids.shape[0] == 0:
            raise ValueError(f"each sequence needs 1-D input_ids and labels of one length >= 1, got "
                             f"{tuple(ids.shape)} and {tuple(lab.shape)}")
    return input_ids, labels


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    """(L,) labels -> (L,) targets: targets[t] = labels[t + 1], and -100 at the end."""
    return torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])


def _supervised(targets: torch.Tensor, seq_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened targets and sequence ids of a layout -> (positions, target ids, sequence ids), each (M,), of the
    supervised tokens in token order."""
    positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return positions, targets.index_select(0, positions), seq_ids.index_select(0, positions)


def _pair_fields(examples: Sequence[PreferenceExample], supervised: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 image_index: torch.Tensor) -> dict:
    """The PreferenceBatch fields, given the layout's supervised (positions, target ids, sequence ids) and image
    slots."""
    shapes = {tuple(e.pixel_values.shape) for e in examples}
    if len(shapes) != 1:
        raise ValueError(f"the images of a batch must share one shape (CLIP crops to a fixed size), got {shapes}")
    positions, target_ids, seq_ids = supervised

    def floats(name: str) -> torch.Tensor:
        return torch.tensor([getattr(e, name) for e in examples], dtype=torch.float32)

    return {
        "row_ids": [e.row_id for e in examples],
        "pixel_values": torch.stack([e.pixel_values for e in examples]),
        "image_index": image_index,
        "supervised_positions": positions,
        "supervised_target_ids": target_ids,
        "supervised_seq_ids": seq_ids,
        "supervised_counts": torch.bincount(seq_ids, minlength=2 * len(examples)),
        **{name: floats(name) for name in ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_mean_logps",
                                           "ref_rejected_mean_logps", "hardness")},
    }


class PackedCollator:
    """Lays the P pairs of a micro-batch out as one packed row of S = 2P sequences (see PackedBatch)."""

    def __call__(self, examples: Sequence[PreferenceExample]) -> PackedBatch:
        input_ids, labels = _sequences(examples)
        lengths = torch.tensor([ids.shape[0] for ids in input_ids])  # (S,)
        cu_seqlens = torch.zeros(len(input_ids) + 1, dtype=torch.int32)
        cu_seqlens[1:] = lengths.cumsum(0)
        seq_ids = torch.repeat_interleave(torch.arange(len(input_ids)), lengths)  # (N,)
        starts = cu_seqlens[:-1].long().repeat_interleave(lengths)
        position_ids = torch.arange(seq_ids.shape[0]) - starts  # (N,)
        targets = torch.cat([_shifted(lab) for lab in labels])  # (N,)
        # The attention's bounds are checked here, once per batch on the CPU: on a GPU, attention checks shapes only.
        check_packed_segments(cu_seqlens, seq_ids.shape[0])
        return PackedBatch(
            **_pair_fields(examples, _supervised(targets, seq_ids), torch.arange(len(examples)).repeat(2)),
            input_ids=torch.cat(input_ids).unsqueeze(0),
            position_ids=position_ids.unsqueeze(0),
            cu_seqlens=cu_seqlens,
            max_seqlen=int(lengths.max()),
            seq_ids=seq_ids,
            target_ids=targets,
        )


def _shared_prompt_length(example: PreferenceExample) -> int:
    """The example's prompt length, after checking that both sequences start with that prompt and go past it."""
    prompt = example.prompt_length
    chosen, rejected = example.chosen_input_ids, example.rejected_input_ids
    if not 1 <= prompt < min(chosen.shape[0], rejected.shape[0]):
        raise DamaError(
            f"row {example.row_id}: prefix sharing needs a prompt of at least one token and a response of at least "
            f"one token on each side, got prompt_length={prompt} for sequences of {chosen.shape[0]} and "
            f"{rejected.shape[0]} tokens; use layout='packed' for such pairs"
        )
    if not torch.equal(chosen[:prompt], rejected[:prompt]):
        raise DamaError(f"row {example.row_id}: the chosen and rejected sequences differ within their first "
                        f"prompt_length={prompt} tokens, so there is no prompt to share; use layout='packed'")
    return prompt


class PrefixSharedCollator:
    """Lays the P pairs of a micro-batch out as one row of [prompt | chosen | rejected] per pair (PrefixSharedBatch).

    Each sequence keeps its own labels and shift: its row positions are the prompt's, then its response's, and its
    supervised tokens are taken from those positions, so the prompt's last token scores each response's first token
    (twice in supervised_positions, once per sequence).
    """

    def __call__(self, examples: Sequence[PreferenceExample]) -> PrefixSharedBatch:
        _sequences(examples)
        num_pairs = len(examples)
        row_ids, position_ids, key_index, key_lengths, query_lengths = [], [], [], [], []
        positions, target_ids, seq_ids = [], [], []
        start = 0
        for pair, example in enumerate(examples):
            prompt = _shared_prompt_length(example)
            chosen_length = example.chosen_input_ids.shape[0]
            rejected_response = example.rejected_input_ids.shape[0] - prompt
            row_ids += [example.chosen_input_ids, example.rejected_input_ids[prompt:]]
            position_ids += [torch.arange(chosen_length), torch.arange(prompt, prompt + rejected_response)]
            # Row positions of each sequence's tokens: [prompt | chosen] is contiguous; the rejected sequence is the
            # prompt, then the rejected response after the chosen one. They are also each segment's keys.
            chosen_rows = torch.arange(start, start + chosen_length)
            rejected_rows = torch.cat([chosen_rows[:prompt], torch.arange(start + chosen_length,
                                                                          start + chosen_length + rejected_response)])
            for seq, rows, labels in ((pair, chosen_rows, example.chosen_labels),
                                      (num_pairs + pair, rejected_rows, example.rejected_labels)):
                targets = _shifted(labels)
                scored = (targets != IGNORE_INDEX).nonzero().squeeze(1)
                positions.append(rows.index_select(0, scored))
                target_ids.append(targets.index_select(0, scored))
                seq_ids.append(torch.full_like(scored, seq))
                key_index.append(rows)
            query_lengths += [chosen_length, rejected_response]
            key_lengths += [chosen_length, prompt + rejected_response]
            start += chosen_length + rejected_response
        # Token order; at a prompt's last token the chosen entry stays before the rejected one (stable sort).
        positions = torch.cat(positions)
        order = torch.argsort(positions, stable=True)
        supervised = (positions[order], torch.cat(target_ids)[order], torch.cat(seq_ids)[order])
        cu_seqlens, cu_seqlens_k, key_index = _bounds(query_lengths), _bounds(key_lengths), torch.cat(key_index)
        # Checked once per batch on the CPU (see PackedCollator).
        check_packed_segments(cu_seqlens, start, key_index=key_index, cu_seqlens_k=cu_seqlens_k)
        return PrefixSharedBatch(
            **_pair_fields(examples, supervised, torch.arange(num_pairs)),
            input_ids=torch.cat(row_ids).unsqueeze(0),
            position_ids=torch.cat(position_ids).unsqueeze(0),
            cu_seqlens=cu_seqlens,
            max_seqlen=max(query_lengths),
            key_index=key_index,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_k=max(key_lengths),
        )


def _bounds(lengths: Sequence[int]) -> torch.Tensor:
    """Segment lengths -> (len + 1,) int32 cumulative bounds from 0."""
    bounds = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    bounds[1:] = torch.tensor(lengths).cumsum(0)
    return bounds


class PaddedCollator:
    """Right-pads the S = 2P sequences of a micro-batch to one length and stacks them (see PaddedBatch)."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a token id >= 0, got {pad_token_id}")
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[PreferenceExample]) -> PaddedBatch:
        input_ids, labels = _sequences(examples)
        length = max(ids.shape[0] for ids in input_ids)
        num_seqs = len(input_ids)
        padded_ids = torch.full((num_seqs, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((num_seqs, length), dtype=torch.long)
        targets = torch.full((num_seqs, length), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, lab) in enumerate(zip(input_ids, labels, strict=True)):
            padded_ids[row, : ids.shape[0]] = ids
            attention_mask[row, : ids.shape[0]] = 1
            targets[row, : ids.shape[0]] = _shifted(lab)
        seq_ids = torch.arange(num_seqs).repeat_interleave(length)  # (S * T,)
        return PaddedBatch(
            **_pair_fields(examples, _supervised(targets.reshape(-1), seq_ids), torch.arange(len(examples)).repeat(2)),
            input_ids=padded_ids,
            attention_mask=attention_mask,
            target_ids=targets,
        )


def make_collator(layout: str, pad_token_id: int | None = None) -> Callable[[Sequence[PreferenceExample]],
                                                                        PreferenceBatch]:
    """The collator of a layout in LAYOUTS; the padded layout needs the tokenizer's pad_token_id."""
    if layout == "prefix_shared":
        return PrefixSharedCollator()
    if layout == "packed":
        return PackedCollator()
    if layout == "padded":
        return PaddedCollator(pad_token_id)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def layout_pair_lengths(pair_lengths: Sequence[int], prompt_lengths: Sequence[int], layout: str) -> list[int]:
    """Tokens each pair adds to a micro-batch of `layout`, for TokenBudgetBatchSampler's budget.

    pair_lengths count both sequences in full, prompt_lengths the prompt (PreferenceDataset's properties of those
    names): prefix_shared holds the prompt once, so it counts pair length minus prompt; packed (and padded, whose
    budget is the same packed count) count the pair length.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "prefix_shared":
        return list(pair_lengths)
    return [total - prompt for total, prompt in zip(pair_lengths, prompt_lengths, strict=True)]


class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """Groups pairs into micro-batches whose row length stays within `max_tokens`.

    Pairs are taken in order (a permutation drawn from (seed, epoch) when shuffling, else dataset order) and added
    to the current micro-batch while its total length stays <= max_tokens and it has fewer than `max_pairs` pairs.
    A packed or prefix-shared row has no padding, so this greedy grouping wastes nothing but the budget's tail. Call
    `set_epoch` before each epoch for a new order. A pair longer than the budget on its own is an error.

    Shapes: pair_lengths is P_total ints, the tokens each pair takes in the layout (layout_pair_lengths); yields
    lists of dataset indices.
    """

    def __init__(
        self,
        pair_lengths: Sequence[int],
        max_tokens: int,
        *,
        max_pairs: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if max_tokens < 1:
            raise DamaError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
        if max_pairs is not None and max_pairs < 1:
            raise DamaError(f"max_pairs must be >= 1 or None, got {max_pairs}")
        too_long = [(i, n) for i, n in enumerate(pair_lengths) if n > max_tokens]
        if too_long:
            index, length = too_long[0]
            raise DamaError(
                f"{len(too_long)} pairs are longer than max_tokens={max_tokens} on their own (first: pair {index}, "
                f"{length} tokens); raise max_tokens to at least {max(n for _, n in too_long)} or lower max_length"
            )
        self.pair_lengths = list(pair_lengths)
        self.max_tokens = max_tokens
        self.max_pairs = max_pairs
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.pair_lengths), generator=generator).tolist()
        else:
            order = range(len(self.pair_lengths))
        batches, current, used = [], [], 0
        for index in order:
            length = self.pair_lengths[index]
            full = self.max_pairs is not None and len(current) == self.max_pairs
            if current and (used + length > self.max_tokens or full):
                batches.append(current)
                current, used = [], 0
            current.append(index)
            used += length
        if current and not self.drop_last:
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())

"""Collators of preference pairs into the batch layouts of dama.data.batch (packed, padded) and the token-budget
batch sampler."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .batch import IGNORE_INDEX, PackedBatch, PaddedBatch, PreferenceExample


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


def _pair_fields(examples: Sequence[PreferenceExample], targets: torch.Tensor, seq_ids: torch.Tensor) -> dict:
    """The PreferenceBatch fields, given the flattened targets and sequence ids of the layout."""
    shapes = {tuple(e.pixel_values.shape) for e in examples}
    if len(shapes) != 1:
        raise ValueError(f"the images of a batch must share one shape (CLIP crops to a fixed size), got {shapes}")
    num_pairs = len(examples)
    positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (M,)
    supervised_seq_ids = seq_ids.index_select(0, positions)

    def floats(name: str) -> torch.Tensor:
        return torch.tensor([getattr(e, name) for e in examples], dtype=torch.float32)

    return {
        "row_ids": [e.row_id for e in examples],
        "pixel_values": torch.stack([e.pixel_values for e in examples]),
        "image_index": torch.arange(num_pairs).repeat(2),
        "supervised_positions": positions,
        "supervised_target_ids": targets.index_select(0, positions),
        "supervised_seq_ids": supervised_seq_ids,
        "supervised_counts": torch.bincount(supervised_seq_ids, minlength=2 * num_pairs),
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
        return PackedBatch(
            **_pair_fields(examples, targets, seq_ids),
            input_ids=torch.cat(input_ids).unsqueeze(0),
            position_ids=position_ids.unsqueeze(0),
            cu_seqlens=cu_seqlens,
            max_seqlen=int(lengths.max()),
            seq_ids=seq_ids,
            target_ids=targets,
        )


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
            **_pair_fields(examples, targets.reshape(-1), seq_ids),
            input_ids=padded_ids,
            attention_mask=attention_mask,
            target_ids=targets,
        )


class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """Groups pairs into micro-batches whose packed length stays within `max_tokens`.

    Pairs are taken in order (a permutation drawn from (seed, epoch) when shuffling, else dataset order) and added
    to the current micro-batch while its total packed length stays <= max_tokens and it has fewer than `max_pairs`
    pairs. A packed batch has no padding, so this greedy grouping wastes nothing but the budget's tail. Call
    `set_epoch` before each epoch for a new order. A pair longer than the budget on its own is an error.

    Shapes: pair_lengths is P_total ints (PreferenceDataset.pair_lengths); yields lists of dataset indices.
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
            raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
        if max_pairs is not None and max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1 or None, got {max_pairs}")
        too_long = [(i, n) for i, n in enumerate(pair_lengths) if n > max_tokens]
        if too_long:
            index, length = too_long[0]
            raise ValueError(
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

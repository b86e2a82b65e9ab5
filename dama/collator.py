"""Micro-batches of preference pairs: packed (one row, no padding) and padded (the usual baseline).

Shape letters: P pairs, S = 2P sequences, N tokens of the packed row, M supervised (scored) tokens, I image slots.

Sequence order, both layouts: the chosen block, then the rejected block. Sequence s < P is the chosen response of
pair s, sequence P + s the rejected response of pair s, so a per-sequence result (S,) splits as values[:P] (chosen)
and values[P:] (rejected): `split_chosen_rejected`.

Shift: the hidden state at token t scores the token after it in the SAME sequence. `target_ids[t]` is that token's
label (its id where supervised, else -100); the last token of every sequence has target -100, so no score ever
crosses a sequence boundary. `supervised_positions` lists the t with target_ids[t] != -100, in token order, into the
flattened token axis (N for the packed row, S * T for the padded batch), with `supervised_target_ids` and
`supervised_seq_ids` beside them: exactly what `dama_kernels.sequence_logps` takes after gathering those hidden
states, so both layouts are scored by the same code:
    hidden = hidden_states.reshape(-1, H).index_select(0, batch.supervised_positions)        # (M, H)
    logps = sequence_logps(hidden, lm_head.weight, batch.supervised_target_ids, batch.supervised_seq_ids, S)
    chosen_logps, rejected_logps = batch.split_chosen_rejected(logps)                          # (P,), (P,)

Images: `pixel_values` (P, 3, h, w) holds each pair's image once, so the vision tower encodes it once. The image
tokens of the batch, read in flattened token order, form I runs of equal length (one per image slot: here every
sequence has one, I = S); run k is filled by the features of image `image_index[k]`:
    features = vision_and_projector(batch.pixel_values)                                        # (P, T_img, H)
    inputs_embeds.masked_scatter(input_ids == image_token_id, features[batch.image_index])    # T_img per slot
(in transformers' LLaVA: pass `mm_encoder_outputs` whose pooler_output is list(features[batch.image_index])). The
gradient of a feature used by both sequences of a pair is summed by the index, as it should be.

Generality: sequences (what is scored, S outputs) are kept apart from the token layout (`supervised_*`,
`image_index`, and the packed row's attention segments `cu_seqlens`). A later layout in which chosen and rejected
share one copy of the image and prompt tokens changes what the collator writes into these fields (fewer image
slots, I = P; attention segments that are not sequences), not the fields nor the code that consumes them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch

from dama.data import IGNORE_INDEX, PreferenceExample


def split_chosen_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, ...) per-sequence values in the collators' order -> chosen (P, ...), rejected (P, ...)."""
    if values.dim() == 0 or values.shape[0] % 2:
        raise ValueError(
            f"expected (S, ...) with S = 2P even (chosen block, then rejected block), got {tuple(values.shape)}"
        )
    num_pairs = values.shape[0] // 2
    return values[:num_pairs], values[num_pairs:]


@dataclass
class PreferenceBatch:
    """What both layouts carry. Shapes: P pairs, S = 2P sequences, M supervised tokens, I image slots.

    row_ids: list of P row ids.
    pixel_values (P, 3, h, w): one image per pair.
    image_index (I,) int64: image slot k (k-th run of image tokens in flattened token order) shows image_index[k].
    supervised_positions (M,) int64: flattened token positions t whose hidden state scores a supervised token.
    supervised_target_ids (M,) int64: the token each of them scores (input id at t + 1 in its sequence).
    supervised_seq_ids (M,) int64: its sequence, in [0, S).
    supervised_counts (S,) int64: supervised tokens per sequence (divide by it for mean log-probs).
    ref_chosen_logps, ref_rejected_logps, ref_chosen_mean_logps, ref_rejected_mean_logps (P,) float32: reference
        log-probs from the data, NaN where absent.
    hardness (P,) float32: the data hardness, NaN where absent.
    """

    row_ids: list[str]
    pixel_values: torch.Tensor
    image_index: torch.Tensor
    supervised_positions: torch.Tensor
    supervised_target_ids: torch.Tensor
    supervised_seq_ids: torch.Tensor
    supervised_counts: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    ref_chosen_mean_logps: torch.Tensor
    ref_rejected_mean_logps: torch.Tensor
    hardness: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return len(self.row_ids)

    @property
    def num_seqs(self) -> int:
        return 2 * len(self.row_ids)

    def split_chosen_rejected(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, ...) -> chosen (P, ...), rejected (P, ...)."""
        if values.shape[:1] != (self.num_seqs,):
            raise ValueError(f"expected ({self.num_seqs}, ...) per-sequence values, got {tuple(values.shape)}")
        return split_chosen_rejected(values)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PreferenceBatch:
        """A copy with every tensor on `device` (integers stay integers, floats keep their dtype)."""
        moved = {
            f.name: value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
            for f in fields(self)
            for value in (getattr(self, f.name),)
        }
        return type(self)(**moved)


@dataclass
class PackedBatch(PreferenceBatch):
    """The S sequences of a micro-batch laid end to end in one row of N tokens, without padding.

    input_ids (1, N) int64; position_ids (1, N) int64, restarting at 0 at every sequence start.
    cu_seqlens (S + 1,) int32: attention segment k is tokens [cu_seqlens[k], cu_seqlens[k + 1]) (here segment k is
        sequence k); max_seqlen: the longest segment, a Python int (flash-attn's varlen arguments).
    seq_ids (N,) int64: the sequence of each token. target_ids (N,) int64: the shifted labels (module docstring).
    supervised_positions index this row's N tokens.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    seq_ids: torch.Tensor
    target_ids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def model_inputs(self) -> dict:
        """Keyword arguments of the language model's forward for packed attention (any pixel_values aside).

        cu_seq_lens_q/k and max_length_q/k are transformers' names for varlen attention: its decoder layers pass
        them on to the attention function ("dama_packed", or "flash_attention_2"). use_cache=False: with a cache,
        sdpa would let packed sequences attend to each other, and training needs none.
        """
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
            "use_cache": False,
        }


@dataclass
class PaddedBatch(PreferenceBatch):
    """The S sequences right-padded to the longest, T tokens, and stacked: the usual (S, T) layout.

    input_ids (S, T) int64 with pad_token_id after each sequence's end; attention_mask (S, T) int64, 1 on real
    tokens; target_ids (S, T) int64, the shifted labels, -100 on padding. Positions in PreferenceBatch fields index
    the flattened (S * T) token axis.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_ids: torch.Tensor

    def model_inputs(self) -> dict:
        """Keyword arguments of the language model's forward (any pixel_values aside)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}


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

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a token id >= 0, got {pad_token_id}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[PreferenceExample]) -> PaddedBatch:
        input_ids, labels = _sequences(examples)
        length = max(ids.shape[0] for ids in input_ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
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

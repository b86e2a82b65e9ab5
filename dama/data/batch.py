"""The data types the model sees, torch only: one tokenized pair (PreferenceExample) and the micro-batches the
collators make of them, in three layouts: prefix-shared, packed (one row, no padding) and padded (the usual baseline).

Shape letters: P pairs, S = 2P sequences, N tokens of the row, M supervised (scored) tokens, I image slots.

Sequence order, all layouts: the chosen block, then the rejected block. Sequence s < P is the chosen response of
pair s, sequence P + s the rejected response of pair s, so a per-sequence result (S,) splits as values[:P] (chosen)
and values[P:] (rejected): `split_chosen_rejected`.

Layouts. Packed: the S sequences end to end, each attending to itself. Prefix-shared: per pair, the prompt (image
tokens included) once, then the chosen response, then the rejected response, [prompt | chosen | rejected]; the
chosen response attends to the prompt and its own earlier tokens, the rejected response to the prompt and its own
earlier tokens (never to the chosen ones), and both responses' positions continue from the end of the prompt. Every
decoder layer computes the prompt once per pair instead of once per sequence. Padded: S rows of T tokens.

Shift: the hidden state at token t scores the token after it in the SAME sequence (prefix-shared: the next token of
the sequence, which for a prompt's last token is each response's first). In the packed and padded layouts
`target_ids[t]` is that token's label (its id where supervised, else -100); the last token of every sequence has
target -100, so no score ever crosses a sequence boundary. `supervised_positions` lists the scoring positions t, in
token order, into the flattened token axis (N for a row, S * T for the padded batch), with `supervised_target_ids`
and `supervised_seq_ids` beside them: exactly what `dama_kernels.sequence_logps` takes after gathering those hidden
states, so every layout is scored by the same code:
    hidden = hidden_states.reshape(-1, H).index_select(0, batch.supervised_positions)        # (M, H)
    logps = sequence_logps(hidden, lm_head.weight, batch.supervised_target_ids, batch.supervised_seq_ids, S)
    chosen_logps, rejected_logps = batch.split_chosen_rejected(logps)                          # (P,), (P,)

Images: `pixel_values` (P, 3, h, w) holds each pair's image once, so the vision tower encodes it once. The image
tokens of the batch, read in flattened token order, form I runs of equal length (one per image slot: packed and padded
give every sequence one, I = S); run k is filled by the features of image `image_index[k]`:
    features = vision_and_projector(batch.pixel_values)                                        # (P, T_img, H)
    inputs_embeds.masked_scatter(input_ids == image_token_id, features[batch.image_index])    # T_img per slot
(DamaPolicy does exactly this, then runs the LLaVA on the embeddings). The gradient of a feature used by both
sequences of a pair is summed by the index, as it should be.

Generality: sequences (what is scored, S outputs) are kept apart from the token layout (`supervised_*`,
`image_index`, and the row's attention segments). The prefix-shared layout fills the same fields differently: one
image slot per pair (I = P, image_index = arange(P)); the prompt's last token scores the first token of both responses,
so its position appears twice in supervised_positions (once per sequence); and its attention segments are not
sequences (PrefixSharedBatch). The code that consumes the fields is the same for every layout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PreferenceExample:
    """One tokenized pair. Both sequences start with the same prompt (bos, template, image tokens, question).

    Shapes: chosen_input_ids, chosen_labels (Lc,); rejected_input_ids, rejected_labels (Lr,); pixel_values (3, h, w).
    Labels are aligned with the input ids (not shifted): the token id on the response and its "</s>", -100 on the
    first prompt_length tokens. Reference values are NaN when the data has none.
    """

    row_id: str
    prompt_length: int
    chosen_input_ids: torch.Tensor
    chosen_labels: torch.Tensor
    rejected_input_ids: torch.Tensor
    rejected_labels: torch.Tensor
    pixel_values: torch.Tensor
    ref_chosen_logps: float
    ref_rejected_logps: float
    ref_chosen_mean_logps: float
    ref_rejected_mean_logps: float
    hardness: float


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

    def __contains__(self, name: object) -> bool:
        """Whether the batch has a field `name`. transformers.Trainer asks for "labels" to count the loss tokens; a
        preference batch has none to count (DamaLoss normalises by the pairs it selects)."""
        return any(f.name == name for f in fields(self))

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


@dataclass
class PrefixSharedBatch(PreferenceBatch):
    """The P pairs of a micro-batch in one row of N tokens, each pair as [prompt | chosen | rejected] (module
    docstring): the prompt's tokens, image tokens included, appear once per pair instead of once per sequence.

    input_ids (1, N) int64. position_ids (1, N) int64: 0 .. Lp - 1 on a pair's prompt, then Lp, Lp + 1, ... on each
    of its responses (both start at Lp, as in their own sequences).
    Attention segments (two per pair, 2P in all; dama.model.attention, key_index form):
      cu_seqlens (2P + 1,) int32: query segments over the row: [prompt | chosen] of pair p, then its [rejected];
      key_index (K,) int64: the row positions of every segment's keys, segment after segment: [prompt | chosen]
          attends to itself, [rejected] to the pair's prompt followed by itself (K = N + the prompts' tokens);
      cu_seqlens_k (2P + 1,) int32: segment k's keys are key_index[cu_seqlens_k[k]:cu_seqlens_k[k + 1]];
      max_seqlen, max_seqlen_k: the longest query and key segment, Python ints.
    supervised_positions index this row's N tokens, in token order (a prompt's last token twice: chosen, rejected).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    key_index: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_k: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def model_inputs(self) -> dict:
        """Keyword arguments of the language model's forward for "dama_packed" attention (any pixel_values aside).

        As PackedBatch.model_inputs(), plus key_index, which "dama_packed" reads to find each segment's keys (no
        other attention implementation understands this layout). use_cache=False: all keys come from this forward.
        """
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens_k,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen_k,
            "key_index": self.key_index,
            "use_cache": False,
        }

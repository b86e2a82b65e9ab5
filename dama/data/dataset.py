"""Preference pairs as LLaVA-1.5 sees them: template, tokens, supervised labels, image tensors, reference log-probs.

Rows are read by dama.data.formats (RLAIF-V parquet and the authors' JSON, row ids, row selection, the one rule for
images); their reference log-probs and hardness by dama.data.row_values. docs/method.md section 9 describes the data.

Template (LLaVA-1.5, vicuna v1): "<s>" + "{system} USER: <image>\\n{question} ASSISTANT:" is the prompt and
" {response}" + "</s>" the response. Tokenized as LLaVA-1.5 was trained (LLaVA's `tokenizer_image_token`): the
prompt text on each side of "<image>" is tokenized by its own call, "<s>" is put in front once, and the image token
is expanded between the two. With LLaVA-1.5's SentencePiece tokenizer every call starts with the word-boundary
prefix, so the text after the image starts with the bare prefix piece and then "\\n" (ids 29871, 13), as in
training; one call over the whole prompt would lose that 29871. The response is tokenized separately and appended,
so the boundary is exact: only the response tokens and the end token "</s>" are supervised (labels -100 on the
prompt). The response is tokenized in the context of "ASSISTANT:" and that context's tokens are cut off again, which
gives the tokens the response has inside the full conversation for byte-level BPE and SentencePiece tokenizers
alike. The single "<image>" token becomes as many image tokens as the vision tower yields features (576 for
LLaVA-1.5: (336 / 14)^2; read from the processor). An "<image>" already inside a question is dropped, since the
template places the image; questions and responses are stripped of surrounding white space.

Truncation: never. A response cut short would be scored as a different response, and a prompt cut short loses the
image or the question. A pair whose prompt plus longer response exceeds `max_length` tokens is an error
(overlong="error", the default) or is left out and counted (overlong="skip": `num_skipped`, `skipped_row_ids`).

Reference log-probs are used only where they fit this tokenization (dama.data.row_values checks each row). A dataset
written by `dama precompute-ref` records the encoding it was scored with (`PairEncoder.signature`) and its image
setting in `<dataset>.meta.json`; `from_path` refuses the dataset's reference values when these differ from the
run's. Absent values are NaN (the trainer then needs a reference model online).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image

from dama.errors import DamaError
from dama.options import (
    IMAGE_ASPECT_RATIOS,
    MIN_MAX_LENGTH,
    OVERLONG_POLICIES,
    VICUNA_V1_SYSTEM,
    EncodingOptions,
    check_at_least,
    check_choice,
)

from .batch import IGNORE_INDEX, PreferenceExample
from .formats import (
    IMAGE_COLUMNS,
    REF_LOGPS_COLUMNS,
    default_image_folder,
    load_preference_rows,
    metadata_path,
    open_row_image,
)
from .row_values import reference_values, row_hardness

# Rows per tokenizer call while encoding a dataset: the fast tokenizer encodes a batch in parallel.
ENCODE_BATCH = 1024
# The pair PairEncoder.signature encodes: its ids pin down the template and the tokenizer's behaviour on it.
SIGNATURE_PAIR = ("What is in the image?\nAnswer briefly.", "A cat: 3 kittens, 1 ball.")


def dataset_options(encoding: EncodingOptions) -> dict[str, Any]:
    """PreferenceDataset's options that the encoding group decides (training's and precompute-ref's, which must agree):
    max_length, overlong, image_aspect_ratio and the template with its system prompt."""
    return {"max_length": encoding.max_length, "overlong": encoding.overlong,
            "image_aspect_ratio": encoding.image_aspect_ratio,
            "template": ConversationTemplate(system=encoding.system_prompt)}


@dataclass(frozen=True)
class ConversationTemplate:
    """LLaVA-1.5's vicuna v1 conversation: "{system} USER: <image>\\n{question} ASSISTANT: {response}</s>"."""

    system: str = VICUNA_V1_SYSTEM
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"

    def prompt_chunks(self, question: str, image_token: str) -> tuple[str, str]:
        """The prompt's text before and after the image, each tokenized by its own call like LLaVA's."""
        question = question.replace(image_token, "").strip()
        return f"{self.system} {self.user_role}: ", f"\n{question} {self.assistant_role}:"

    def prompt(self, question: str, image_token: str) -> str:
        before, after = self.prompt_chunks(question, image_token)
        return before + image_token + after

    @property
    def response_context(self) -> str:
        """The text the response follows directly; it is tokenized with the response and cut off again."""
        return f"{self.assistant_role}:"


def num_image_tokens(processor: Any) -> int:
    """How many image tokens one `<image>` stands for: the vision tower's patch features that LLaVA keeps.

    (crop height / patch) * (crop width / patch) + the tower's extra tokens (CLS), minus the CLS again when the
    feature strategy is "default": 576 for LLaVA-1.5 at 336 px and patch 14.
    """
    image_processor = processor.image_processor
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", True) else None
    if not crop or "height" not in crop or "width" not in crop:
        raise DamaError(
            "the image processor must centre-crop to a fixed {height, width} (LLaVA-1.5's CLIP processing); "
            f"got crop_size={crop}"
        )
    patch_size = getattr(processor, "patch_size", None)
    if not patch_size:
        raise DamaError("the processor has no patch_size; build it as LlavaProcessor(..., patch_size=...)")
    count = (crop["height"] // patch_size) * (crop["width"] // patch_size)
    count += getattr(processor, "num_additional_image_tokens", 0) or 0
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        count -= 1
    if count < 1:
        raise DamaError(f"the processor yields {count} image tokens; check patch_size and crop_size")
    return count


class PairEncoder:
    """Tokenizes prompts and responses with the template; see the module docstring for the exact layout."""

    def __init__(self, processor: Any, template: ConversationTemplate = ConversationTemplate()):
        self.tokenizer = processor.tokenizer
        self.template = template
        self.image_token = getattr(processor, "image_token", "<image>")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise DamaError(f"the tokenizer has no {self.image_token!r} token; add it as a special token")
        if self.tokenizer.eos_token_id is None:
            raise DamaError("the tokenizer has no eos token; LLaVA's responses end with '</s>'")
        self.num_image_tokens = num_image_tokens(processor)
        bos = self.tokenizer.bos_token_id
        self._bos = [] if bos is None else [bos]
        self._context_ids = self._encode([template.response_context])[0]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode_prompts(self, questions: Sequence[str]) -> list[list[int]]:
        """bos + the text before the image + num_image_tokens image tokens + the text after it (module docstring)."""
        chunks = [self.template.prompt_chunks(q, self.image_token) for q in questions]
        befores = self._encode([before for before, _ in chunks])
        afters = self._encode([after for _, after in chunks])
        image = [self.image_token_id] * self.num_image_tokens
        encoded = []
        for question, before, after in zip(questions, befores, afters, strict=True):
            if self.image_token_id in before or self.image_token_id in after:
                raise DamaError(f"the prompt of question {question!r} holds a second image token (in the template's "
                                "system text?); LLaVA-1.5 takes one image per prompt")
            encoded.append(self._bos + before + image + after)
        return encoded

    def encode_responses(self, responses: Sequence[str]) -> list[list[int]]:
        """The response tokens as they follow "ASSISTANT:" in the conversation, then eos."""
        context = self.template.response_context
        cut = len(self._context_ids)
        encoded = []
        for response, ids in zip(responses, self._encode([f"{context} {r.strip()}" for r in responses]), strict=True):
            if ids[:cut] != self._context_ids:
                raise DamaError(
                    f"the tokenizer merges {context!r} with the start of the response {response[:40]!r}, so the "
                    "prompt/response boundary is not a token boundary; use a tokenizer that splits on white space"
                )
            encoded.append(ids[cut:] + [self.tokenizer.eos_token_id])
        return encoded

    @property
    def signature(self) -> str:
        """A short hash of the template and of the ids of a fixed pair: equal for two encoders that tokenize alike.

        `dama precompute-ref` records it beside its output; reference log-probs are refused when the run's differs.
        """
        question, response = SIGNATURE_PAIR
        payload = {"template": asdict(self.template), "prompt": self.encode_prompts([question])[0],
                   "response": self.encode_responses([response])[0]}
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized preference pairs; images are decoded and processed when an example is read.

    Texts are tokenized once, when the dataset is built. Index i is the i-th kept pair (over-long pairs may be
    skipped, see the module docstring); `pair_lengths[i]` is its packed length (chosen plus rejected sequence),
    known without touching an image, for token-budget batching.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        processor: Any,
        *,
        image_folder: str | Path | None = None,
        max_length: int | None = 2048,
        overlong: str = "error",
        template: ConversationTemplate = ConversationTemplate(),
        image_aspect_ratio: str = "crop",
        reference_record: Mapping[str, Any] | None = None,
    ):
        """`reference_record`: the metadata `dama precompute-ref` wrote beside these rows (its `encoding` and
        `image_aspect_ratio`), checked against this dataset's before any reference value is used."""
        check_choice("overlong", overlong, OVERLONG_POLICIES)
        check_choice("image_aspect_ratio", image_aspect_ratio, IMAGE_ASPECT_RATIOS)
        check_at_least("max_length", max_length, MIN_MAX_LENGTH, optional=True)
        if "row_id" not in rows.column_names:
            raise DamaError("rows need a row_id column; read them with load_preference_rows")
        self.processor = processor
        self.encoder = PairEncoder(processor, template)
        self.image_folder = None if image_folder is None else Path(image_folder)
        self.image_aspect_ratio = image_aspect_ratio
        self.max_length = max_length
        self._images = rows.select_columns([c for c in IMAGE_COLUMNS if c in rows.column_names])
        self._rows: list[int] = []
        self._prompts: list[list[int]] = []
        self._responses: list[tuple[list[int], list[int]]] = []
        self._row_ids: list[str] = []
        self._reference: list[tuple[float, float, float, float]] = []
        self._hardness: list[float] = []
        self.skipped_row_ids: list[str] = []
        if reference_record is not None and any(c in rows.column_names for c in (*REF_LOGPS_COLUMNS, "logps")):
            self._check_reference_record(reference_record)
        small = rows.select_columns([c for c in rows.column_names if c not in IMAGE_COLUMNS])
        for start in range(0, small.num_rows, ENCODE_BATCH):
            self._encode_batch(start, small[start:start + ENCODE_BATCH], overlong)

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        processor: Any,
        *,
        image_folder: str | Path | None = None,
        cache_dir: str | Path | None = None,
        limit: int | None = None,
        select: Sequence[str] = (),
        **options: Any,
    ) -> PreferenceDataset:
        """Read a parquet or JSON input (see load_preference_rows, which applies `select` and `limit`); images resolve
        under `image_folder`, by default the input's folder (the input itself when it is a folder of shards). The
        metadata beside the input, when there is one, is the `reference_record`."""
        if image_folder is None:
            image_folder = default_image_folder(path)
        rows = load_preference_rows(path, cache_dir=cache_dir, limit=limit, select=select)
        record = None
        if metadata_path(path).is_file():
            record = json.loads(metadata_path(path).read_text(encoding="utf-8"))
        return cls(rows, processor, image_folder=image_folder, reference_record=record, **options)

    def _check_reference_record(self, record: Mapping[str, Any]) -> None:
        """DamaError when the reference values were computed with another encoding or image setting than this."""
        encoding, aspect = record.get("encoding"), record.get("image_aspect_ratio")
        if encoding is not None and encoding != self.encoder.signature:
            raise DamaError(
                f"the reference log-probs of this data were computed with another template or tokenizer (encoding "
                f"{encoding}, this run's {self.encoder.signature}; system prompt then: {record.get('system_prompt')!r})"
                ". Run `dama precompute-ref` again with this model and template."
            )
        if aspect is not None and aspect != self.image_aspect_ratio:
            raise DamaError(
                f"the reference log-probs of this data were computed with image_aspect_ratio={aspect!r}, this run "
                f"uses {self.image_aspect_ratio!r}: use the same setting or run `dama precompute-ref` again."
            )

    def _encode_batch(self, start: int, batch: dict[str, list], overlong: str) -> None:
        prompts = self.encoder.encode_prompts([q or "" for q in batch["question"]])
        chosen = self.encoder.encode_responses([r or "" for r in batch["chosen"]])
        rejected = self.encoder.encode_responses([r or "" for r in batch["rejected"]])
        for offset, row_id in enumerate(batch["row_id"]):
            prompt, responses = prompts[offset], (chosen[offset], rejected[offset])
            longest = len(prompt) + max(len(r) for r in responses)
            if self.max_length is not None and longest > self.max_length:
                if overlong == "error":
                    raise DamaError(
                        f"row {row_id}: prompt ({len(prompt)} tokens, image included) plus the longer response is "
                        f"{longest} tokens > max_length={self.max_length}. Responses are never truncated: raise "
                        "max_length, or pass overlong='skip' to leave such pairs out (they are counted)."
                    )
                self.skipped_row_ids.append(row_id)
                continue
            row = {key: values[offset] for key, values in batch.items()}
            chosen_ref, rejected_ref = reference_values(row, len(prompt), [len(r) for r in responses],
                                                        self.authors_template)
            self._rows.append(start + offset)
            self._row_ids.append(row_id)
            self._prompts.append(prompt)
            self._responses.append(responses)
            self._reference.append((chosen_ref.logps, rejected_ref.logps, chosen_ref.mean_logps,
                                    rejected_ref.mean_logps))
            self._hardness.append(row_hardness(row))

    @property
    def authors_template(self) -> bool:
        """Whether the template is LLaVA-1.5's own, with which the authors' reference log-probs were computed."""
        return self.encoder.template == ConversationTemplate()

    @property
    def num_with_hardness(self) -> int:
        """Kept pairs that have a hardness value."""
        return sum(not math.isnan(h) for h in self._hardness)

    @property
    def hardness_mean(self) -> float | None:
        """The mean hardness over the kept pairs that have one; None when none has."""
        values = [h for h in self._hardness if not math.isnan(h)]
        return math.fsum(values) / len(values) if values else None

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_row_ids)

    @property
    def pair_lengths(self) -> list[int]:
        """Tokens of each kept pair in the packed layout: prompt + chosen, plus prompt + rejected."""
        return [2 * len(p) + len(c) + len(r) for p, (c, r) in zip(self._prompts, self._responses, strict=True)]

    @property
    def prompt_lengths(self) -> list[int]:
        """Tokens of each kept pair's prompt (image tokens included): what its chosen and rejected sequences share."""
        return [len(p) for p in self._prompts]

    @property
    def has_reference_logps(self) -> bool:
        """True when every kept pair has both reference sums (then no reference model is needed)."""
        return all(not (math.isnan(c) or math.isnan(r)) for c, r, _, _ in self._reference)

    def __len__(self) -> int:
        return len(self._rows)

    def row_id(self, index: int) -> str:
        return self._row_ids[index]

    def sequences(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, labels) of the chosen and of the rejected sequence of pair `index`, without its image.

        Shapes: (L,) int64 each; labels are -100 on the prompt, the token ids on the response and its "</s>".
        """
        prompt = self._prompts[index]
        return tuple(_sequence(prompt, response) for response in self._responses[index])

    def __getitem__(self, index: int) -> PreferenceExample:
        ref_chosen, ref_rejected, ref_chosen_mean, ref_rejected_mean = self._reference[index]
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = self.sequences(index)
        return PreferenceExample(
            row_id=self._row_ids[index],
            prompt_length=len(self._prompts[index]),
            chosen_input_ids=chosen_ids,
            chosen_labels=chosen_labels,
            rejected_input_ids=rejected_ids,
            rejected_labels=rejected_labels,
            pixel_values=self.pixel_values(index),
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
            ref_chosen_mean_logps=ref_chosen_mean,
            ref_rejected_mean_logps=ref_rejected_mean,
            hardness=self._hardness[index],
        )

    def pixel_values(self, index: int) -> torch.Tensor:
        """The pair's image as the CLIP processor makes it: (3, h, w) float32."""
        record = self._images[self._rows[index]]
        image = open_row_image(record.get("image"), record.get("image_path"), self.image_folder, self._row_ids[index])
        if self.image_aspect_ratio == "pad":
            image = _expand_to_square(image, self.processor.image_processor.image_mean)
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def _expand_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """LLaVA-1.5's "pad" aspect ratio: centre the image on a square of the processor's mean colour, each channel
    255 * mean truncated to an integer as LLaVA's own preprocessing does (CLIP's mean gives (122, 116, 104))."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), tuple(int(255 * m) for m in mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _sequence(prompt: list[int], response: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of prompt + response, labels -100 on the prompt."""
    input_ids = torch.tensor(prompt + response, dtype=torch.long)
    labels = input_ids.clone()
    labels[: len(prompt)] = IGNORE_INDEX
    return input_ids, labels

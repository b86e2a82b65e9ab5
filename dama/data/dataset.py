"""Preference pairs as LLaVA-1.5 sees them: template, tokens, supervised labels, image tensors, reference log-probs.

Inputs (spec section 5), read offline through `datasets`:
- parquet: the RLAIF-V shards (a file, or a folder of `*.parquet` read in name order), columns ds_name,
  image {bytes, path}, question, chosen, rejected, origin_dataset, origin_split, idx, image_path;
- json: the authors' JSON list (question, chosen, rejected, image_path, idx, logps, chosen_logits, ...).
An image comes from `image.bytes`, else from `image.path` / `image_path` resolved under the image folder (default:
the folder of the input). Every row is named "<file name>:<row number in that file>", as the hardness pass does.

Template (LLaVA-1.5, vicuna v1): "<s>" + "{system} USER: <image>\\n{question} ASSISTANT:" is the prompt and
" {response}" + "</s>" the response. The prompt and the response are tokenized separately and concatenated, so the
boundary is exact: only the response tokens and the end token "</s>" are supervised (labels -100 on the prompt).
The response is tokenized in the context of "ASSISTANT:" and that context's tokens are cut off again, which gives
the tokens the response has inside the full conversation for byte-level BPE and SentencePiece tokenizers alike.
The single "<image>" token becomes as many image tokens as the vision tower yields features
(576 for LLaVA-1.5: (336 / 14)^2; read from the processor). An "<image>" already inside a question is dropped,
since the template places the image; questions and responses are stripped of surrounding white space.

Truncation: never. A response cut short would be scored as a different response, and a prompt cut short loses the
image or the question. A pair whose prompt plus longer response exceeds `max_length` tokens is an error
(overlong="error", the default) or is left out and counted (overlong="skip": `num_skipped`, `skipped_row_ids`).

Reference log-probs, per pair, from the first of these that is present:
- the project's columns `ref_chosen_logps`, `ref_rejected_logps` (sums), optional `ref_chosen_mean_logps`,
  `ref_rejected_mean_logps`, `ref_chosen_token_logps`, `ref_rejected_token_logps` (lists over supervised tokens);
- the RLAIF-V / authors' `logps` = [chosen_sum, chosen_mean, chosen_per_token, rejected_sum, rejected_mean,
  rejected_per_token], a list or its JSON string.
Absent values are NaN (the trainer then runs the reference model online). A mean that is not given is the sum over
the number of supervised tokens. A per-token list must have one value per supervised token: another length means
the log-probs were made with another tokenization, which would make z != 0 at step 0, so it is an error.
The per-pair `hardness` column is passed through (NaN when absent).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image

from .batch import IGNORE_INDEX, PreferenceExample
from .formats import detect_format, parquet_files, read_json_list

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
OVERLONG_POLICIES = ("error", "skip")
# The reference log-prob columns this project writes and reads (sums, means, lists over supervised tokens).
REF_LOGPS_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
REF_MEAN_COLUMNS = ("ref_chosen_mean_logps", "ref_rejected_mean_logps")
REF_TOKEN_COLUMNS = ("ref_chosen_token_logps", "ref_rejected_token_logps")
# Positions of (sum, mean, per-token) of the chosen and the rejected response in the authors' `logps` list.
AUTHORS_LOGPS_SLOTS = ((0, 1, 2), (3, 4, 5))
TEXT_COLUMNS = ("question", "chosen", "rejected")
IMAGE_COLUMNS = ("image", "image_path")
OPTIONAL_COLUMNS = (*IMAGE_COLUMNS, "logps", *REF_LOGPS_COLUMNS, *REF_MEAN_COLUMNS, *REF_TOKEN_COLUMNS, "hardness")
# Rows per tokenizer call while encoding a dataset: the fast tokenizer encodes a batch in parallel.
ENCODE_BATCH = 1024


@dataclass(frozen=True)
class ConversationTemplate:
    """LLaVA-1.5's vicuna v1 conversation: "{system} USER: <image>\\n{question} ASSISTANT: {response}</s>"."""

    system: str = VICUNA_V1_SYSTEM
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"

    def prompt(self, question: str, image_token: str) -> str:
        question = question.replace(image_token, "").strip()
        return f"{self.system} {self.user_role}: {image_token}\n{question} {self.assistant_role}:"

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
        raise ValueError(
            "the image processor must centre-crop to a fixed {height, width} (LLaVA-1.5's CLIP processing); "
            f"got crop_size={crop}"
        )
    patch_size = getattr(processor, "patch_size", None)
    if not patch_size:
        raise ValueError("the processor has no patch_size; build it as LlavaProcessor(..., patch_size=...)")
    count = (crop["height"] // patch_size) * (crop["width"] // patch_size)
    count += getattr(processor, "num_additional_image_tokens", 0) or 0
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        count -= 1
    if count < 1:
        raise ValueError(f"the processor yields {count} image tokens; check patch_size and crop_size")
    return count


class PairEncoder:
    """Tokenizes prompts and responses with the template; see the module docstring for the exact layout."""

    def __init__(self, processor: Any, template: ConversationTemplate = ConversationTemplate()):
        self.tokenizer = processor.tokenizer
        self.template = template
        self.image_token = getattr(processor, "image_token", "<image>")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.image_token!r} token; add it as a special token")
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; LLaVA's responses end with '</s>'")
        self.num_image_tokens = num_image_tokens(processor)
        bos = self.tokenizer.bos_token_id
        self._bos = [] if bos is None else [bos]
        self._context_ids = self._encode([template.response_context])[0]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode_prompts(self, questions: Sequence[str]) -> list[list[int]]:
        """bos + the templated prompt, its one image token expanded to num_image_tokens."""
        encoded = []
        for question, ids in zip(questions, self._encode([self.template.prompt(q, self.image_token)
                                                           for q in questions]), strict=True):
            slots = [i for i, token in enumerate(ids) if token == self.image_token_id]
            if len(slots) != 1:
                raise ValueError(f"the prompt of question {question!r} has {len(slots)} image tokens, expected 1")
            slot = slots[0]
            encoded.append(self._bos + ids[:slot] + [self.image_token_id] * self.num_image_tokens + ids[slot + 1:])
        return encoded

    def encode_responses(self, responses: Sequence[str]) -> list[list[int]]:
        """The response tokens as they follow "ASSISTANT:" in the conversation, then eos."""
        context = self.template.response_context
        cut = len(self._context_ids)
        encoded = []
        for response, ids in zip(responses, self._encode([f"{context} {r.strip()}" for r in responses]), strict=True):
            if ids[:cut] != self._context_ids:
                raise ValueError(
                    f"the tokenizer merges {context!r} with the start of the response {response[:40]!r}, so the "
                    "prompt/response boundary is not a token boundary; use a tokenizer that splits on white space"
                )
            encoded.append(ids[cut:] + [self.tokenizer.eos_token_id])
        return encoded


def load_preference_rows(
    path: str | Path, *, cache_dir: str | Path | None = None, limit: int | None = None
) -> datasets.Dataset:
    """The rows of a parquet input (file or folder of shards) or of the authors' JSON list, as a `datasets.Dataset`.

    Keeps the columns this module reads (question, chosen, rejected, image, image_path, logps, the ref_* columns,
    hardness) and adds `row_id`. Parquet is converted once into `datasets`' memory-mapped cache (`cache_dir`, by
    default datasets' own); images stay undecoded until an example is read.
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if detect_format(path) == "json":
        rows = _json_rows(path)
    else:
        shards = []
        for file in parquet_files(path):
            shard = datasets.Dataset.from_parquet(str(file), cache_dir=None if cache_dir is None else str(cache_dir))
            shard = shard.select_columns([c for c in (*TEXT_COLUMNS, *OPTIONAL_COLUMNS) if c in shard.column_names])
            shards.append(shard.add_column("row_id", [f"{file.name}:{n}" for n in range(shard.num_rows)]))
        rows = datasets.concatenate_datasets(shards)
    missing = [c for c in TEXT_COLUMNS if c not in rows.column_names]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}; a preference pair needs question, chosen, rejected")
    return rows if limit is None else rows.select(range(min(limit, rows.num_rows)))


def _json_rows(path: Path) -> datasets.Dataset:
    records = read_json_list(path)
    present = [c for c in (*TEXT_COLUMNS, *OPTIONAL_COLUMNS) if any(c in r for r in records)]
    columns: dict[str, list] = {c: [r.get(c) for r in records] for c in present}
    # The authors' `logps` mixes numbers and lists, which Arrow cannot type; its JSON text keeps it intact.
    for column in ("logps", "image"):
        if column in columns:
            columns[column] = [v if v is None or isinstance(v, str) else json.dumps(v) for v in columns[column]]
    columns["row_id"] = [f"{path.name}:{n}" for n in range(len(records))]
    return datasets.Dataset.from_dict(columns)


def _float_or_nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def _reference_values(row: Mapping[str, Any]) -> tuple[list[float], list[float], list[list[float] | None]]:
    """(sums, means, per-token lists) of the chosen and the rejected response from one row; NaN / None if absent."""
    sums, means, tokens = [math.nan, math.nan], [math.nan, math.nan], [None, None]
    logps = row.get("logps")
    if isinstance(logps, str):
        logps = json.loads(logps)
    if logps is not None:
        if len(logps) != 6:
            raise ValueError(
                f"row {row['row_id']}: `logps` must be [chosen_sum, chosen_mean, chosen_per_token, rejected_sum, "
                f"rejected_mean, rejected_per_token], got {len(logps)} entries"
            )
        for side, (total, mean, per_token) in enumerate(AUTHORS_LOGPS_SLOTS):
            sums[side], means[side] = _float_or_nan(logps[total]), _float_or_nan(logps[mean])
            tokens[side] = None if logps[per_token] is None else [float(v) for v in logps[per_token]]
    for side in range(2):
        if row.get(REF_LOGPS_COLUMNS[side]) is not None:
            sums[side] = float(row[REF_LOGPS_COLUMNS[side]])
            means[side] = _float_or_nan(row.get(REF_MEAN_COLUMNS[side]))
            values = row.get(REF_TOKEN_COLUMNS[side])
            tokens[side] = None if values is None else [float(v) for v in values]
    return sums, means, tokens


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
        pad_to_square: bool = False,
    ):
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens or None, got {max_length}")
        if "row_id" not in rows.column_names:
            raise ValueError("rows need a row_id column; read them with load_preference_rows")
        self.processor = processor
        self.encoder = PairEncoder(processor, template)
        self.image_folder = None if image_folder is None else Path(image_folder)
        self.pad_to_square = pad_to_square
        self.max_length = max_length
        self._images = rows.select_columns([c for c in IMAGE_COLUMNS if c in rows.column_names])
        self._rows: list[int] = []
        self._prompts: list[list[int]] = []
        self._responses: list[tuple[list[int], list[int]]] = []
        self._row_ids: list[str] = []
        self._reference: list[tuple[float, float, float, float]] = []
        self._hardness: list[float] = []
        self.skipped_row_ids: list[str] = []
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
        **options: Any,
    ) -> PreferenceDataset:
        """Read a parquet or JSON input (see load_preference_rows); images resolve under `image_folder`, by default
        the input's folder (the input itself when it is a folder of shards)."""
        path = Path(path)
        if image_folder is None:
            image_folder = path if path.is_dir() else path.parent
        rows = load_preference_rows(path, cache_dir=cache_dir, limit=limit)
        return cls(rows, processor, image_folder=image_folder, **options)

    def _encode_batch(self, start: int, batch: dict[str, list], overlong: str) -> None:
        prompts = self.encoder.encode_prompts([q or "" for q in batch["question"]])
        chosen = self.encoder.encode_responses([r or "" for r in batch["chosen"]])
        rejected = self.encoder.encode_responses([r or "" for r in batch["rejected"]])
        for offset, row_id in enumerate(batch["row_id"]):
            prompt, responses = prompts[offset], (chosen[offset], rejected[offset])
            longest = len(prompt) + max(len(r) for r in responses)
            if self.max_length is not None and longest > self.max_length:
                if overlong == "error":
                    raise ValueError(
                        f"row {row_id}: prompt ({len(prompt)} tokens, image included) plus the longer response is "
                        f"{longest} tokens > max_length={self.max_length}. Responses are never truncated: raise "
                        "max_length, or pass overlong='skip' to leave such pairs out (they are counted)."
                    )
                self.skipped_row_ids.append(row_id)
                continue
            row = {key: values[offset] for key, values in batch.items()}
            sums, means, tokens = _reference_values(row)
            for side, name in enumerate(("chosen", "rejected")):
                count = len(responses[side])
                if tokens[side] is not None and len(tokens[side]) != count:
                    raise ValueError(
                        f"row {row_id}: the reference {name} per-token log-probs have {len(tokens[side])} values but "
                        f"the {name} response has {count} supervised tokens here; the reference was computed with "
                        "another tokenizer or template. Recompute the reference log-probs with this setup."
                    )
                if math.isnan(means[side]) and not math.isnan(sums[side]):
                    means[side] = sums[side] / count
            self._rows.append(start + offset)
            self._row_ids.append(row_id)
            self._prompts.append(prompt)
            self._responses.append(responses)
            self._reference.append((sums[0], sums[1], means[0], means[1]))
            self._hardness.append(_float_or_nan(row.get("hardness")))

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

    def __getitem__(self, index: int) -> PreferenceExample:
        prompt = self._prompts[index]
        chosen, rejected = self._responses[index]
        ref_chosen, ref_rejected, ref_chosen_mean, ref_rejected_mean = self._reference[index]
        chosen_ids, chosen_labels = _sequence(prompt, chosen)
        rejected_ids, rejected_labels = _sequence(prompt, rejected)
        return PreferenceExample(
            row_id=self._row_ids[index],
            prompt_length=len(prompt),
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
        image = self._load_image(index)
        if self.pad_to_square:
            image = _expand_to_square(image, self.processor.image_processor.image_mean)
        return self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def _load_image(self, index: int) -> Image.Image:
        row_id, record = self._row_ids[index], self._images[self._rows[index]]
        image = record.get("image")
        if isinstance(image, str):
            image = json.loads(image) if image.startswith("{") else {"path": image}
        path = record.get("image_path")
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, Mapping):
            if image.get("bytes") is not None:
                return _open(io.BytesIO(image["bytes"]), row_id)
            path = image.get("path") or path
        if not path:
            raise ValueError(f"row {row_id} has no image: no image bytes and no image path")
        file = Path(path)
        if not file.is_absolute() and self.image_folder is not None:
            file = self.image_folder / file
        return _open(file, row_id)


def _open(source: Any, row_id: str) -> Image.Image:
    try:
        # convert() decodes every pixel now, so a truncated file fails here, with the row named.
        return Image.open(source).convert("RGB")
    except (OSError, ValueError) as error:
        where = f" {source}" if isinstance(source, Path) else ""
        raise ValueError(f"row {row_id}: cannot read its image{where} ({error})") from error


def _expand_to_square(image: Image.Image, mean: Sequence[float]) -> Image.Image:
    """LLaVA-1.5's "pad" aspect ratio: centre the image on a square of the CLIP mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), tuple(int(round(255 * m)) for m in mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _sequence(prompt: list[int], response: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of prompt + response, labels -100 on the prompt."""
    input_ids = torch.tensor(prompt + response, dtype=torch.long)
    labels = input_ids.clone()
    labels[: len(prompt)] = IGNORE_INDEX
    return input_ids, labels

"""`dama hardness`: score each preference pair's hardness with CLIP, offline, once per dataset (DAMA section 2).

For a pair with image I, chosen response y_w and rejected response y_l:

1. Split both responses into sub-sentences S_w and S_l (`dama.splitting`).
2. Score every sub-sentence against the image: ℓ(I, s) = exp(logit_scale) · cos(f_img(I), f_txt(s)), exactly
   CLIPModel's `logits_per_image`. The image is encoded once per pair; texts are truncated to CLIP's positions.
3. p(s) = softmax of ℓ over ALL sub-sentences of BOTH responses (S_w ∪ S_l); with `raw`, p(s) = ℓ(I, s).
4. Store p(S_w) and p(S_l) as `chosen_logits` and `rejected_logits` (the authors' column names) and the hardness
   δ = Σ_{S_w} p − Σ_{S_l} p as `hardness`. Small δ: hard to tell apart; large δ: easy.
5. δ̄, the mean of δ over the scored pairs, goes to `<output>.meta.json` beside the output, with the run's
   settings and the list of skipped rows. The trainer reads it from there; it is never hard-coded.

Every row is checked before the first is scored (dama.data.validation: texts, image); a bad row stops the run
naming it, or with --on-bad-row skip is left out (null columns) and listed with its reason in the metadata, as is a
row whose responses split into no sub-sentence.

Pairs are scored in batches (the images of `batch_size` pairs and all their sub-sentences at once). The run is
resumable: each finished batch is appended to `<output>.partial.jsonl` (flushed and fsynced), a rerun skips the
rows found there, and the file is removed once the output and metadata are written (both atomically).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import pyarrow as pa
import torch
from PIL import Image

from dama.command import run_command
from dama.data.formats import IMAGE_UNREADABLE, PairRow, metadata_path
from dama.data.validation import BadRowError, RowChecks, check_input
from dama.errors import DamaError
from dama.offline.passes import (
    AddedColumn,
    DatasetOutput,
    PartialResults,
    PassOutcome,
    already_complete_message,
    check_output_path,
    completed_metadata,
    plan_pass,
    run_pass,
    skipped_summary,
)
from dama.offline.splitting import LMSplitter, RuleSplitter, Splitter, clip_token_counter
from dama.option_loader import build, read_options
from dama.options import PassOptions, RowOptions, check_at_least, check_choice
from dama.output_guard import OutputGuard, input_bytes

# The columns this pass adds (the authors' names), in this order; a re-run on a scored file replaces them.
HARDNESS_COLUMNS = (
    AddedColumn("chosen_logits", pa.list_(pa.float64())),
    AddedColumn("rejected_logits", pa.list_(pa.float64())),
    AddedColumn("hardness", pa.float64()),
)
SplitterName = Literal["rule", "lm"]
SPLITTERS: tuple[str, ...] = get_args(SplitterName)
NO_SUB_SENTENCE = "no sub-sentence"
SKIP_HINT = "Fix the row, or pass --on-bad-row skip to leave such rows out (they are listed in the metadata)."


class ImageTextScorer(Protocol):
    """Scores each pair's texts against that pair's image."""

    def score(self, images: list[Image.Image], texts: list[list[str]]) -> list[torch.Tensor]:
        """ℓ(I_p, s) for every text s of pair p. Shapes: P images, P lists of T_p texts -> P tensors (T_p,)."""
        ...


@dataclass(frozen=True)
class PairHardness:
    """p(S_w), p(S_l) (softmax probabilities, or raw ℓ) and δ = Σ p(S_w) − Σ p(S_l) for one pair."""

    chosen_logits: list[float]
    rejected_logits: list[float]
    hardness: float


def pair_hardness(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, raw: bool = False) -> PairHardness:
    """Turn one pair's CLIP scores into its stored values (paper Eq. 3-5).

    Shapes: chosen_scores (S_w,), rejected_scores (S_l,), both non-empty. The softmax runs over the S_w + S_l
    scores together, in float64 so that δ is not dominated by rounding when the two sums are close.
    """
    if chosen_scores.dim() != 1 or rejected_scores.dim() != 1:
        raise DamaError(
            f"scores must be 1-D, got chosen {tuple(chosen_scores.shape)} and rejected {tuple(rejected_scores.shape)}"
        )
    if chosen_scores.numel() == 0 or rejected_scores.numel() == 0:
        raise DamaError("each response needs at least one sub-sentence score")
    scores = torch.cat([chosen_scores, rejected_scores]).to(torch.float64)  # (S_w + S_l,)
    values = scores if raw else torch.softmax(scores, dim=0)
    chosen, rejected = values[: chosen_scores.numel()], values[chosen_scores.numel() :]
    return PairHardness(chosen.tolist(), rejected.tolist(), float(chosen.sum() - rejected.sum()))


class ClipScorer:
    """ℓ(I, s) with a transformers CLIPModel and CLIPProcessor loaded from a local folder.

    Args:
        model_path: folder with the CLIP weights, config, tokenizer and image processor (e.g. LLaVA-1.5's
            clip-vit-large-patch14-336 tower).
        device: where CLIP runs ("cpu", "cuda", "cuda:1", ...).
        text_batch_size: most texts encoded in one forward pass (bounds memory for pairs with many sub-sentences).
    """

    def __init__(self, model_path: str | Path, device: str = "cpu", text_batch_size: int = 256):
        from transformers import CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(model_path, local_files_only=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_path, local_files_only=True)
        self.max_text_tokens = self.model.config.text_config.max_position_embeddings
        self.text_batch_size = text_batch_size

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        embeds = []
        for start in range(0, len(texts), self.text_batch_size):
            tokens = self.tokenizer(
                texts[start : start + self.text_batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            ).to(self.device)
            embeds.append(self.model.get_text_features(**tokens).pooler_output)  # (chunk, D)
        return torch.nn.functional.normalize(torch.cat(embeds), dim=-1)  # (T, D)

    def score(self, images: list[Image.Image], texts: list[list[str]]) -> list[torch.Tensor]:
        """See `ImageTextScorer.score`. Shapes: P images -> pixel_values (P, 3, H, W); ΣT_p texts -> (ΣT_p, D)."""
        if len(images) != len(texts):
            raise DamaError(f"got {len(images)} images but {len(texts)} lists of texts; give one list per image")
        with torch.no_grad():
            pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            image_features = self.model.get_image_features(pixel_values=pixels.to(self.device)).pooler_output
            image_embeds = torch.nn.functional.normalize(image_features, dim=-1)  # (P, D)
            text_embeds = self._encode_texts([text for pair_texts in texts for text in pair_texts])  # (ΣT_p, D)
            scale = self.model.logit_scale.exp()
            scores, start = [], 0
            for pair, pair_texts in enumerate(texts):
                pair_embeds = text_embeds[start : start + len(pair_texts)]  # (T_p, D)
                start += len(pair_texts)
                scores.append((scale * pair_embeds @ image_embeds[pair]).float().cpu())  # (T_p,)
        return scores


@dataclass
class _Prepared:
    row: PairRow
    image: Image.Image
    chosen: list[str]
    rejected: list[str]


def _prepare(row: PairRow, splitter: Splitter) -> tuple[_Prepared | None, tuple[str, str] | None]:
    """The row ready to score, or (reason, detail) of why it cannot be scored.

    The row check ran before, so texts and image are sound; the splitter may still find no sub-sentence.
    """
    sub_sentences = {}
    for side, text in (("chosen", row.chosen), ("rejected", row.rejected)):
        sub_sentences[side] = splitter.split(text)
        if not sub_sentences[side]:
            return None, (NO_SUB_SENTENCE, f"{side} response has no sub-sentence to score ({text[:60]!r})")
    try:
        image = row.load_image()
    except ValueError as error:  # the file changed since the row check
        return None, (getattr(error, "reason", IMAGE_UNREADABLE), str(error))
    return _Prepared(row, image, sub_sentences["chosen"], sub_sentences["rejected"]), None


def score_pairs(
    rows: Iterable[PairRow],
    splitter: Splitter,
    scorer: ImageTextScorer,
    partial: PartialResults,
    batch_size: int = 16,
    raw: bool = False,
    on_bad_row: str = "error",
    total: int | None = None,
) -> PassOutcome:
    """Score every row not already in `partial`, `batch_size` pairs per scorer call, appending each batch to it.

    A row that cannot be scored raises BadRowError naming it (on_bad_row="error") or is recorded in `skipped`
    ("skip"). Skipped rows are not written to `partial`: a rerun examines them again, so a fixed row is picked up.
    """
    from tqdm.auto import tqdm

    outcome = PassOutcome(results={}, skipped=[], resumed=0)
    batch: list[_Prepared] = []

    def flush() -> None:
        scores = scorer.score([item.image for item in batch], [item.chosen + item.rejected for item in batch])
        records = []
        for item, pair_scores in zip(batch, scores, strict=True):
            split = len(item.chosen)
            values = pair_hardness(pair_scores[:split], pair_scores[split:], raw=raw)
            records.append({"row_id": item.row.row_id, "fingerprint": item.row.fingerprint, **asdict(values)})
        partial.append(records)
        outcome.results.update((record["row_id"], record) for record in records)
        batch.clear()

    with tqdm(total=total, desc="hardness", unit="pair", disable=None) as progress:
        for row in rows:
            progress.update(1)
            finished = partial.finished(row.row_id, row.fingerprint, row.describe())
            if finished is not None:
                outcome.results[row.row_id] = finished
                outcome.resumed += 1
                continue
            prepared, problem = _prepare(row, splitter)
            if prepared is None:
                reason, detail = problem
                if on_bad_row == "error":
                    raise BadRowError(f"{row.describe()}: {detail}. {SKIP_HINT}")
                outcome.skipped.append({"row_id": row.row_id, "reason": reason, "detail": detail})
                continue
            batch.append(prepared)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    return outcome


def output_values(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The HARDNESS_COLUMNS values of one row from its finished record; nulls for a skipped row."""
    return {column.name: None if record is None else record[column.name] for column in HARDNESS_COLUMNS}


def build_splitter(
    name: str, clip_path: str | Path, splitter_model: str | None = None, device: str = "cpu"
) -> RuleSplitter | LMSplitter:
    """The rule splitter measuring length with CLIP's own tokenizer and limit, or the LM splitter around it."""
    from transformers import AutoTokenizer, CLIPConfig

    tokenizer = AutoTokenizer.from_pretrained(clip_path, local_files_only=True)
    limit = CLIPConfig.from_pretrained(clip_path, local_files_only=True).text_config.max_position_embeddings
    rule = RuleSplitter(count_tokens=clip_token_counter(tokenizer), max_tokens=limit)
    if name == "rule":
        return rule
    return LMSplitter(splitter_model, fallback=rule, device=device)


@dataclass
class HardnessOptions(RowOptions, PassOptions):
    """Everything `dama hardness` takes: what to read and write, which rows, and how to score them."""

    clip: str | None = field(default=None, metadata={"help": "Local folder of a CLIPModel with its processor."})
    batch_size: int = field(default=16, metadata={"help": "Pairs (images) per CLIP call."})
    raw: bool = field(default=False, metadata={"help": "Store the raw CLIP scores instead of softmax probabilities."})
    splitter: SplitterName = field(
        default="rule",
        metadata={"help": "Sub-sentence splitter: deterministic rules, or prompting a local causal LM."},
    )
    splitter_model: str | None = field(default=None, metadata={"help": "Local causal LM folder for --splitter lm."})

    def __post_init__(self) -> None:
        self.check_pass_options()
        self.check_row_options()
        if not self.clip:
            raise DamaError("--clip is required: the local folder of a CLIPModel with its processor")
        check_at_least("batch_size", self.batch_size, 1)
        check_choice("splitter", self.splitter, SPLITTERS)
        if self.splitter == "lm" and not self.splitter_model:
            raise DamaError("--splitter lm needs --splitter-model PATH (a local causal LM folder)")


def _check_files(options: HardnessOptions) -> None:
    input_path, output_path = Path(options.input), Path(options.output)
    if not input_path.exists():
        raise DamaError(f"--input {input_path} does not exist")
    for flag, folder in (("--clip", options.clip), ("--splitter-model", options.splitter_model)):
        if folder is not None and not Path(folder).is_dir():
            raise DamaError(f"{flag} {folder} is not a folder: give the local folder of the model (no downloads)")
    check_output_path(input_path, output_path)


def compute_hardness(options: HardnessOptions, scorer: ImageTextScorer | None = None) -> dict[str, Any]:
    """The whole pass: check every row, split, score, write the output and `<output>.meta.json`; returns the metadata.

    `options.select` keeps the rows meeting its conditions (dama.data.formats): only they are scored and written, and
    the mean hardness is theirs.

    `scorer` replaces the CLIP scorer built from `options.clip` (tests wrap the real one); the splitter still uses
    the tokenizer there to measure lengths. When the output is already this run's complete output, nothing is
    computed and its metadata is returned with "already_complete": True.
    """
    _check_files(options)
    input_path = Path(options.input)
    clip_path = Path(options.clip).resolve()
    settings = {
        "clip": str(clip_path),
        "raw": options.raw,
        "splitter": options.splitter,
        "splitter_model": str(Path(options.splitter_model).resolve()) if options.splitter_model else None,
        "select": list(options.select),
    }
    plan = plan_pass(options, settings, on_bad_row=options.on_bad_row)
    if plan.action == "complete":
        return completed_metadata(plan)
    checked = check_input(input_path, RowChecks(), on_bad_row=options.on_bad_row, skip_hint=SKIP_HINT,
                          image_folder=options.image_folder, cache_dir=options.cache_dir, limit=options.limit,
                          select=options.select)
    text_splitter = build_splitter(options.splitter, clip_path, options.splitter_model, options.device)
    scorer = scorer if scorer is not None else ClipScorer(clip_path, device=options.device)

    def score(partial: PartialResults) -> PassOutcome:
        pairs = (PairRow.from_record(record, checked.image_folder) for record in checked.rows)
        outcome = score_pairs(pairs, text_splitter, scorer, partial, batch_size=options.batch_size, raw=options.raw,
                              on_bad_row=options.on_bad_row, total=checked.rows.num_rows)
        outcome.skipped = checked.report.skipped + outcome.skipped
        return outcome

    def hardness_fields(outcome: PassOutcome) -> dict[str, Any]:
        hardness = [record["hardness"] for record in outcome.results.values()]
        return {
            "hardness_mean": math.fsum(hardness) / len(hardness) if hardness else None,
            "rows": checked.report.total,
            "lm_fallbacks": text_splitter.fallbacks if isinstance(text_splitter, LMSplitter) else None,
        }

    output = DatasetOutput(input_path, HARDNESS_COLUMNS, output_values, options.limit,
                           checked.selected_row_ids if options.select else None)
    return run_pass(plan, step="hardness", settings=settings, score=score, output=output, metadata=hardness_fields)


DESCRIPTION = (
    "Score each preference pair's hardness with CLIP (DAMA's data-aware strategy; run once per dataset). Both "
    "responses are split into sub-sentences, each is scored against the image with CLIP, the scores are turned into "
    "probabilities by one softmax over the pair's sub-sentences, and hardness = sum over the chosen response - sum "
    "over the rejected one. The output is the input plus the columns chosen_logits, rejected_logits and hardness "
    "(parquet in, parquet out; json in, json out); the mean hardness, the settings and the skipped rows go to "
    "OUTPUT.meta.json. An interrupted run resumes where it stopped when rerun with the same arguments."
)


def parse_options(argv: list[str] | None = None) -> HardnessOptions:
    """`dama hardness`'s options from an optional YAML (--config) and the command line (dama.option_loader)."""
    return build(HardnessOptions, read_options("dama hardness", [HardnessOptions], argv, DESCRIPTION))


def main(argv: list[str] | None = None) -> int:
    def action() -> str:
        options = parse_options(argv)
        with OutputGuard("hardness", options.output, needed=lambda: input_bytes(options.input)):
            metadata = compute_hardness(options)
        mean = metadata["hardness_mean"]
        if metadata.get("already_complete"):
            return already_complete_message(options.output, metadata)
        return (
            f"scored {metadata['count']} pairs ({metadata['resumed']} from an earlier run), "
            f"{skipped_summary(metadata)}; mean hardness {'n/a' if mean is None else f'{mean:.6g}'}\n"
            f"wrote {options.output} and {metadata_path(options.output)}"
        )

    return run_command("hardness", action)


if __name__ == "__main__":
    sys.exit(main())

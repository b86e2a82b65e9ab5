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

import argparse
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import torch
from PIL import Image

from dama.command import run_command
from dama.data.formats import IMAGE_UNREADABLE, PairRow, metadata_path, read_metadata
from dama.data.validation import BAD_ROW_POLICIES, BadRowError, RowChecks, check_input
from dama.offline.passes import (
    AddedColumn,
    PartialResults,
    PassOutcome,
    add_pass_arguments,
    check_output_path,
    plan_output,
    run_identity,
    run_pass,
    skipped_summary,
)
from dama.offline.splitting import LMSplitter, RuleSplitter, Splitter, clip_token_counter
from dama.pass_output import PassOutput, input_bytes

# The columns this pass adds (the authors' names), in this order; a re-run on a scored file replaces them.
HARDNESS_COLUMNS = (
    AddedColumn("chosen_logits", pa.list_(pa.float64())),
    AddedColumn("rejected_logits", pa.list_(pa.float64())),
    AddedColumn("hardness", pa.float64()),
)
SPLITTERS = ("rule", "lm")
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
        raise ValueError(
            f"scores must be 1-D, got chosen {tuple(chosen_scores.shape)} and rejected {tuple(rejected_scores.shape)}"
        )
    if chosen_scores.numel() == 0 or rejected_scores.numel() == 0:
        raise ValueError("each response needs at least one sub-sentence score")
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
            raise ValueError(f"got {len(images)} images but {len(texts)} lists of texts; give one list per image")
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


def _check_arguments(
    input_path: Path,
    output_path: Path,
    clip_path: str | Path,
    batch_size: int,
    on_bad_row: str,
    splitter: str,
    splitter_model: str | None,
    limit: int | None,
) -> None:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"--on-bad-row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    if splitter not in SPLITTERS:
        raise ValueError(f"--splitter must be one of {SPLITTERS}, got {splitter!r}")
    if splitter == "lm" and not splitter_model:
        raise ValueError("--splitter lm needs --splitter-model PATH (a local causal LM folder)")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    if not input_path.exists():
        raise FileNotFoundError(f"--input {input_path} does not exist")
    for flag, folder in (("--clip", clip_path), ("--splitter-model", splitter_model)):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"{flag} {folder} is not a folder: give the local folder of the model (no downloads)")
    check_output_path(input_path, output_path)


def compute_hardness(
    input_path: str | Path,
    output_path: str | Path,
    clip_path: str | Path,
    image_folder: str | Path | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    raw: bool = False,
    splitter: str = "rule",
    splitter_model: str | None = None,
    on_bad_row: str = "error",
    limit: int | None = None,
    scorer: ImageTextScorer | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    select: Sequence[str] = (),
) -> dict[str, Any]:
    """The whole pass: check every row, split, score, write the output and `<output>.meta.json`; returns the metadata.

    `select` keeps the rows meeting its conditions (dama.data.formats): only they are scored and written, and the
    mean hardness is theirs.

    `scorer` replaces the CLIP scorer built from `clip_path` (tests wrap the real one); the splitter still uses
    the tokenizer at `clip_path` to measure lengths. When the output is already this run's complete output, nothing
    is computed and its metadata is returned with "already_complete": True.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    _check_arguments(input_path, output_path, clip_path, batch_size, on_bad_row, splitter, splitter_model, limit)
    clip_path = Path(clip_path).resolve()
    settings = {
        "clip": str(clip_path),
        "raw": raw,
        "splitter": splitter,
        "splitter_model": str(Path(splitter_model).resolve()) if splitter_model else None,
        "select": list(select),
    }
    identity = run_identity(input_path, settings, limit=limit, on_bad_row=on_bad_row,
                            image_folder=None if image_folder is None else str(Path(image_folder).resolve()))
    plan = plan_output(input_path, output_path, settings, identity, overwrite)
    if plan.action == "complete":
        return {**read_metadata(output_path), "already_complete": True}
    checked = check_input(input_path, RowChecks(), on_bad_row=on_bad_row, skip_hint=SKIP_HINT,
                          image_folder=image_folder, cache_dir=cache_dir, limit=limit, select=select)
    text_splitter = build_splitter(splitter, clip_path, splitter_model, device)
    scorer = scorer if scorer is not None else ClipScorer(clip_path, device=device)

    def score(partial: PartialResults) -> PassOutcome:
        pairs = (PairRow.from_record(record, checked.image_folder) for record in checked.rows)
        outcome = score_pairs(pairs, text_splitter, scorer, partial, batch_size=batch_size, raw=raw,
                              on_bad_row=on_bad_row, total=checked.rows.num_rows)
        outcome.skipped = checked.report.skipped + outcome.skipped
        return outcome

    def hardness_fields(outcome: PassOutcome) -> dict[str, Any]:
        hardness = [record["hardness"] for record in outcome.results.values()]
        return {
            "hardness_mean": math.fsum(hardness) / len(hardness) if hardness else None,
            "rows": checked.report.total,
            "lm_fallbacks": text_splitter.fallbacks if isinstance(text_splitter, LMSplitter) else None,
        }

    return run_pass(input_path, plan, step="hardness", settings=settings, columns=HARDNESS_COLUMNS, score=score,
                    row_values=output_values, metadata=hardness_fields, limit=limit,
                    keep=checked.selected_row_ids if select else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dama hardness",
        description=(
            "Score each preference pair's hardness with CLIP (DAMA's data-aware strategy; run once per dataset). "
            "Both responses are split into sub-sentences, each is scored against the image with CLIP, the scores "
            "are turned into probabilities by one softmax over the pair's sub-sentences, and hardness = sum over "
            "the chosen response - sum over the rejected one. The output is the input plus the columns "
            "chosen_logits, rejected_logits and hardness (parquet in, parquet out; json in, json out); the mean "
            "hardness, the settings and the skipped rows go to OUTPUT.meta.json. An interrupted run resumes where "
            "it stopped when rerun with the same arguments."
        ),
    )
    add_pass_arguments(parser)
    parser.add_argument("--clip", required=True, help="local folder of a CLIPModel with its processor")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs (images) per CLIP call (default: 16)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device for CLIP and the LM splitter (default: cuda when available, else cpu)",
    )
    parser.add_argument("--raw", action="store_true", help="store the raw CLIP scores instead of softmax probabilities")
    parser.add_argument(
        "--splitter",
        choices=SPLITTERS,
        default="rule",
        help="sub-sentence splitter: deterministic rules, or prompting a local causal LM (default: %(default)s)",
    )
    parser.add_argument("--splitter-model", default=None, help="local causal LM folder for --splitter lm")
    parser.add_argument(
        "--on-bad-row",
        choices=BAD_ROW_POLICIES,
        default="error",
        help="a bad row (a missing, corrupt or over-large image, an empty or missing response; every row is checked "
        "before scoring starts): stop with an error naming it, or skip it and list it with its reason in the "
        "metadata (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action() -> str:
        metadata = compute_hardness(
            args.input, args.output, args.clip, image_folder=args.image_folder, batch_size=args.batch_size,
            device=args.device, raw=args.raw, splitter=args.splitter, splitter_model=args.splitter_model,
            on_bad_row=args.on_bad_row, limit=args.limit, cache_dir=args.cache_dir, overwrite=args.overwrite,
            select=args.select,
        )
        mean = metadata["hardness_mean"]
        if metadata.get("already_complete"):
            return (f"{args.output} is already complete (same input and settings, written {metadata['created']}): "
                    "nothing to do; pass --overwrite to compute it again")
        return (
            f"scored {metadata['count']} pairs ({metadata['resumed']} from an earlier run), "
            f"{skipped_summary(metadata)}; mean hardness {'n/a' if mean is None else f'{mean:.6g}'}\n"
            f"wrote {args.output} and {metadata_path(args.output)}"
        )

    output = PassOutput("hardness", args.output, needed=lambda: input_bytes(args.input))
    return run_command("hardness", output.around(action))


if __name__ == "__main__":
    sys.exit(main())

"""`dama precompute-ref`: run the reference model once over a dataset and store its log-probs (docs/method.md 9).

The reference model π_ref is scored through the code path training scores the policy with: rows are read and
tokenized by PreferenceDataset (same template, CLIP image processing and max_length; nothing is truncated), laid out
in training's layout (prefix_shared by default, or packed: --layout) and run through DamaPolicy's backbone, and the
supervised positions are scored by the fused head (`dama_kernels.token_logps`: no (tokens x vocab) logits, no
autograd). A policy that starts from the reference weights
then has z = (π_c − ref_c) − (π_r − ref_r) = 0 at step 0, up to float rounding, whatever its batches look like.

Stored per pair, in both layouts the data loader reads back (dama.data):
- the project's columns ref_chosen_logps, ref_rejected_logps (sums over the response and its "</s>"),
  ref_chosen_mean_logps, ref_rejected_mean_logps (sum / supervised tokens), ref_chosen_token_logps,
  ref_rejected_token_logps (one value per supervised token, in token order);
- the RLAIF-V / authors' `logps` = [chosen_sum, chosen_mean, chosen_per_token, rejected_sum, rejected_mean,
  rejected_per_token]: a list in a JSON output, its JSON text in a parquet output (Arrow cannot type a list that
  mixes numbers and lists; dama.data reads both).
A sum is dama_kernels.sum_per_sequence over the per-token values, as DamaPolicy.forward computes it; every
value is written as float64 (parquet) or its shortest repr (JSON), so reading it back gives the same number.

The output is the input in its own format (parquet in, parquet out; JSON in, JSON out) with every column kept and
the reference columns added (earlier ones replaced); pairs left out as over-long get nulls; with `select`, only the
selected rows are written. The run's settings and counts go to `<output>.meta.json`, among them the encoding
(`PairEncoder.signature`: template and tokenizer) and `image_aspect_ratio`, which training checks against its own
before it uses these values. When the input has hardness metadata beside it (`<input>.meta.json`, written by
`dama hardness`), its hardness_mean (δ̄, over the pairs the hardness pass scored) is copied into the output's
metadata, so the trainer finds δ̄ beside the file it trains on.

Every row is checked before the model loads (dama.data.validation: texts, a hardness that is present, image); a bad
row stops the run naming it, or with --on-bad-row skip gets nulls and is listed with its reason in the metadata,
beside the over-long pairs that --overlong skip leaves out. Rows the input's own metadata lists as skipped (by
`dama hardness`) are left out the same way, with that reason, and listed again, so training skips them too.

Resumable and atomic like the hardness pass: each finished batch is appended to `<output>.partial.jsonl` (flushed
and fsynced); a rerun with the same model, dtype and max_length skips the rows found there (batch size, token budget
and device may differ); the output and its metadata appear only complete, then the partial file is removed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import torch
from tqdm.auto import tqdm

import dama_kernels
from dama.command import check_device_argument, run_command
from dama.data.batch import PreferenceBatch
from dama.data.collator import LAYOUTS, TokenBudgetBatchSampler, layout_pair_lengths, make_collator
from dama.data.dataset import (
    IMAGE_ASPECT_RATIOS,
    OVERLONG_POLICIES,
    VICUNA_V1_SYSTEM,
    ConversationTemplate,
    PreferenceDataset,
)
from dama.data.formats import (
    REF_LOGPS_COLUMNS,
    REF_MEAN_COLUMNS,
    REF_TOKEN_COLUMNS,
    PairRow,
    metadata_path,
    read_metadata,
)
from dama.data.row_values import AUTHORS_LOGPS_SLOTS
from dama.data.validation import BAD_ROW_POLICIES, RowChecks, check_input
from dama.model.loading import DTYPES, load_llava
from dama.model.policy import DamaPolicy
from dama.offline.passes import (
    PARQUET_READ_ROWS,
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
from dama.pass_output import PassOutput, input_bytes

# The columns this pass writes, in this order; an input that has them already (an earlier run, the authors' data) gets
# them replaced. `logps` mixes numbers and lists, which Arrow cannot type, so parquet holds its JSON text.
REFERENCE_COLUMNS = (
    AddedColumn("logps", pa.string(), json_text_in_parquet=True),
    *(AddedColumn(name, pa.float64()) for name in (*REF_LOGPS_COLUMNS, *REF_MEAN_COLUMNS)),
    *(AddedColumn(name, pa.list_(pa.float64())) for name in REF_TOKEN_COLUMNS),
)
OUTPUT_COLUMNS = tuple(column.name for column in REFERENCE_COLUMNS)
DEFAULT_BATCH_SIZE = 8
# The layouts DamaPolicy scores with packed attention; the padded one gives the same values and is not offered here.
REFERENCE_LAYOUTS = tuple(layout for layout in LAYOUTS if layout != "padded")
DEFAULT_MAX_LENGTH = 2048
SKIP_HINT = "Fix the row, or pass --on-bad-row skip to leave such rows out (they are listed in the metadata)."


@dataclass(frozen=True)
class PairReference:
    """The reference log-probs of one pair: sums, means (sum / supervised tokens) and per-token lists."""

    chosen_logps: float
    rejected_logps: float
    chosen_mean_logps: float
    rejected_mean_logps: float
    chosen_token_logps: list[float]
    rejected_token_logps: list[float]


def supervised_token_logps(policy: DamaPolicy, batch: PreferenceBatch) -> torch.Tensor:
    """Log-prob of each supervised token of the batch under the policy's fused head, without logits.

    The hidden states and head of DamaPolicy.forward (head="fused"), kept per token: their sum per sequence is
    exactly what forward returns for the same batch.

    Shapes: -> (M,) fp32, in batch.supervised_positions order; token m belongs to sequence supervised_seq_ids[m].
    """
    return policy.head.token_logps(policy.supervised_hidden_states(batch), batch.supervised_target_ids)


def pair_references(batch: PreferenceBatch, token_logps: torch.Tensor) -> list[PairReference]:
    """Each pair's sums, means and per-token lists from the per-token log-probs of its batch.

    Shapes: token_logps (M,) as supervised_token_logps returns it -> P PairReference, in batch.row_ids order.
    """
    seq_ids = batch.supervised_seq_ids
    # The reduction dama_kernels.sequence_logps ends with, so a sum is what training computes for the same batch.
    sums = dama_kernels.sum_per_sequence(token_logps, seq_ids, batch.num_seqs)  # (S,)
    # A stable sort groups each sequence's tokens and keeps their order, whatever the token layout.
    grouped = token_logps.index_select(0, torch.argsort(seq_ids, stable=True)).cpu()  # (M,)
    counts = batch.supervised_counts.tolist()
    per_sequence = [values.tolist() for values in grouped.split(counts)]
    sums = sums.tolist()
    num_pairs = batch.num_pairs
    references = []
    for pair in range(num_pairs):
        chosen, rejected = pair, num_pairs + pair
        references.append(PairReference(
            chosen_logps=sums[chosen],
            rejected_logps=sums[rejected],
            # max(.., 1) as DamaPolicy(average_logps=True) clamps: a sequence without a supervised token has sum 0.
            chosen_mean_logps=sums[chosen] / max(counts[chosen], 1),
            rejected_mean_logps=sums[rejected] / max(counts[rejected], 1),
            chosen_token_logps=per_sequence[chosen],
            rejected_token_logps=per_sequence[rejected],
        ))
    return references


def plan_batches(
    indices: Sequence[int], pair_lengths: Sequence[int], batch_size: int, max_tokens: int | None
) -> list[list[int]]:
    """Dataset indices grouped into micro-batches, in order: `batch_size` pairs each, or as many as fit in
    `max_tokens` tokens (at most `batch_size`) when a token budget is given. pair_lengths: the tokens of each pair in
    the batches' layout (layout_pair_lengths)."""
    if max_tokens is None:
        return [list(indices[start:start + batch_size]) for start in range(0, len(indices), batch_size)]
    sampler = TokenBudgetBatchSampler(
        [pair_lengths[i] for i in indices], max_tokens, max_pairs=batch_size, shuffle=False
    )
    return [[indices[k] for k in group] for group in sampler]


def score_dataset(
    policy: DamaPolicy,
    dataset: PreferenceDataset,
    row_ids: Sequence[str],
    fingerprints: Mapping[str, str],
    partial: PartialResults,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    layout: str = REFERENCE_LAYOUTS[0],
) -> PassOutcome:
    """Score every pair of `dataset` not already in `partial`, appending each finished batch to it.

    row_ids[i] is the row id of dataset[i] and `fingerprints` maps a row id to its PairRow fingerprint: a row found
    in `partial` with another fingerprint means the input changed since the interrupted run, which is an error.
    `layout` is the batch layout, as training's (dama.data.collator.LAYOUTS, but not padded).
    """
    outcome = PassOutcome(results={}, skipped=[], resumed=0)
    todo = []
    for index, row_id in enumerate(row_ids):
        finished = partial.finished(row_id, fingerprints[row_id], f"row {row_id}")
        if finished is None:
            todo.append(index)
            continue
        outcome.results[row_id] = finished
    outcome.resumed = len(outcome.results)
    if layout not in REFERENCE_LAYOUTS:
        raise ValueError(f"layout must be one of {REFERENCE_LAYOUTS}, got {layout!r}")
    collator = make_collator(layout)
    pair_lengths = layout_pair_lengths(dataset.pair_lengths, dataset.prompt_lengths, layout)
    batches = plan_batches(todo, pair_lengths, batch_size, max_tokens)
    with tqdm(total=len(row_ids), initial=outcome.resumed, desc="reference", unit="pair", disable=None) as progress:
        for indices in batches:
            batch = collator([dataset[i] for i in indices]).to(device)
            with torch.inference_mode():
                references = pair_references(batch, supervised_token_logps(policy, batch))
            records = [
                {"row_id": row_id, "fingerprint": fingerprints[row_id], **asdict(reference)}
                for row_id, reference in zip(batch.row_ids, references, strict=True)
            ]
            partial.append(records)
            outcome.results.update((record["row_id"], record) for record in records)
            progress.update(len(records))
    return outcome


def output_values(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The OUTPUT_COLUMNS values of one row from its finished record; nulls for a row that was left out."""
    if record is None:
        return dict.fromkeys(OUTPUT_COLUMNS)
    logps: list[Any] = [None] * 6
    values = {}
    for side, slots, sum_column, mean_column, token_column in zip(
        ("chosen", "rejected"), AUTHORS_LOGPS_SLOTS, REF_LOGPS_COLUMNS, REF_MEAN_COLUMNS, REF_TOKEN_COLUMNS,
        strict=True,
    ):
        side_values = (record[f"{side}_logps"], record[f"{side}_mean_logps"], record[f"{side}_token_logps"])
        for slot, value in zip(slots, side_values, strict=True):
            logps[slot] = value
        values.update(zip((sum_column, mean_column, token_column), side_values, strict=True))
    return {"logps": logps, **values}


def input_hardness(input_path: str | Path) -> dict[str, Any]:
    """hardness_mean from the hardness metadata beside the input (and where it came from), or {} without one."""
    path = metadata_path(input_path)
    if not path.is_file():
        return {}
    metadata = read_metadata(input_path)
    if "hardness_mean" not in metadata:
        return {}
    return {"hardness_mean": metadata["hardness_mean"], "hardness_metadata": str(path.resolve())}


def _fingerprints(rows: datasets.Dataset) -> dict[str, str]:
    """Row id -> the hash of its texts that the hardness pass also uses to check a resumed row."""
    texts = rows.select_columns(["row_id", "question", "chosen", "rejected"])
    fingerprints = {}
    for batch in texts.iter(batch_size=PARQUET_READ_ROWS):
        for row_id, question, chosen, rejected in zip(
            batch["row_id"], batch["question"], batch["chosen"], batch["rejected"], strict=True
        ):
            row = PairRow(row_id=row_id, question=question or "", chosen=chosen or "", rejected=rejected or "")
            fingerprints[row_id] = row.fingerprint
    return fingerprints


def resolve_dtype(dtype: str | None, device: str) -> str:
    """The model dtype: the one given, else bfloat16 on CUDA (the training recipe's) and float32 elsewhere."""
    if dtype is None:
        return "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return dtype


def _check_arguments(
    input_path: Path,
    output_path: Path,
    model_path: Path,
    batch_size: int,
    max_tokens_per_batch: int | None,
    max_length: int,
    overlong: str,
    on_bad_row: str,
    image_aspect_ratio: str,
    device: str,
    dtype: str | None,
    limit: int | None,
) -> None:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if max_tokens_per_batch is not None and max_tokens_per_batch < 1:
        raise ValueError(f"--max-tokens-per-batch must be a positive number of tokens, got {max_tokens_per_batch}")
    if max_length < 1:
        raise ValueError(f"--max-length must be a positive number of tokens, got {max_length}")
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"--overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"--on-bad-row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
        raise ValueError(f"--image-aspect-ratio must be one of {IMAGE_ASPECT_RATIOS}, got {image_aspect_ratio!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    check_device_argument(device)
    if not input_path.exists():
        raise FileNotFoundError(f"--input {input_path} does not exist")
    if not (model_path / "config.json").is_file():
        raise ValueError(
            f"--model {model_path} holds no config.json: give the local folder of a saved LLaVA (no downloads)"
        )
    check_output_path(input_path, output_path)


def precompute_reference(
    input_path: str | Path,
    output_path: str | Path,
    model_path: str | Path,
    *,
    image_folder: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens_per_batch: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    overlong: str = "error",
    on_bad_row: str = "error",
    image_aspect_ratio: str = "crop",
    system_prompt: str = VICUNA_V1_SYSTEM,
    select: Sequence[str] = (),
    device: str = "cpu",
    dtype: str | None = None,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    layout: str = REFERENCE_LAYOUTS[0],
) -> dict[str, Any]:
    """The whole pass: check every row, score with the reference model, write the output and `<output>.meta.json`.

    Returns the metadata ("already_complete": True and nothing computed when the output is this run's, complete).
    `dtype` None picks bfloat16 on CUDA and float32 elsewhere; give the dtype training runs in, so that the policy at
    step 0 reproduces these numbers. Images resolve under `image_folder`, by default the input's folder (the input
    itself when it is a folder of shards), as in PreferenceDataset.from_path. `system_prompt` is the conversation
    template's system text (training's `system_prompt`); `select` keeps the rows meeting its conditions
    (dama.data.formats), and only those are written. `layout`: the batch layout, training's (either gives the same
    values up to float rounding).
    """
    if layout not in REFERENCE_LAYOUTS:
        raise ValueError(f"--layout must be one of {REFERENCE_LAYOUTS}, got {layout!r}")
    input_path, output_path, model_path = Path(input_path), Path(output_path), Path(model_path)
    _check_arguments(input_path, output_path, model_path, batch_size, max_tokens_per_batch, max_length, overlong,
                     on_bad_row, image_aspect_ratio, device, dtype, limit)
    dtype = resolve_dtype(dtype, device)
    model_path = model_path.resolve()
    settings = {"model": str(model_path), "dtype": dtype, "max_length": max_length,
                "image_aspect_ratio": image_aspect_ratio, "system_prompt": system_prompt, "select": list(select)}
    identity = run_identity(input_path, settings, limit=limit, on_bad_row=on_bad_row, overlong=overlong,
                            image_folder=None if image_folder is None else str(Path(image_folder).resolve()))
    plan = plan_output(input_path, output_path, settings, identity, overwrite)
    if plan.action == "complete":
        return {**read_metadata(output_path), "already_complete": True}
    # Read before the model loads, so that a broken metadata file or a bad row fails the run at once.
    hardness = input_hardness(input_path)
    checked = check_input(input_path, RowChecks(hardness=True), on_bad_row=on_bad_row, skip_hint=SKIP_HINT,
                          image_folder=image_folder, cache_dir=cache_dir, limit=limit, select=select)
    # Reference values already in the input are about to be replaced; dama.data would refuse per-token lists made
    # with another tokenizer, so they are not read at all.
    rows = checked.rows.remove_columns([name for name in OUTPUT_COLUMNS if name in checked.rows.column_names])
    llava, processor = load_llava(model_path, dtype)
    dataset = PreferenceDataset(rows, processor, image_folder=checked.image_folder, max_length=max_length,
                                overlong=overlong, image_aspect_ratio=image_aspect_ratio,
                                template=ConversationTemplate(system=system_prompt))
    checked.report.add_overlong(dataset)
    left_out = checked.report.row_ids
    row_ids = [row_id for row_id in rows["row_id"] if row_id not in left_out]
    policy = DamaPolicy(llava.to(device).eval().requires_grad_(False), head="fused")

    def score(partial: PartialResults) -> PassOutcome:
        outcome = score_dataset(policy, dataset, row_ids, _fingerprints(rows), partial, batch_size=batch_size,
                                max_tokens=max_tokens_per_batch, device=device, layout=layout)
        outcome.skipped = checked.report.skipped
        return outcome

    def reference_fields(outcome: PassOutcome) -> dict[str, Any]:
        # `encoding` and `image_aspect_ratio` let training refuse these values if it tokenizes or sees images otherwise.
        return {"overlong": overlong, "on_bad_row": on_bad_row, "rows": checked.report.total, "device": str(device),
                "batch_size": batch_size, "max_tokens_per_batch": max_tokens_per_batch, "layout": layout,
                "encoding": dataset.encoder.signature, **hardness}

    return run_pass(input_path, plan, step="precompute-ref", settings=settings, columns=REFERENCE_COLUMNS,
                    score=score, row_values=output_values, metadata=reference_fields, limit=limit,
                    keep=checked.selected_row_ids if select else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dama precompute-ref",
        description=(
            "Run the reference model once over a preference dataset and store its log-probs, so that training holds "
            "no reference model. Pairs are tokenized, their images processed and over-long pairs handled exactly as "
            "in training, and scored by the fused head (no logits, no gradients). Per pair: sums, means and "
            "per-token log-probs of both responses, as the columns ref_chosen_logps, ref_rejected_logps, "
            "ref_chosen_mean_logps, ref_rejected_mean_logps, ref_chosen_token_logps, ref_rejected_token_logps and "
            "as the authors' `logps` list. The output is the input plus these columns (parquet in, parquet out; json "
            "in, json out); settings, counts and the input's mean hardness (from INPUT.meta.json, if any) go to "
            "OUTPUT.meta.json. An interrupted run resumes where it stopped when rerun with the same arguments."
        ),
    )
    add_pass_arguments(parser)
    parser.add_argument("--model", required=True, help="local folder of the reference LLaVA (model and processor)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="pairs per packed forward; with --max-tokens-per-batch, the most pairs per forward (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=None,
        help="group pairs, in file order, into forwards of at most this many tokens (each pair's prompt counted "
        "once with --layout prefix_shared, twice with packed) instead of a fixed number of pairs (default: off)",
    )
    parser.add_argument(
        "--layout",
        choices=REFERENCE_LAYOUTS,
        default=REFERENCE_LAYOUTS[0],
        help="batch layout, as in training: prefix_shared runs each pair's image and prompt through the model once "
        "for both responses, packed once per response; the log-probs agree up to float rounding "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help="the training max_length: a pair whose prompt (image tokens included) plus longer response exceeds it "
        "is never truncated, see --overlong (default: %(default)s)",
    )
    parser.add_argument(
        "--overlong",
        choices=OVERLONG_POLICIES,
        default="error",
        help="a pair longer than --max-length: stop with an error naming it, or skip it (null log-probs, listed in "
        "the metadata), as training does with the same setting (default: %(default)s)",
    )
    parser.add_argument(
        "--on-bad-row",
        choices=BAD_ROW_POLICIES,
        default="error",
        help="a bad row (a missing, corrupt or over-large image, an empty or missing response, a non-finite "
        "hardness; every row is checked before the model loads): stop with an error naming it, or skip it (null "
        "log-probs, listed with its reason in the metadata). Rows the input's metadata lists as skipped by an "
        "earlier step are always skipped (default: %(default)s)",
    )
    parser.add_argument(
        "--image-aspect-ratio",
        choices=IMAGE_ASPECT_RATIOS,
        default="crop",
        help="image preprocessing, as training's image_aspect_ratio: 'crop' (CLIP's resize and centre crop) or "
        "'pad' (expand to a square of the mean colour first, LLaVA-1.5's instruction tuning) (default: %(default)s)",
    )
    parser.add_argument(
        "--system-prompt",
        default=VICUNA_V1_SYSTEM,
        help="system text of the conversation template, as training's system_prompt (default: LLaVA-1.5's vicuna v1 "
        "wording, \"A chat between a curious user and an artificial intelligence assistant. ...\")",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device for the model (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="model dtype; use the dtype training runs in, so the policy reproduces these log-probs at step 0 "
        "(default: bfloat16 on CUDA, float32 on the CPU)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action() -> str:
        metadata = precompute_reference(
            args.input, args.output, args.model, image_folder=args.image_folder, batch_size=args.batch_size,
            max_tokens_per_batch=args.max_tokens_per_batch, max_length=args.max_length, overlong=args.overlong,
            on_bad_row=args.on_bad_row, image_aspect_ratio=args.image_aspect_ratio, system_prompt=args.system_prompt,
            select=args.select, device=args.device, dtype=args.dtype, limit=args.limit, cache_dir=args.cache_dir,
            overwrite=args.overwrite, layout=args.layout,
        )
        if metadata.get("already_complete"):
            return (f"{args.output} is already complete (same input and settings, written {metadata['created']}): "
                    "nothing to do; pass --overwrite to compute it again")
        return (
            f"scored {metadata['count']} pairs ({metadata['resumed']} from an earlier run), "
            f"{skipped_summary(metadata)}; {metadata['dtype']} on {metadata['device']}\n"
            f"wrote {args.output} and {metadata_path(args.output)}"
        )

    output = PassOutput("precompute-ref", args.output, needed=lambda: input_bytes(args.input))
    return run_command("precompute-ref", output.around(action))


if __name__ == "__main__":
    sys.exit(main())

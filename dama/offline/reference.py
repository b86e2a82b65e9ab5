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

import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow as pa
import torch
from tqdm.auto import tqdm

import dama_kernels
from dama.command import check_device_argument, run_command
from dama.data.batch import PreferenceBatch
from dama.data.collator import TokenBudgetBatchSampler, layout_pair_lengths, make_collator
from dama.data.dataset import PreferenceDataset, dataset_options
from dama.data.formats import (
    REF_LOGPS_COLUMNS,
    REF_MEAN_COLUMNS,
    REF_TOKEN_COLUMNS,
    PairRow,
    metadata_path,
    read_metadata,
)
from dama.data.row_values import AUTHORS_LOGPS_SLOTS
from dama.data.validation import RowChecks, check_input
from dama.errors import DamaError
from dama.model.loading import load_llava
from dama.model.policy import DamaPolicy
from dama.offline.passes import (
    PARQUET_READ_ROWS,
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
from dama.option_loader import build, read_options
from dama.options import (
    LAYOUTS,
    EncodingOptions,
    LlavaOptions,
    PassOptions,
    RowOptions,
    check_at_least,
    check_choice,
    option_field,
)
from dama.output_guard import OutputGuard, input_bytes

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
ReferenceLayout = Literal[REFERENCE_LAYOUTS]
SKIP_HINT = "Fix the row, or pass --on-bad-row skip to leave such rows out (they are listed in the metadata)."



@dataclass
class ReferenceOptions(EncodingOptions, LlavaOptions, RowOptions, PassOptions):
    """Everything `dama precompute-ref` takes: what to read and write, which rows, the encoding (training's) and the
    reference model's batching."""

    # Training's layout field, its padded layout left out (the command line then refuses it as a choice).
    layout: ReferenceLayout = field(default=REFERENCE_LAYOUTS[0],
                                    metadata=option_field(EncodingOptions, "layout").metadata)
    batch_size: int = field(
        default=DEFAULT_BATCH_SIZE,
        metadata={"help": "Pairs per packed forward; with max_tokens_per_batch, the most pairs per forward."})
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={"help": "Group pairs, in file order, into forwards of at most this many tokens (each pair's prompt "
                  "counted once with layout prefix_shared, twice with packed) instead of a fixed number of pairs "
                  "(default: off)."})

    def __post_init__(self) -> None:
        self.check_pass_options()
        self.check_row_options()
        self.check_encoding_options()
        self.check_llava_options()
        check_choice("layout", self.layout, REFERENCE_LAYOUTS)
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("max_tokens_per_batch", self.max_tokens_per_batch, 1, optional=True)

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
    options: ReferenceOptions,
) -> PassOutcome:
    """Score every pair of `dataset` not already in `partial`, appending each finished batch to it.

    row_ids[i] is the row id of dataset[i] and `fingerprints` maps a row id to its PairRow fingerprint: a row found
    in `partial` with another fingerprint means the input changed since the interrupted run, which is an error.
    Batches: `options.layout` (training's, not padded), `options.batch_size` pairs or `options.max_tokens_per_batch`
    tokens, on `options.device`.
    """
    layout, device = options.layout, options.device
    outcome = PassOutcome(results={}, skipped=[], resumed=0)
    todo = []
    for index, row_id in enumerate(row_ids):
        finished = partial.finished(row_id, fingerprints[row_id], f"row {row_id}")
        if finished is None:
            todo.append(index)
            continue
        outcome.results[row_id] = finished
    outcome.resumed = len(outcome.results)
    collator = make_collator(layout)
    pair_lengths = layout_pair_lengths(dataset.pair_lengths, dataset.prompt_lengths, layout)
    batches = plan_batches(todo, pair_lengths, options.batch_size, options.max_tokens_per_batch)
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


def _check_files(options: ReferenceOptions) -> None:
    check_device_argument(options.device)
    input_path, model_path = Path(options.input), Path(options.model)
    if not input_path.exists():
        raise DamaError(f"--input {input_path} does not exist")
    if not (model_path / "config.json").is_file():
        raise DamaError(
            f"--model {model_path} holds no config.json: give the local folder of a saved LLaVA (no downloads)"
        )
    check_output_path(input_path, Path(options.output))


def precompute_reference(options: ReferenceOptions) -> dict[str, Any]:
    """The whole pass: check every row, score with the reference model, write the output and `<output>.meta.json`.

    Returns the metadata ("already_complete": True and nothing computed when the output is this run's, complete).
    Give the dtype training runs in, so that the policy at step 0 reproduces these numbers. Images resolve under
    `options.image_folder`, by default the input's folder (the input itself when it is a folder of shards), as in
    PreferenceDataset.from_path. The encoding options are training's (template, max_length, image processing; the
    layout gives the same values up to float rounding); `options.select` keeps the rows meeting its conditions
    (dama.data.formats), and only those are written.
    """
    _check_files(options)
    input_path, dtype = Path(options.input), options.resolved_dtype
    model_path = Path(options.model).resolve()
    settings = {"model": str(model_path), "dtype": dtype, "max_length": options.max_length,
                "image_aspect_ratio": options.image_aspect_ratio, "system_prompt": options.system_prompt,
                "select": list(options.select)}
    plan = plan_pass(options, settings, on_bad_row=options.on_bad_row, overlong=options.overlong)
    if plan.action == "complete":
        return completed_metadata(plan)
    # Read before the model loads, so that a broken metadata file or a bad row fails the run at once.
    hardness = input_hardness(input_path)
    checked = check_input(input_path, RowChecks(hardness=True), on_bad_row=options.on_bad_row, skip_hint=SKIP_HINT,
                          image_folder=options.image_folder, cache_dir=options.cache_dir, limit=options.limit,
                          select=options.select)
    # Reference values already in the input are about to be replaced; dama.data would refuse per-token lists made
    # with another tokenizer, so they are not read at all.
    rows = checked.rows.remove_columns([name for name in OUTPUT_COLUMNS if name in checked.rows.column_names])
    llava, processor = load_llava(model_path, dtype)
    dataset = PreferenceDataset(rows, processor, image_folder=checked.image_folder,
                                **dataset_options(options.encoding))
    checked.report.add_overlong(dataset)
    left_out = checked.report.row_ids
    row_ids = [row_id for row_id in rows["row_id"] if row_id not in left_out]
    policy = DamaPolicy(llava.to(options.device).eval().requires_grad_(False), head="fused")

    def score(partial: PartialResults) -> PassOutcome:
        outcome = score_dataset(policy, dataset, row_ids, _fingerprints(rows), partial, options)
        outcome.skipped = checked.report.skipped
        return outcome

    def reference_fields(outcome: PassOutcome) -> dict[str, Any]:
        # `encoding` and `image_aspect_ratio` let training refuse these values if it tokenizes or sees images otherwise.
        return {"overlong": options.overlong, "on_bad_row": options.on_bad_row, "rows": checked.report.total,
                "device": str(options.device), "batch_size": options.batch_size,
                "max_tokens_per_batch": options.max_tokens_per_batch, "layout": options.layout,
                "encoding": dataset.encoder.signature, **hardness}

    output = DatasetOutput(input_path, REFERENCE_COLUMNS, output_values, options.limit,
                           checked.selected_row_ids if options.select else None)
    return run_pass(plan, step="precompute-ref", settings=settings, score=score, output=output,
                    metadata=reference_fields)


DESCRIPTION = (
    "Run the reference model once over a preference dataset and store its log-probs, so that training holds no "
    "reference model. Pairs are tokenized, their images processed and over-long pairs handled exactly as in "
    "training, and scored by the fused head (no logits, no gradients). Per pair: sums, means and per-token log-probs "
    "of both responses, as the columns ref_chosen_logps, ref_rejected_logps, ref_chosen_mean_logps, "
    "ref_rejected_mean_logps, ref_chosen_token_logps, ref_rejected_token_logps and as the authors' `logps` list. The "
    "output is the input plus these columns (parquet in, parquet out; json in, json out); settings, counts and the "
    "input's mean hardness (from INPUT.meta.json, if any) go to OUTPUT.meta.json. An interrupted run resumes where it "
    "stopped when rerun with the same arguments. The encoding options (max_length, overlong, image_aspect_ratio, "
    "system_prompt, layout) must be training's."
)


def parse_options(argv: list[str] | None = None) -> ReferenceOptions:
    """`dama precompute-ref`'s options from an optional YAML (--config) and the command line (dama.option_loader)."""
    return build(ReferenceOptions, read_options("dama precompute-ref", [ReferenceOptions], argv, DESCRIPTION))


def main(argv: list[str] | None = None) -> int:
    def action() -> str:
        options = parse_options(argv)
        with OutputGuard("precompute-ref", options.output, needed=lambda: input_bytes(options.input)):
            metadata = precompute_reference(options)
        if metadata.get("already_complete"):
            return already_complete_message(options.output, metadata)
        return (
            f"scored {metadata['count']} pairs ({metadata['resumed']} from an earlier run), "
            f"{skipped_summary(metadata)}; {metadata['dtype']} on {metadata['device']}\n"
            f"wrote {options.output} and {metadata_path(options.output)}"
        )

    return run_command("precompute-ref", action)


if __name__ == "__main__":
    sys.exit(main())

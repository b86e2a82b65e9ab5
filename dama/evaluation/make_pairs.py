"""`dama make-pairs`: preference pairs from a model's own answers, judged for object hallucination by CHAIR.

RLAIF-V's recipe in the small: the model answers each `{image, question}` row K times (sampled from a seed), a judge
ranks the answers, and the best is paired against the worst, so the pairs target the mistakes this model makes. The
judge is `dama eval-chair`'s, word for word: each answer's mentioned objects are compared with the image's objects in
COCO-format instances files (plus, with `--captions`, the objects its reference captions mention), giving the
answer's hallucinated objects and the ground-truth objects it names. Answers are ranked by

    fewer hallucinated objects first, then higher recall (more of the image's objects named)

and a row becomes the pair (first best answer, first worst answer); a row whose answers all rank equal (the same
hallucinated count and recall) carries no preference and is left out (reason "all answers tie"). Empty answers
are not ranked (training refuses an empty response); a row with fewer than two others counts as a tie.

Inputs are those of `dama generate` (a JSONL of `{image, question[, id, image_id]}`, or the RLAIF-V parquet / JSON
formats); each row's image must be in the instances files, found by `image_id` or the image's file name (COCO's
`file_name`), or by `idx` for the preference formats. The output is RLAIF-V-format parquet (ds_name, image with
its bytes, question, chosen, rejected, origin_dataset, origin_split, idx = the annotations' image id, image_path),
which `dama hardness`, `dama precompute-ref` and `dama train` read as they read RLAIF-V; `origin_split` is JSON text
naming the model and the judge (`--select origin_split.model~...` works on it). The run's settings, the counts and
the mean hallucinated objects of chosen and rejected answers go to `<output>.meta.json`.

Resumable and atomic like the other offline passes: each finished batch of rows (answers, judgements, pair) is
appended to `<output>.partial.jsonl`; a rerun with the same settings continues after it (each batch samples from
`seed` and its number, so a resumed run writes what an uninterrupted one would), and the parquet appears only
complete.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dama.command import check_device_argument, run_command
from dama.data.formats import (
    PairRow,
    atomic_path,
    default_image_folder,
    load_preference_rows,
    metadata_path,
    read_metadata,
    write_metadata,
)
from dama.evaluation.chair import ObjectVocabulary, add_caption_objects, read_instances, score_response
from dama.evaluation.generate import SEED_STRIDE, DecodingSettings, ResponseGenerator, load_generation_model
from dama.evaluation.prompts import JSONL_SUFFIX, PromptRow, iter_prompt_rows
from dama.model.loading import DTYPES
from dama.offline.passes import PartialResults, partial_path, plan_output, run_identity

# What answers the rows: ResponseGenerator's call, (questions, images, seed) -> one answer per question.
AnswerSampler = Callable[[Sequence[str], Sequence[Image.Image], int], list[str]]
STEP = "make-pairs"
TIE = "all answers tie"
DEFAULT_SAMPLES = 4
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 512
# Output rows per parquet write: each carries its image's bytes.
WRITE_ROWS = 256


@dataclass(frozen=True)
class JudgedAnswer:
    """One answer as the CHAIR judge sees it: the objects it names that are not in the image, and the share of the
    image's objects it names (0 for an image without annotated objects)."""

    text: str
    hallucinated: tuple[str, ...]
    recall: float

    @property
    def rank(self) -> tuple[int, float]:
        """Smaller is better: fewer hallucinated objects, then higher recall."""
        return len(self.hallucinated), -self.recall


class ChairJudge:
    """`dama eval-chair`'s judgement of single answers: instances files (and captions) read once, answers scored by
    `score_response` against their image's objects."""

    def __init__(self, annotations: Sequence[str | Path], captions: Sequence[str | Path] = ()):
        self.truth = read_instances(annotations)
        self.vocabulary = ObjectVocabulary.for_categories(self.truth.categories, self.truth.synonyms)
        self.captions = [Path(path) for path in captions]

    def image_keys(self, rows: Sequence[PromptRow]) -> list[Any]:
        """The annotations' image id of every row; ValueError naming the first row whose image they do not hold.

        With captions, also adds the objects their captions mention, for these images only."""
        keys = [self.truth.image_key(row.image_id) for row in rows]
        unknown = [row for row, key in zip(rows, keys, strict=True) if key is None]
        if unknown:
            raise ValueError(f"{len(unknown)} of {len(rows)} rows name images the annotations do not hold (first: row "
                             f"{unknown[0].row_id}, image_id {unknown[0].image_id!r}); give the instances file of "
                             "those images, or an image_id per row")
        if self.captions:
            add_caption_objects(self.truth, self.captions, self.vocabulary, images=set(keys))
        return keys

    def judge(self, answer: str, image_key: Any) -> JudgedAnswer:
        present = self.truth.objects[image_key]
        score = score_response(self.vocabulary, answer, present)
        found = len(score.mentioned) - len(score.hallucinated)
        return JudgedAnswer(answer, tuple(score.hallucinated), found / len(present) if present else 0.0)


def pick_pair(answers: Sequence[JudgedAnswer]) -> tuple[int, int] | None:
    """(chosen, rejected) indices: the first best-ranked answer and the first worst-ranked one; None when every
    answer ranks the same (no preference to learn). Empty answers take no part: a pair needs two responses that say
    something (training refuses an empty one), and an empty answer would otherwise win, naming nothing wrong."""
    if not answers:
        raise ValueError("pick_pair needs at least one answer")
    spoken = [index for index, answer in enumerate(answers) if answer.text.strip()]
    if not spoken:
        return None
    ranks = [answers[index].rank for index in spoken]
    best, worst = spoken[ranks.index(min(ranks))], spoken[ranks.index(max(ranks))]
    return None if answers[best].rank == answers[worst].rank else (best, worst)


def check_pair_paths(input_path: Path, output_path: Path) -> None:
    """ValueError unless the output is a .parquet file other than the input (`plan_output`'s path check)."""
    if output_path.suffix != ".parquet":
        raise ValueError(f"--output must be a .parquet file (RLAIF-V format), got {output_path}")
    if output_path.resolve() == input_path.resolve():
        raise ValueError("--output must differ from --input")


def prompt_rows(input_path: Path, image_folder: Path | None, limit: int | None, select: Sequence[str],
                cache_dir: str | Path | None) -> list[PromptRow]:
    """The input's `{image, question}` rows (images not decoded); `select` applies to the preference formats."""
    if input_path.suffix == JSONL_SUFFIX:
        if select:
            raise ValueError("--select reads columns of a parquet or JSON dataset; a .jsonl input has none to select "
                             "on: write the rows you want to a smaller .jsonl instead")
        return list(iter_prompt_rows(input_path, image_folder, limit))
    folder = image_folder if image_folder is not None else default_image_folder(input_path)
    records = load_preference_rows(input_path, cache_dir=cache_dir, limit=limit, select=select)
    pairs = [PairRow.from_record(record, folder) for record in records]
    return [PromptRow(pair, id=pair.row_id, image_id=pair.idx) for pair in pairs]


def _chunks(rows: Sequence[PromptRow], size: int) -> Iterator[list[PromptRow]]:
    for start in range(0, len(rows), size):
        yield list(rows[start:start + size])


def _record(row: PromptRow, judged: Sequence[JudgedAnswer]) -> dict[str, Any]:
    pair = pick_pair(judged)
    return {"row_id": row.row_id, "fingerprint": row.fingerprint, "answers": [answer.text for answer in judged],
            "hallucinated": [list(answer.hallucinated) for answer in judged],
            "recall": [answer.recall for answer in judged],
            "chosen": None if pair is None else pair[0], "rejected": None if pair is None else pair[1]}


def sample_and_judge(rows: Sequence[PromptRow], keys: Sequence[Any], sampler: AnswerSampler,
                     judge: ChairJudge, partial: PartialResults, *, samples: int, batch_size: int, seed: int,
                     progress: bool = True) -> int:
    """Answer each row not yet in `partial` `samples` times, judge the answers and append the records batch by batch;
    returns how many rows this call computed. Batch n samples from seed * SEED_STRIDE + n."""
    from tqdm.auto import tqdm

    key_of = {row.row_id: key for row, key in zip(rows, keys, strict=True)}
    computed = 0
    with tqdm(total=len(rows), desc=STEP, unit="row", disable=not progress) as bar:
        for number, batch in enumerate(_chunks(rows, batch_size)):
            pending = [row for row in batch
                       if partial.finished(row.row_id, row.fingerprint, f"row {row.row_id}") is None]
            if pending:
                images = [row.load_image() for row in pending]
                # Each row's samples sit side by side: answers[r * samples + k] is row r's k-th answer.
                answers = sampler([row.question for row in pending for _ in range(samples)],
                                    [image for image in images for _ in range(samples)],
                                    seed=seed * SEED_STRIDE + number)
                records = []
                for index, row in enumerate(pending):
                    texts = answers[index * samples:(index + 1) * samples]
                    records.append(_record(row, [judge.judge(text, key_of[row.row_id]) for text in texts]))
                partial.append(records)
                computed += len(pending)
            bar.update(len(batch))
    return computed


def _image_cell(row: PromptRow) -> dict[str, Any]:
    """The row's image as RLAIF-V stores it: {bytes, path}, the bytes read from the file when the row has none."""
    pair = row.pair
    image = pair.image
    if isinstance(image, str):
        image = json.loads(image) if image.startswith("{") else {"path": image}
    path = (image.get("path") if isinstance(image, dict) else None) or pair.image_path
    if isinstance(image, dict) and image.get("bytes") is not None:
        return {"bytes": image["bytes"], "path": path}
    file = Path(path)
    if not file.is_absolute() and pair.image_folder is not None:
        file = pair.image_folder / file
    return {"bytes": file.read_bytes(), "path": path}


def _output_row(row: PromptRow, key: Any, record: dict[str, Any], source: str, origin_split: str) -> dict[str, Any]:
    image = _image_cell(row)
    return {"ds_name": source, "image": image, "question": row.question,
            "chosen": record["answers"][record["chosen"]], "rejected": record["answers"][record["rejected"]],
            "origin_dataset": source, "origin_split": origin_split, "idx": key if isinstance(key, int) else None,
            "image_path": image["path"]}


def output_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("ds_name", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("question", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
        ("origin_dataset", pa.string()), ("origin_split", pa.string()), ("idx", pa.int64()),
        ("image_path", pa.string()),
    ])


def write_pairs(output_path: Path, rows: Sequence[PromptRow], keys: Sequence[Any], done: dict[str, dict[str, Any]],
                source: str, origin_split: str) -> int:
    """The kept pairs in input order as one parquet file, atomically; returns how many were written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, written = output_schema(), 0
    with atomic_path(output_path) as temporary, pq.ParquetWriter(temporary, schema) as writer:
        buffer: list[dict[str, Any]] = []
        for row, key in zip(rows, keys, strict=True):
            record = done[row.row_id]
            if record["chosen"] is None:
                continue
            buffer.append(_output_row(row, key, record, source, origin_split))
            if len(buffer) == WRITE_ROWS:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                written, buffer = written + len(buffer), []
        writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
        written += len(buffer)
    return written


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def pair_statistics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts and means over finished rows: pairs kept, ties, and hallucinated objects / recall per kept side."""
    kept = [record for record in records if record["chosen"] is not None]

    def side_mean(side: str, measure: str) -> float | None:
        values = [record[measure][record[side]] for record in kept]
        return _mean([len(value) if measure == "hallucinated" else value for value in values])

    return {
        "rows": len(records),
        "pairs": len(kept),
        "skipped_by_reason": {TIE: len(records) - len(kept)} if len(records) > len(kept) else {},
        "hallucinated_per_answer": _mean([len(h) for record in records for h in record["hallucinated"]]),
        "chosen_hallucinated_mean": side_mean("chosen", "hallucinated"),
        "rejected_hallucinated_mean": side_mean("rejected", "hallucinated"),
        "chosen_recall_mean": side_mean("chosen", "recall"),
        "rejected_recall_mean": side_mean("rejected", "recall"),
    }


@dataclass(frozen=True)
class SamplingSettings:
    """How many answers per row and how they are drawn (always sampled: K greedy answers would be one answer)."""

    samples: int = DEFAULT_SAMPLES
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def decoding(self) -> DecodingSettings:
        return DecodingSettings(max_new_tokens=self.max_new_tokens, sample=True, temperature=self.temperature,
                                top_p=self.top_p, seed=self.seed)

    def check(self) -> None:
        if self.samples < 2:
            raise ValueError(f"--samples must be at least 2 (a pair needs two answers to compare), got {self.samples}")
        self.decoding().check()


def make_pairs(
    input_path: str | Path,
    output_path: str | Path,
    model_dir: str | Path,
    annotations: Sequence[str | Path],
    *,
    captions: Sequence[str | Path] = (),
    sampling: SamplingSettings = SamplingSettings(),
    image_folder: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
    dtype: str | None = None,
    limit: int | None = None,
    select: Sequence[str] = (),
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    sampler: AnswerSampler | None = None,
) -> dict[str, Any]:
    """The whole command: sample, judge, pair and write; returns the metadata written beside the output.

    `batch_size` counts rows (each decoded `samples` times in one batch). When the output is already this run's
    complete output, nothing is computed and its metadata is returned with "already_complete": True. `sampler`
    replaces the model's sampled decoding (tests script the answers); the model folder still names the model.
    """
    input_path, output_path, model_dir = Path(input_path), Path(output_path), Path(model_dir)
    sampling.check()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    check_device_argument(device)
    if not input_path.exists():
        raise FileNotFoundError(f"--input {input_path} does not exist")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model {model_dir} holds no config.json: give the local folder of a saved LLaVA")
    if not annotations:
        raise ValueError("give at least one --annotations file (COCO instances format)")
    dtype = dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    judge_files = [Path(path).resolve() for path in (*annotations, *captions)]
    settings = {"model": str(model_dir.resolve()), "dtype": dtype, "samples": sampling.samples,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
                "max_new_tokens": sampling.max_new_tokens, "batch_size": batch_size,
                "annotations": [str(path) for path in judge_files[:len(annotations)]],
                "captions": [str(path) for path in judge_files[len(annotations):]], "select": list(select)}
    identity = run_identity(input_path, settings, limit=limit,
                            image_folder=None if image_folder is None else str(Path(image_folder).resolve()))
    plan = plan_output(input_path, output_path, settings, identity, overwrite, check_paths=check_pair_paths)
    if plan.action == "complete":
        return {**read_metadata(output_path), "already_complete": True}
    rows = prompt_rows(input_path, None if image_folder is None else Path(image_folder), limit, select, cache_dir)
    judge = ChairJudge(annotations, captions)
    keys = judge.image_keys(rows)
    if sampler is None:
        sampler = ResponseGenerator(*load_generation_model(model_dir, dtype, device), sampling.decoding())
    judge_name = "CHAIR: " + " + ".join(path.name for path in judge_files)
    origin_split = json.dumps({"model": model_dir.resolve().name, "judge": judge_name, "type": STEP})
    plan.start(STEP)
    with PartialResults(partial_path(output_path), settings) as partial:
        computed = sample_and_judge(rows, keys, sampler, judge, partial, samples=sampling.samples,
                                    batch_size=batch_size, seed=sampling.seed, progress=progress)
        written = write_pairs(output_path, rows, keys, partial.done, input_path.stem, origin_split)
        metadata = {
            **settings,
            **pair_statistics([partial.done[row.row_id] for row in rows]),
            "count": written,
            "computed": computed,
            "resumed": len(rows) - computed,
            "judge": judge_name,
            "origin_split": origin_split,
            "input": str(input_path),
            "output": output_path.name,
            "device": device,
            "limit": limit,
            "run": plan.identity,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_metadata(output_path, metadata)
    partial.remove()
    return metadata


def summary_text(metadata: dict[str, Any], output: str) -> str:
    """The command's closing lines: rows, pairs kept, ties, and hallucinated objects of chosen vs rejected."""
    if metadata.get("already_complete"):
        return (f"{output} is already complete (same input and settings, written {metadata['created']}): nothing to "
                "do; pass --overwrite to make the pairs again")

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    ties = metadata["skipped_by_reason"].get(TIE, 0)
    every_answer = number(metadata["hallucinated_per_answer"])
    return (f"judged {metadata['samples']} answers for each of {metadata['rows']} rows ({metadata['resumed']} from an "
            f"earlier run): kept {metadata['pairs']} pairs, skipped {ties} rows whose answers all tie\n"
            f"hallucinated objects per answer: chosen {number(metadata['chosen_hallucinated_mean'])}, rejected "
            f"{number(metadata['rejected_hallucinated_mean'])} (all answers {every_answer}); object recall: "
            f"chosen {number(metadata['chosen_recall_mean'])}, rejected "
            f"{number(metadata['rejected_recall_mean'])}\nwrote {output} and {metadata_path(output)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dama make-pairs",
        description="Build hallucination-targeted preference pairs from a model's own answers (RLAIF-V's recipe with "
        "a rule-based judge): sample K answers per {image, question} row, score each with the CHAIR judge of `dama "
        "eval-chair` against COCO-format annotations (fewest hallucinated objects wins, ties broken by object recall), "
        "pair the best against the worst and skip rows whose answers all tie. Writes RLAIF-V-format parquet that "
        "`dama hardness`, `dama precompute-ref` and `dama train` read, and OUTPUT.meta.json with the counts. An "
        "interrupted run resumes where it stopped when rerun with the same arguments.",
    )
    parser.add_argument("--input", required=True,
                        help="the {image, question} rows: a .jsonl of {image (path or base64), question[, id, "
                        "image_id]} per line, or an RLAIF-V .parquet file or folder of shards, or a .json list")
    parser.add_argument("--output", required=True, help="the .parquet file of pairs to write")
    parser.add_argument("--image-folder", default=None,
                        help="folder that relative image paths are resolved under (default: the input's folder)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --output that holds another run's pairs (otherwise refused; rerunning a "
                        "finished run with the same input and settings reports it complete and does nothing)")
    parser.add_argument("--select", action="append", default=[], metavar="KEY=VALUE",
                        help="parquet and JSON inputs: use only the rows meeting this condition, as in `dama "
                        "hardness --select` (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N rows (for a trial run)")
    parser.add_argument("--cache-dir", default=None,
                        help="folder for the datasets library's cache of a parquet input (default: its own)")
    parser.add_argument("--model", required=True,
                        help="local folder of the saved LLaVA whose answers are paired (the model you will train)")
    parser.add_argument("--annotations", action="append", required=True, metavar="INSTANCES_JSON",
                        help="COCO-format instances file of the input's images, e.g. instances_train2014.json "
                        "(repeatable)")
    parser.add_argument("--captions", action="append", default=[], metavar="CAPTIONS_JSON",
                        help="COCO-format captions file(s), e.g. captions_train2014.json: objects the reference "
                        "captions mention also count as present, as in `dama eval-chair` (optional, repeatable)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="answers sampled per row, K >= 2 (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled answers (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="most tokens per answer (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="rows per decoding batch, each decoded --samples times (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sampling = SamplingSettings(samples=args.samples, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                max_new_tokens=args.max_new_tokens)

    def action() -> str:
        metadata = make_pairs(args.input, args.output, args.model, args.annotations, captions=args.captions,
                              sampling=sampling, image_folder=args.image_folder, batch_size=args.batch_size,
                              device=args.device, dtype=args.dtype, limit=args.limit, select=args.select,
                              cache_dir=args.cache_dir, overwrite=args.overwrite)
        return summary_text(metadata, args.output)

    return run_command(STEP, action)


if __name__ == "__main__":
    sys.exit(main())

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

It follows the passes' protocol (dama.offline.passes): each finished batch of rows (answers, judgements, pair) is
appended to `<output>.partial.jsonl`; a rerun with the same settings continues after it (each batch samples from
`seed` and its number, so a resumed run writes what an uninterrupted one would); the parquet appears only complete;
a finished run is reported complete and another run's output is refused unless --overwrite. Every row is checked
before the model loads (an empty question, an image that is missing or does not decode): the first bad one stops
the run, or with --on-bad-row skip each is left out; the metadata's `skipped` lists those and the tied rows.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dama.command import run_command
from dama.data.formats import atomic_path, file_row_id, metadata_path, parquet_files
from dama.errors import DamaError
from dama.evaluation.chair import ObjectVocabulary, add_caption_objects, read_instances, score_response
from dama.evaluation.generate import (
    SEED_STRIDE,
    DecodingSettings,
    ResponseGenerator,
    check_model_pass_paths,
    load_generation_model,
)
from dama.evaluation.prompts import PromptRow, check_prompt_rows, iter_prompt_rows
from dama.offline.passes import (
    PartialResults,
    PassOutcome,
    already_complete_message,
    completed_metadata,
    plan_pass,
    run_pass,
    skipped_summary,
)
from dama.option_loader import build, read_options
from dama.options import LlavaOptions, PassOptions, RowOptions, check_at_least
from dama.output_guard import OutputGuard

# What answers the rows: ResponseGenerator's call, (questions, images, seed) -> one answer per question.
AnswerSampler = Callable[[Sequence[str], Sequence[Image.Image], int], list[str]]
STEP = "make-pairs"
TIE = "all answers tie"
DEFAULT_SAMPLES = 4
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 512
# Output rows per parquet write: each carries its image's bytes.
WRITE_ROWS = 256
SKIP_HINT = "Fix the row, or pass --on-bad-row skip to leave such rows out (they are listed in the metadata)."


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
        """The annotations' image id of every row; DamaError naming the first row whose image they do not hold.

        With captions, also adds the objects their captions mention, for these images only."""
        keys = [self.truth.image_key(row.image_id) for row in rows]
        unknown = [row for row, key in zip(rows, keys, strict=True) if key is None]
        if unknown:
            raise DamaError(f"{len(unknown)} of {len(rows)} rows name images the annotations do not hold (first: row "
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


@dataclass(frozen=True)
class SamplingSettings:
    """How many answers per row and how they are drawn (always sampled: K greedy answers would be one answer)."""

    samples: int = field(
        default=DEFAULT_SAMPLES,
        metadata={"help": "Answers sampled per row, K >= 2 (the best is paired with the worst)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampled answers (batch n draws from seed and n)."})
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "Most tokens per answer."})

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2:
            raise DamaError(f"--samples must be at least 2 (a pair needs two answers to compare), got {self.samples!r}")
        self.decoding()  # DecodingSettings checks the rest

    def decoding(self) -> DecodingSettings:
        return DecodingSettings(max_new_tokens=self.max_new_tokens, sample=True, temperature=self.temperature,
                                top_p=self.top_p, seed=self.seed)


def _flat(paths: Sequence[Any]) -> list[str]:
    return [str(path) for item in paths for path in ([item] if isinstance(item, str | Path) else item)]


@dataclass
class MakePairsOptions(LlavaOptions, RowOptions, PassOptions):
    """What `dama make-pairs` reads (which rows, what to do with a bad one), the model whose answers are paired, the
    judge's annotation files, and the batching; the output is a .parquet file."""

    annotations: list[str] = field(
        default_factory=list,
        metadata={"action": "append", "metavar": "INSTANCES_JSON",
                  "help": "COCO-format instances file of the input's images, e.g. instances_train2014.json (required, "
                  "repeatable)."})
    captions: list[str] = field(
        default_factory=list,
        metadata={"action": "append", "metavar": "CAPTIONS_JSON",
                  "help": "COCO-format captions file(s), e.g. captions_train2014.json: objects the reference captions "
                  "mention also count as present, as in `dama eval-chair` (optional, repeatable)."})
    batch_size: int = field(
        default=DEFAULT_BATCH_SIZE, metadata={"help": "Rows per decoding batch, each decoded `samples` times."})

    def __post_init__(self) -> None:
        self.check_pass_options()
        self.check_row_options()
        self.check_llava_options()
        check_at_least("batch_size", self.batch_size, 1)
        # The command line gives one list per flag (argparse's append of nargs="+"): the files are their union.
        self.annotations, self.captions = _flat(self.annotations), _flat(self.captions)
        if not self.annotations:
            raise DamaError("give at least one --annotations file (COCO instances format)")


def _chunks(rows: Sequence[PromptRow], size: int) -> Iterator[list[PromptRow]]:
    for start in range(0, len(rows), size):
        yield list(rows[start:start + size])


def _record(row: PromptRow, judged: Sequence[JudgedAnswer]) -> dict[str, Any]:
    pair = pick_pair(judged)
    return {"row_id": row.row_id, "fingerprint": row.fingerprint, "answers": [answer.text for answer in judged],
            "hallucinated": [list(answer.hallucinated) for answer in judged],
            "recall": [answer.recall for answer in judged],
            "chosen": None if pair is None else pair[0], "rejected": None if pair is None else pair[1]}


def sample_and_judge(rows: Sequence[PromptRow], keys: Sequence[Any], sampler: AnswerSampler, judge: ChairJudge,
                     partial: PartialResults, sampling: SamplingSettings, batch_size: int,
                     progress: bool = True) -> PassOutcome:
    """Answer each row not yet in `partial` `sampling.samples` times, judge the answers and append the records batch by
    batch; the outcome holds every row's record, a tie listed as skipped. Batch n samples from
    seed * SEED_STRIDE + n."""
    from tqdm.auto import tqdm

    key_of = {row.row_id: key for row, key in zip(rows, keys, strict=True)}
    samples = sampling.samples
    outcome = PassOutcome(results={}, skipped=[], resumed=0)
    with tqdm(total=len(rows), desc=STEP, unit="row", disable=not progress) as bar:
        for number, batch in enumerate(_chunks(rows, batch_size)):
            pending = outcome.resume_rows(batch, partial)
            if pending:
                images = [row.load_image() for row in pending]
                # Each row's samples sit side by side: answers[r * samples + k] is row r's k-th answer.
                answers = sampler([row.question for row in pending for _ in range(samples)],
                                  [image for image in images for _ in range(samples)],
                                  seed=sampling.seed * SEED_STRIDE + number)
                records = []
                for index, row in enumerate(pending):
                    texts = answers[index * samples:(index + 1) * samples]
                    records.append(_record(row, [judge.judge(text, key_of[row.row_id]) for text in texts]))
                partial.append(records)
                outcome.results.update((record["row_id"], record) for record in records)
            bar.update(len(batch))
    outcome.skipped += [{"row_id": row.row_id, "reason": TIE, "detail": f"row {row.row_id}: its answers all rank "
                         "the same"} for row in rows if outcome.results[row.row_id]["chosen"] is None]
    return outcome


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


@dataclass
class PairsOutput:
    """The RLAIF-V parquet `dama make-pairs` writes: the kept pairs of `rows` (judged in `keys`' images), in input
    order, each with its image's bytes; `written` counts them once written."""

    input_path: Path
    limit: int | None
    rows: Sequence[PromptRow]
    keys: Sequence[Any]
    source: str
    origin_split: str
    written: int = 0

    def write(self, output_path: Path, outcome: PassOutcome) -> dict[str, str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema, output_row_ids = output_schema(), {}
        with atomic_path(output_path) as temporary, pq.ParquetWriter(temporary, schema) as writer:
            buffer: list[dict[str, Any]] = []
            for row, key in zip(self.rows, self.keys, strict=True):
                record = outcome.results[row.row_id]
                if record["chosen"] is None:
                    continue
                output_row_ids[row.row_id] = file_row_id(output_path, len(output_row_ids))
                buffer.append(_output_row(row, key, record, self.source, self.origin_split))
                if len(buffer) == WRITE_ROWS:
                    writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                    buffer = []
            writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
        self.written = len(output_row_ids)
        return output_row_ids

    def description(self) -> dict[str, Any]:
        return {"input": str(self.input_path), "format": "parquet", "limit": self.limit}


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def pair_statistics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts and means over judged rows: rows, pairs kept, and hallucinated objects / recall per kept side."""
    kept = [record for record in records if record["chosen"] is not None]

    def side_mean(side: str, measure: str) -> float | None:
        values = [record[measure][record[side]] for record in kept]
        return _mean([len(value) if measure == "hallucinated" else value for value in values])

    return {
        "rows": len(records),
        "pairs": len(kept),
        "hallucinated_per_answer": _mean([len(h) for record in records for h in record["hallucinated"]]),
        "chosen_hallucinated_mean": side_mean("chosen", "hallucinated"),
        "rejected_hallucinated_mean": side_mean("rejected", "hallucinated"),
        "chosen_recall_mean": side_mean("chosen", "recall"),
        "rejected_recall_mean": side_mean("rejected", "recall"),
    }


def make_pairs(
    options: MakePairsOptions,
    sampling: SamplingSettings = SamplingSettings(),
    progress: bool = True,
    sampler: AnswerSampler | None = None,
) -> dict[str, Any]:
    """The whole command: sample, judge, pair and write; returns the metadata written beside the output.

    It follows the passes' protocol (dama.offline.passes): an output that is already this run's, complete, is
    reported ("already_complete": True) and left alone; another run's output is refused unless options.overwrite;
    an interrupted run resumes from its partial results. `options.batch_size` counts rows (each decoded
    `sampling.samples` times in one batch). `sampler` replaces the model's sampled decoding (tests script the
    answers); the model folder still names the model.
    """
    check_model_pass_paths(options, options.model, ".parquet", "RLAIF-V format")
    input_path, model_dir = Path(options.input), Path(options.model)
    dtype = options.resolved_dtype
    judge_files = [Path(path).resolve() for path in (*options.annotations, *options.captions)]
    settings = {"model": str(model_dir.resolve()), "dtype": dtype, "samples": sampling.samples,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
                "max_new_tokens": sampling.max_new_tokens, "batch_size": options.batch_size,
                "annotations": [str(path) for path in judge_files[:len(options.annotations)]],
                "captions": [str(path) for path in judge_files[len(options.annotations):]],
                "select": list(options.select)}
    plan = plan_pass(options, settings, on_bad_row=options.on_bad_row)
    if plan.action == "complete":
        return completed_metadata(plan)
    every_row = list(iter_prompt_rows(input_path, options.image_folder, options.limit, select=options.select,
                                      cache_dir=options.cache_dir))
    # Every row is checked before the model loads: a bad image costs seconds, not a model load and half a run.
    report = check_prompt_rows(every_row, options.on_bad_row, SKIP_HINT)
    rows = [row for row in every_row if row.row_id not in report.row_ids]
    judge = ChairJudge(options.annotations, options.captions)
    keys = judge.image_keys(rows)
    if sampler is None:
        sampler = ResponseGenerator(*load_generation_model(model_dir, dtype, options.device), sampling.decoding())
    judge_name = "CHAIR: " + " + ".join(path.name for path in judge_files)
    origin_split = json.dumps({"model": model_dir.resolve().name, "judge": judge_name, "type": STEP})
    output = PairsOutput(input_path, options.limit, rows, keys, input_path.stem, origin_split)

    def score(partial: PartialResults) -> PassOutcome:
        outcome = sample_and_judge(rows, keys, sampler, judge, partial, sampling, options.batch_size, progress)
        outcome.skipped = report.skipped + outcome.skipped
        return outcome

    def pair_fields(outcome: PassOutcome) -> dict[str, Any]:
        return {**pair_statistics([outcome.results[row.row_id] for row in rows]),
                "checked_rows": report.total, "judge": judge_name, "origin_split": origin_split,
                "device": options.device}

    return run_pass(plan, step=STEP, settings=settings, score=score, output=output, metadata=pair_fields)


def summary_text(metadata: dict[str, Any], output: str) -> str:
    """The command's closing lines: rows, pairs kept, ties, and hallucinated objects of chosen vs rejected."""
    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    every_answer = number(metadata["hallucinated_per_answer"])
    return (f"judged {metadata['samples']} answers for each of {metadata['rows']} rows ({metadata['resumed']} from an "
            f"earlier run): kept {metadata['pairs']} pairs, {skipped_summary(metadata)}\n"
            f"hallucinated objects per answer: chosen {number(metadata['chosen_hallucinated_mean'])}, rejected "
            f"{number(metadata['rejected_hallucinated_mean'])} (all answers {every_answer}); object recall: "
            f"chosen {number(metadata['chosen_recall_mean'])}, rejected "
            f"{number(metadata['rejected_recall_mean'])}\nwrote {output} and {metadata_path(output)}")


DESCRIPTION = (
    "Build hallucination-targeted preference pairs from a model's own answers (RLAIF-V's recipe with a rule-based "
    "judge): sample K answers per {image, question} row, score each with the CHAIR judge of `dama eval-chair` against "
    "COCO-format annotations (fewest hallucinated objects wins, ties broken by object recall), pair the best against "
    "the worst and skip rows whose answers all tie. Writes RLAIF-V-format parquet that `dama hardness`, `dama "
    "precompute-ref` and `dama train` read, and OUTPUT.meta.json with the counts. Every row is checked before the "
    "model loads. An interrupted run resumes where it stopped when rerun with the same options; a finished one is "
    "reported complete; another run's output is refused unless --overwrite."
)


def parse_options(argv: list[str] | None = None) -> tuple[MakePairsOptions, SamplingSettings]:
    """`dama make-pairs`' options from an optional YAML (--config) and the command line (dama.option_loader)."""
    values = read_options("dama make-pairs", [MakePairsOptions, SamplingSettings], argv, DESCRIPTION)
    return build(MakePairsOptions, values), build(SamplingSettings, values)


def output_bytes(options: MakePairsOptions, sampling: SamplingSettings) -> int:
    """Disk space a run may need: the partial file, about 1 KiB and 8 bytes a new token per answer, twice (the answers
    again in the output), plus the input's own size for the image bytes the output copies (0 for a missing input,
    which the command's own check reports)."""
    input_path = Path(options.input)
    if not input_path.exists():
        return 0
    rows = sum(1 for _ in iter_prompt_rows(input_path, options.image_folder, options.limit, select=options.select,
                                           cache_dir=options.cache_dir))
    files = [input_path] if input_path.is_file() else parquet_files(input_path)
    return 2 * rows * sampling.samples * (1024 + 8 * sampling.max_new_tokens) + sum(f.stat().st_size for f in files)


def main(argv: list[str] | None = None) -> int:
    def action() -> str:
        options, sampling = parse_options(argv)
        with OutputGuard(STEP, options.output, needed=lambda: output_bytes(options, sampling)):
            metadata = make_pairs(options, sampling)
        if metadata.get("already_complete"):
            return already_complete_message(options.output, metadata)
        return summary_text(metadata, options.output)

    return run_command(STEP, action)


if __name__ == "__main__":
    sys.exit(main())

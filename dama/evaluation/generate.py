"""`dama generate`: what a trained LLaVA says about images, with the template it was trained on.

Each `{image, question}` row (`dama.evaluation.prompts`: a JSONL of image paths or base64 images and questions, or
the parquet / JSON training formats) is turned into the training prompt by `PairEncoder.encode_prompts`, the same
code that builds training's prompts ("<s>{system} USER: <image>\\n{question} ASSISTANT:", the image token expanded
to the vision tower's features), so generation follows the template wherever it changes. The image is processed
by the model's own CLIP processor, as in training.

Decoding is batched with a KV cache (transformers' `generate`), prompts left-padded so that every row continues
from its last prompt token: greedy by default, sampled (`--sample`, temperature, top-p) from a seed, or beam search
(`--num-beams`, `--preset object-halbench`: `dama.evaluation.beam_search`). A sampled batch draws from `seed` and its
position in the input, so a resumed run writes what an uninterrupted one would.
The model is loaded with transformers' SDPA attention: the packed attention of training is for training only.

Every row is checked before the model loads (an empty question, an image that is missing or does not decode): the
first bad one stops the run naming it, or with --on-bad-row skip each is left out and listed in the metadata.
`--select` keeps the rows of a preference input meeting its conditions.

Output: a JSONL file, one `{"id", "image_id", "question", "response"}` per row in input order, and the run's
settings in `<output>.meta.json`. It follows the passes' protocol (dama.offline.passes): finished batches are appended
to `<output>.partial.jsonl` (flushed and fsynced) and a rerun with the same model and decoding settings skips them;
the output appears only complete, then the partial file is removed; a finished run is reported complete and another
run's output is refused unless --overwrite.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from dama.command import check_device_argument, run_command
from dama.data.dataset import PairEncoder
from dama.data.formats import atomic_path, file_row_id, metadata_path
from dama.errors import DamaError
from dama.evaluation.beam_search import PRESETS, PresetOption, beam_options, check_beams
from dama.evaluation.prompts import JSONL_SUFFIX, PromptRow, check_prompt_rows, iter_prompt_rows
from dama.model.loading import load_llava
from dama.offline.passes import (
    PartialResults,
    PassOutcome,
    already_complete_message,
    completed_metadata,
    plan_pass,
    run_pass,
)
from dama.option_loader import build, read_options
from dama.options import LlavaOptions, PassOptions, RowOptions, check_at_least
from dama.output_guard import OutputGuard

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 512
# Sampled batches draw from seed * SEED_STRIDE + batch number: distinct streams for neighbouring seeds.
SEED_STRIDE = 1_000_003
SKIP_HINT = "Fix the row, or pass --on-bad-row skip to leave such rows out (they are listed in the metadata)."
_T = TypeVar("_T")


@dataclass(frozen=True)
class DecodingSettings:
    """How responses are decoded; temperature and top_p apply only when `sample` is set, num_beams > 1 is beam search
    (`dama.evaluation.beam_search`)."""

    max_new_tokens: int = field(
        default=DEFAULT_MAX_NEW_TOKENS,
        metadata={"help": "Most tokens per response; decoding stops earlier at the end token."})
    sample: bool = field(
        default=False, metadata={"help": "Sample instead of greedy decoding (with temperature, top_p and seed)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampled draws."})
    num_beams: int = field(
        default=1, metadata={"help": "Beam search with this many beams (1: greedy or sampled decoding)."})

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        check_beams(self.num_beams, self.sample)
        if self.max_new_tokens < 1:
            raise DamaError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise DamaError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DamaError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerateOptions(LlavaOptions, RowOptions, PassOptions):
    """What `dama generate` reads (which rows, and what to do with a bad one) and writes, and the model that
    answers."""

    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "Rows decoded together."})

    def __post_init__(self) -> None:
        self.check_pass_options()
        self.check_row_options()
        self.check_llava_options()
        check_at_least("batch_size", self.batch_size, 1)


class ResponseGenerator:
    """Batched decoding with a LLaVA model and its processor (model in eval mode, on its device and dtype)."""

    def __init__(self, model: Any, processor: Any, decoding: DecodingSettings):
        self.model, self.processor, self.decoding = model, processor, decoding
        self.encoder = PairEncoder(processor)
        self.tokenizer = processor.tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id

    def left_padded(self, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask, both (B, longest prompt) int64, prompts aligned to the right."""
        prompts = self.encoder.encode_prompts(questions)
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
        return input_ids, attention_mask

    @torch.no_grad()
    def __call__(self, questions: Sequence[str], images: Sequence[Image.Image], seed: int = 0) -> list[str]:
        """One response per (question, image), stripped of the end token and surrounding white space."""
        from transformers import GenerationConfig

        device = self.model.device
        input_ids, attention_mask = self.left_padded(questions)
        pixel_values = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        config = GenerationConfig(
            max_new_tokens=self.decoding.max_new_tokens, do_sample=self.decoding.sample,
            **beam_options(self.decoding.num_beams),
            temperature=self.decoding.temperature if self.decoding.sample else None,
            top_p=self.decoding.top_p if self.decoding.sample else None, top_k=None,
            pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                pixel_values=pixel_values.to(device, self.model.dtype), generation_config=config,
            )
        new_tokens = output[:, input_ids.shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def saved_weight_names(model_dir: Path) -> list[str]:
    """Tensor names of a save_pretrained folder's safetensors weights (headers only; [] when there are none)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    single = model_dir / "model.safetensors"
    if not single.is_file():
        return []
    with safe_open(single, framework="pt") as weights:
        return list(weights.keys())


def load_generation_model(model_dir: str | Path, dtype: str, device: str) -> tuple[Any, Any]:
    """A full LLaVA model (eval mode, SDPA attention, on `device`) and its processor from a local folder."""
    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").is_file() or any("lora_" in name for name in saved_weight_names(model_dir)):
        raise DamaError(
            f"{model_dir} holds LoRA adapters: dama generate reads full models only. Merge the adapters into the base "
            f"weights first: dama export {model_dir} --merge --output <new folder>"
        )
    model, processor = load_llava(model_dir, dtype)
    model.set_attn_implementation("sdpa")
    return model.to(device).eval().requires_grad_(False), processor


def _chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    chunk: list[_T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_model_pass_paths(options: PassOptions, model: str | Path, output_suffix: str, output_kind: str) -> None:
    """DamaError unless the device exists, the input and the model's config.json do, and the output is a new
    `output_suffix` file (`output_kind` says what it holds)."""
    check_device_argument(options.device)
    input_path, output_path, model_dir = Path(options.input), Path(options.output), Path(model)
    if not input_path.exists():
        raise DamaError(f"--input {input_path} does not exist")
    if not (model_dir / "config.json").is_file():
        raise DamaError(f"--model {model_dir} holds no config.json: give the local folder of a saved LLaVA")
    if output_path.suffix != output_suffix:
        raise DamaError(f"--output must be a {output_suffix} file ({output_kind}), got {output_path}")
    if output_path.resolve() == input_path.resolve():
        raise DamaError("--output must differ from --input")


def _record(row: PromptRow, response: str) -> dict[str, Any]:
    return {"row_id": row.row_id, "fingerprint": row.fingerprint, "id": row.id, "image_id": row.image_id,
            "question": row.question, "response": response}


@dataclass
class ResponsesOutput:
    """The JSONL `dama generate` writes: one {"id", "image_id", "question", "response"} per row, in input order
    (`row_ids`, filled while the rows are answered)."""

    input_path: Path
    limit: int | None
    row_ids: list[str] = field(default_factory=list)

    def write(self, output_path: Path, outcome: PassOutcome) -> dict[str, str]:
        with atomic_path(output_path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
            for row_id in self.row_ids:
                record = outcome.results[row_id]
                handle.write(json.dumps({key: record[key] for key in ("id", "image_id", "question", "response")},
                                        ensure_ascii=False) + "\n")
        return {row_id: file_row_id(output_path, number) for number, row_id in enumerate(self.row_ids)}

    def description(self) -> dict[str, Any]:
        return {"input": str(self.input_path), "format": JSONL_SUFFIX[1:], "limit": self.limit}


def generate_responses(
    options: GenerateOptions, decoding: DecodingSettings = DecodingSettings(), progress: bool = True
) -> dict[str, Any]:
    """The whole command: answer every row of the input, write the JSONL and `<output>.meta.json`; returns the latter.

    It follows the passes' protocol (dama.offline.passes): an output that is already this run's, complete, is
    reported ("already_complete": True) and left alone; another run's output is refused unless options.overwrite;
    an interrupted run resumes from its partial results. `options.dtype` None picks bfloat16 on CUDA and float32
    elsewhere. Images resolve under `options.image_folder`, by default the input's folder.
    """
    from tqdm.auto import tqdm

    check_model_pass_paths(options, options.model, JSONL_SUFFIX, "one JSON object per response")
    input_path, model_dir = Path(options.input), Path(options.model)
    dtype = options.resolved_dtype
    settings = {"model": str(model_dir.resolve()), "dtype": dtype, "max_new_tokens": decoding.max_new_tokens,
                "sample": decoding.sample, "select": list(options.select)}
    if decoding.sample:
        # The batches decide which draws each row gets, so a resumed sampled run must batch as the first did.
        settings.update(temperature=decoding.temperature, top_p=decoding.top_p, seed=decoding.seed,
                        batch_size=options.batch_size)
    if decoding.num_beams > 1:
        settings["num_beams"] = decoding.num_beams
    plan = plan_pass(options, settings, on_bad_row=options.on_bad_row)
    if plan.action == "complete":
        return completed_metadata(plan)

    def read_rows() -> Iterator[PromptRow]:
        return iter_prompt_rows(input_path, options.image_folder, options.limit, select=options.select,
                                cache_dir=options.cache_dir)

    # Every row is checked before the model loads: a bad image costs seconds, not a model load and half a run.
    report = check_prompt_rows(read_rows(), options.on_bad_row, SKIP_HINT)
    left_out = report.row_ids
    model, processor = load_generation_model(model_dir, dtype, options.device)
    generator = ResponseGenerator(model, processor, decoding)
    output = ResponsesOutput(input_path, options.limit)

    def score(partial: PartialResults) -> PassOutcome:
        outcome = PassOutcome(results={}, skipped=report.skipped, resumed=0)
        rows_in_order = (row for row in read_rows() if row.row_id not in left_out)
        with tqdm(total=report.kept, desc="generate", unit="row", disable=not progress) as bar:
            for number, rows in enumerate(_chunks(rows_in_order, options.batch_size)):
                output.row_ids.extend(row.row_id for row in rows)
                pending = outcome.resume_rows(rows, partial)
                if pending:
                    responses = generator([row.question for row in pending], [row.load_image() for row in pending],
                                          seed=decoding.seed * SEED_STRIDE + number)
                    records = [_record(row, text) for row, text in zip(pending, responses, strict=True)]
                    partial.append(records)
                    outcome.results.update((record["row_id"], record) for record in records)
                bar.update(len(rows))
        return outcome

    def generate_fields(outcome: PassOutcome) -> dict[str, Any]:
        return {"generated": outcome.computed, "rows": report.total, "device": options.device,
                "batch_size": options.batch_size}

    return run_pass(plan, step="generate", settings=settings, score=score, output=output, metadata=generate_fields)


DESCRIPTION = (
    "Answer {image, question} rows with a trained LLaVA, using the exact prompt template of training: batched "
    "decoding with a KV cache, greedy by default, sampled from a seed, or beam search. Writes a JSONL of "
    '{"id", "image_id", "question", "response"} in input order (score it with `dama eval-chair`) and the settings in '
    "OUTPUT.meta.json. Every row is checked before the model loads. An interrupted run resumes where it stopped "
    "when rerun with the same model and decoding options; a finished one is reported complete; another run's output "
    "is refused unless --overwrite."
)


def parse_options(argv: list[str] | None = None) -> tuple[GenerateOptions, DecodingSettings]:
    """`dama generate`'s options from an optional YAML (--config) and the command line (dama.option_loader)."""
    values = read_options("dama generate", [GenerateOptions, DecodingSettings, PresetOption], argv, DESCRIPTION)
    preset = values.pop("preset", None)
    if preset is not None:
        values = {**PRESETS[preset], **values}
    return build(GenerateOptions, values), build(DecodingSettings, values)


def _decoding_name(decoding: DecodingSettings) -> str:
    if decoding.num_beams > 1:
        return f"beam search ({decoding.num_beams} beams)"
    return "sampling" if decoding.sample else "greedy decoding"


def output_bytes(options: GenerateOptions, decoding: DecodingSettings) -> int:
    """Disk space a run may need: the partial file and the output, each about 1 KiB a row and 8 bytes a new token
    (0 for a missing input, which the command's own check reports)."""
    if not Path(options.input).exists():
        return 0
    rows = sum(1 for _ in iter_prompt_rows(options.input, options.image_folder, options.limit, select=options.select,
                                           cache_dir=options.cache_dir))
    return 2 * rows * (1024 + 8 * decoding.max_new_tokens)


def main(argv: list[str] | None = None) -> int:
    def action() -> str:
        options, decoding = parse_options(argv)
        with OutputGuard("generate", options.output, needed=lambda: output_bytes(options, decoding)):
            metadata = generate_responses(options, decoding)
        if metadata.get("already_complete"):
            return already_complete_message(options.output, metadata)
        return (f"answered {metadata['count']} rows ({metadata['resumed']} from an earlier run) with "
                f"{_decoding_name(decoding)}, {metadata['dtype']} on {metadata['device']}"
                f"\nwrote {options.output} and {metadata_path(options.output)}")

    return run_command("generate", action)


if __name__ == "__main__":
    sys.exit(main())

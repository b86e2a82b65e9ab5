"""`dama generate`: what a trained LLaVA says about images, with the template it was trained on.

Each `{image, question}` row (`dama.evaluation.prompts`: a JSONL of image paths or base64 images and questions, or
the parquet / JSON training formats) is turned into the training prompt by `PairEncoder.encode_prompts`, the same
code that builds training's prompts ("<s>{system} USER: <image>\\n{question} ASSISTANT:", the image token expanded
to the vision tower's features), so generation follows the template wherever it changes. The image is processed
by the model's own CLIP processor, as in training.

Decoding is batched with a KV cache (transformers' `generate`), prompts left-padded so that every row continues
from its last prompt token: greedy by default, or sampled (`--sample`, temperature, top-p) from a seed. A sampled
batch draws from `seed` and its position in the input, so a resumed run writes what an uninterrupted one would.
The model is loaded with transformers' SDPA attention: the packed attention of training is for training only.

Output: a JSONL file, one `{"id", "image_id", "question", "response"}` per row in input order, and the run's
settings in `<output>.meta.json`. Resumable and atomic like the offline passes: finished batches are appended to
`<output>.partial.jsonl` (flushed and fsynced); a rerun with the same model and decoding settings skips them; the
output appears only complete, then the partial file is removed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from dama.command import check_device_argument
from dama.data.dataset import PairEncoder
from dama.data.formats import atomic_path, write_metadata
from dama.evaluation.prompts import JSONL_SUFFIX, PromptRow, count_prompt_rows, iter_prompt_rows
from dama.exit_status import ResumableStop
from dama.model.loading import DTYPES, load_llava
from dama.offline.passes import PartialResults, partial_path
from dama.pass_output import PassOutput

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 512
# Sampled batches draw from seed * SEED_STRIDE + batch number: distinct streams for neighbouring seeds.
SEED_STRIDE = 1_000_003
_T = TypeVar("_T")


@dataclass(frozen=True)
class DecodingSettings:
    """How responses are decoded; temperature and top_p apply only when `sample` is set."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


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
            max_new_tokens=self.decoding.max_new_tokens, do_sample=self.decoding.sample, num_beams=1,
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
        raise ValueError(
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


def _check_arguments(input_path: Path, output_path: Path, model_dir: Path, batch_size: int, device: str,
                     dtype: str | None, limit: int | None, decoding: DecodingSettings) -> None:
    decoding.check()
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
    if output_path.suffix != JSONL_SUFFIX:
        raise ValueError(f"--output must be a {JSONL_SUFFIX} file (one JSON object per response), got {output_path}")
    if output_path.resolve() == input_path.resolve():
        raise ValueError("--output must differ from --input")


def _record(row: PromptRow, response: str) -> dict[str, Any]:
    return {"row_id": row.row_id, "fingerprint": row.fingerprint, "id": row.id, "image_id": row.image_id,
            "question": row.question, "response": response}


def generate_responses(
    input_path: str | Path,
    output_path: str | Path,
    model_dir: str | Path,
    *,
    image_folder: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    decoding: DecodingSettings = DecodingSettings(),
    device: str = "cpu",
    dtype: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole command: answer every row of the input, write the JSONL and `<output>.meta.json`; returns the latter.

    `dtype` None picks bfloat16 on CUDA and float32 elsewhere. Images resolve under `image_folder`, by default the
    input's folder.
    """
    from tqdm.auto import tqdm

    input_path, output_path, model_dir = Path(input_path), Path(output_path), Path(model_dir)
    _check_arguments(input_path, output_path, model_dir, batch_size, device, dtype, limit, decoding)
    dtype = dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    total = count_prompt_rows(input_path, limit)
    model, processor = load_generation_model(model_dir, dtype, device)
    generator = ResponseGenerator(model, processor, decoding)
    settings = {"model": str(model_dir.resolve()), "dtype": dtype, "max_new_tokens": decoding.max_new_tokens,
                "sample": decoding.sample}
    if decoding.sample:
        # The batches decide which draws each row gets, so a resumed sampled run must batch as the first did.
        settings.update(temperature=decoding.temperature, top_p=decoding.top_p, seed=decoding.seed,
                        batch_size=batch_size)
    order, computed = [], 0
    with PartialResults(partial_path(output_path), settings) as partial:
        with tqdm(total=total, desc="generate", unit="row", disable=not progress) as bar:
            for number, rows in enumerate(_chunks(iter_prompt_rows(input_path, image_folder, limit), batch_size)):
                order += [row.row_id for row in rows]
                pending = [row for row in rows
                           if partial.finished(row.row_id, row.fingerprint, f"row {row.row_id}") is None]
                if pending:
                    responses = generator([row.question for row in pending], [row.load_image() for row in pending],
                                          seed=decoding.seed * SEED_STRIDE + number)
                    partial.append([_record(row, text) for row, text in zip(pending, responses, strict=True)])
                    computed += len(pending)
                bar.update(len(rows))
        with atomic_path(output_path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
            for row_id in order:
                record = partial.done[row_id]
                handle.write(json.dumps({key: record[key] for key in ("id", "image_id", "question", "response")},
                                        ensure_ascii=False) + "\n")
        metadata = {**settings, "input": str(input_path), "output": output_path.name, "count": len(order),
                    "generated": computed, "resumed": len(order) - computed, "device": device,
                    "batch_size": batch_size, "limit": limit,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_metadata(output_path, metadata)
    partial.remove()
    return metadata


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dama generate",
        description="Answer {image, question} rows with a trained LLaVA, using the exact prompt template of training: "
        "batched decoding with a KV cache, greedy by default or sampled from a seed. Writes a JSONL of "
        '{"id", "image_id", "question", "response"} in input order (score it with `dama eval-chair`) and the '
        "settings in OUTPUT.meta.json. An interrupted run resumes where it stopped when rerun with the same model "
        "and decoding options.",
    )
    parser.add_argument("--model", required=True,
                        help="local folder of a saved LLaVA and its processor: the output_dir of `dama train`, a "
                        "checkpoint-N folder, or the starting model")
    parser.add_argument("--input", required=True,
                        help="a .jsonl of {image (path or base64), question[, id, image_id]} per line (e.g. Object "
                        "HalBench's prompt file), or a dataset training reads (RLAIF-V .parquet file or folder, "
                        "authors' .json)")
    parser.add_argument("--output", required=True, help="the .jsonl file to write")
    parser.add_argument("--image-folder", default=None,
                        help="folder that relative image paths are resolved against (default: the input's folder)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="rows decoded together (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="most tokens per response; decoding stops earlier at the end token (default: %(default)s)")
    parser.add_argument("--sample", action="store_true",
                        help="sample instead of greedy decoding (with --temperature, --top-p and --seed)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled draws (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--limit", type=int, default=None, help="answer only the first N rows (for a trial run)")
    return parser


def output_bytes(input_path: Path, limit: int | None, max_new_tokens: int) -> int:
    """Disk space a run may need: the partial file and the output, each about 1 KiB a row and 8 bytes a new token
    (0 for a missing input, which the command's own check reports)."""
    return 2 * count_prompt_rows(input_path, limit) * (1024 + 8 * max_new_tokens) if input_path.exists() else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    decoding = DecodingSettings(max_new_tokens=args.max_new_tokens, sample=args.sample,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    output = PassOutput("generate", args.output,
                        needed=lambda: output_bytes(Path(args.input), args.limit, args.max_new_tokens))
    generate = output.around(generate_responses)
    try:
        metadata = generate(args.input, args.output, args.model, image_folder=args.image_folder,
                                      batch_size=args.batch_size, decoding=decoding, device=args.device,
                                      dtype=args.dtype, limit=args.limit)
    except ResumableStop as stop:
        print(f"dama generate: {stop.label}: {stop}", file=sys.stderr)
        return stop.exit_status
    except (ValueError, OSError) as error:
        print(f"dama generate: error: {error}", file=sys.stderr)
        return 1
    print(f"answered {metadata['count']} rows ({metadata['resumed']} from an earlier run) with "
          f"{'sampling' if decoding.sample else 'greedy decoding'}, {metadata['dtype']} on {metadata['device']}\n"
          f"wrote {args.output} and {args.output}.meta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

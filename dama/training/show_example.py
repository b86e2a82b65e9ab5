"""`dama show-example`: one preference pair exactly as the model will see it, before any training is spent on it.

It reads the pair with the training code (template, tokenization, image tokens, labels; dama.data.dataset) and shows
the prompt and both responses decoded, the supervised span of each marked with ⟦ ⟧, the token counts, the image
tokens, and the ids around the image and at the prompt/response boundary, where template mistakes hide. `--json`
prints the ids themselves: {"row_id", "prompt_ids", "chosen": {"input_ids", "labels"}, "rejected": {"input_ids",
"labels"}, "num_image_tokens"}, labels -100 where nothing is supervised. `dama train` prints the first pair this way
when it starts. Only the processor is loaded, not the weights.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from dama.command import run_command
from dama.data.batch import IGNORE_INDEX
from dama.data.dataset import PreferenceDataset, dataset_options
from dama.errors import DamaError
from dama.model.loading import load_processor
from dama.option_loader import build, read_options
from dama.options import check_at_least
from dama.training.arguments import DamaTrainingArguments, training_arguments

# Ids shown at each end of a run of text tokens; the middle is elided.
SHOWN_IDS = 6
SIDES = ("chosen", "rejected")


def example_record(dataset: PreferenceDataset, index: int) -> dict[str, Any]:
    """The ids of pair `index` as training feeds them to the model (the module docstring's --json layout)."""
    sequences = dataset.sequences(index)
    chosen_ids, chosen_labels = sequences[0]
    prompt_length = int((chosen_labels == IGNORE_INDEX).sum())
    prompt = chosen_ids[:prompt_length]
    record: dict[str, Any] = {"row_id": dataset.row_id(index), "prompt_ids": prompt.tolist()}
    for side, (input_ids, labels) in zip(SIDES, sequences, strict=True):
        record[side] = {"input_ids": input_ids.tolist(), "labels": labels.tolist()}
    record["num_image_tokens"] = int((prompt == dataset.encoder.image_token_id).sum())
    return record


def _ids_line(ids: list[int], image_id: int) -> str:
    """The ids with each run of image tokens written once with its length and long text runs elided."""
    parts, start = [], 0
    while start < len(ids):
        end = start
        image = ids[start] == image_id
        while end < len(ids) and (ids[end] == image_id) == image:
            end += 1
        run = ids[start:end]
        if image:
            parts.append(f"[{image_id} x {len(run)}]")
        elif len(run) > 2 * SHOWN_IDS:
            parts.append(" ".join(map(str, run[:SHOWN_IDS])) + " ... " + " ".join(map(str, run[-SHOWN_IDS:])))
        else:
            parts.append(" ".join(map(str, run)))
        start = end
    return " ".join(parts)


def format_example(dataset: PreferenceDataset, index: int) -> str:
    """A readable view of pair `index`: decoded prompt and responses (supervised span in ⟦ ⟧), counts and ids."""
    record = example_record(dataset, index)
    tokenizer, image_id = dataset.encoder.tokenizer, dataset.encoder.image_token_id
    prompt = record["prompt_ids"]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    slots = [i for i, token in enumerate(prompt) if token == image_id]
    before, after = (prompt[:slots[0]], prompt[slots[-1] + 1:]) if slots else (prompt, [])
    image = f"<image x {len(slots)}>" if slots else ""
    lines = [
        f"example {record['row_id']} as the model sees it (⟦ ⟧: supervised tokens, the only ones scored)",
        f"prompt: {len(prompt)} tokens, {record['num_image_tokens']} of them image tokens (id {image_id})",
        f"  ids:  {_ids_line(prompt, image_id)}",
        "  text: " + (decode(before) + image + decode(after)).replace("\n", "\n        "),
    ]
    for side in SIDES:
        input_ids, labels = record[side]["input_ids"], record[side]["labels"]
        response = [token for token, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX]
        # Decoded together with the text before it, so the response's leading space shows as it is tokenized.
        context = decode(after)
        whole = decode(after + response)
        text = f"{context}⟦{whole[len(context):]}⟧" if whole.startswith(context) else f"⟦{decode(response)}⟧"
        lines += [
            f"{side}: {len(response)} supervised tokens, {len(input_ids)} in the sequence",
            f"  ids:  ... {_ids_line(after[-3:], image_id)} | {_ids_line(response, image_id)}",
            "  text: ..." + text[max(0, len(context) - 40):].replace("\n", "\n        "),
        ]
    return "\n".join(lines)


@dataclass
class ExampleOptions:
    """What `dama show-example` shows; the model, data and encoding are training's fields (a config, or flags)."""

    model: str | None = field(
        default=None, metadata={"help": "Local folder of the LLaVA (its processor is read); wins over the config's "
                                "model_name_or_path."})
    input: str | None = field(
        default=None, metadata={"help": "RLAIF-V .parquet file or folder of shards, or a .json list; wins over the "
                                "config's train_file."})
    index: int = field(default=0, metadata={"help": "Which pair, counted from 0."})
    json: bool = field(default=False, metadata={"help": "Print the ids as JSON instead of the readable view."})

    def __post_init__(self) -> None:
        check_at_least("index", self.index, 0)


DESCRIPTION = (
    "Show one preference pair exactly as training will see it: the decoded prompt and responses with the supervised "
    "tokens marked, token and image-token counts, and the ids at the image and at the prompt/response boundary. "
    "Reads a training config (its model_name_or_path, train_file, image_folder, max_length, overlong, "
    "image_aspect_ratio, system_prompt) or --model and --input; any training field can be given as a flag, and "
    "flags win over the config. Loads only the processor, not the weights."
)


def parse_options(argv: list[str] | None = None) -> tuple[ExampleOptions, DamaTrainingArguments]:
    """The command's own options and the training config they read the pair with."""
    values = read_options("dama show-example", [ExampleOptions, DamaTrainingArguments], argv, DESCRIPTION)
    return build(ExampleOptions, values), training_arguments(values, check_devices=False)


def load_example_dataset(options: ExampleOptions, config: DamaTrainingArguments) -> PreferenceDataset:
    """The pairs up to options.index, read as training reads them with the config's encoding."""
    model = options.model or config.model_name_or_path
    data = options.input or config.train_file
    if not model or not data:
        raise DamaError("give --config with model_name_or_path and train_file, or --model and --input")
    dataset = PreferenceDataset.from_path(
        data, load_processor(model), image_folder=config.image_folder, limit=options.index + 1,
        **dataset_options(config.encoding),
    )
    if options.index >= len(dataset):
        raise DamaError(f"{data} has no pair {options.index}: {len(dataset)} pairs read up to it "
                        f"({dataset.num_skipped} over-long pairs skipped)")
    return dataset


def main(argv: list[str] | None = None) -> int:
    def action() -> str:
        options, config = parse_options(argv)
        dataset = load_example_dataset(options, config)
        if options.json:
            return json.dumps(example_record(dataset, options.index))
        return format_example(dataset, options.index)

    return run_command("show-example", action)


if __name__ == "__main__":
    sys.exit(main())

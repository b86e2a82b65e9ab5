"""`dama show-example`: one preference pair exactly as the model will see it, before any training is spent on it.

It reads the pair with the training code (template, tokenization, image tokens, labels; dama.data.dataset) and shows
the prompt and both responses decoded, the supervised span of each marked with ⟦ ⟧, the token counts, the image
tokens, and the ids around the image and at the prompt/response boundary, where template mistakes hide. `--json`
prints the ids themselves: {"row_id", "prompt_ids", "chosen": {"input_ids", "labels"}, "rejected": {"input_ids",
"labels"}, "num_image_tokens"}, labels -100 where nothing is supervised. `dama train` prints the first pair this way
when it starts. Only the processor is loaded, not the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dama.command import run_command
from dama.data.batch import IGNORE_INDEX
from dama.data.dataset import VICUNA_V1_SYSTEM, ConversationTemplate, PreferenceDataset
from dama.model.loading import load_processor
from dama.training.arguments import read_config

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dama show-example",
        description="Show one preference pair exactly as training will see it: the decoded prompt and responses "
        "with the supervised tokens marked, token and image-token counts, and the ids at the image and at the "
        "prompt/response boundary. Reads a training config (its model_name_or_path, train_file, image_folder, "
        "max_length, overlong, image_aspect_ratio, system_prompt) or --model and --input; flags win over the "
        "config. Loads only the processor, not the weights.",
    )
    parser.add_argument("--config", default=None, help="training YAML to take the model, data and template from")
    parser.add_argument("--model", default=None, help="local folder of the LLaVA (its processor is read)")
    parser.add_argument("--input", default=None, help="RLAIF-V .parquet file or folder of shards, or a .json list")
    parser.add_argument("--image-folder", default=None, help="folder that relative image paths are resolved under")
    parser.add_argument("--system-prompt", default=None, help="system text of the conversation template "
                        "(default: the config's system_prompt, else LLaVA-1.5's vicuna v1 wording)")
    parser.add_argument("--max-length", type=int, default=None, help="training max_length (default: the "
                        "config's, else 2048)")
    parser.add_argument("--index", type=int, default=0, help="which pair, counted from 0 (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the ids as JSON instead of the readable view")
    return parser


def load_example_dataset(args: argparse.Namespace) -> PreferenceDataset:
    """The pairs up to --index, read as training reads them with the config's and the flags' settings."""
    values = read_config(args.config) if args.config else {}
    model = args.model or values.get("model_name_or_path")
    data = args.input or values.get("train_file")
    if not model or not data:
        raise ValueError("give --config with model_name_or_path and train_file, or --model and --input")
    if args.index < 0:
        raise ValueError(f"--index must be >= 0, got {args.index}")
    system = args.system_prompt if args.system_prompt is not None else values.get("system_prompt", VICUNA_V1_SYSTEM)
    dataset = PreferenceDataset.from_path(
        data, load_processor(model), image_folder=args.image_folder or values.get("image_folder"),
        limit=args.index + 1, max_length=args.max_length or values.get("max_length", 2048),
        overlong=values.get("overlong", "error"), image_aspect_ratio=values.get("image_aspect_ratio", "crop"),
        template=ConversationTemplate(system=system),
    )
    if args.index >= len(dataset):
        raise ValueError(f"{data} has no pair {args.index}: {len(dataset)} pairs read up to it "
                         f"({dataset.num_skipped} over-long pairs skipped)")
    return dataset


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action() -> str:
        dataset = load_example_dataset(args)
        if args.json:
            return json.dumps(example_record(dataset, args.index))
        return format_example(dataset, args.index)

    return run_command("show-example", action)


if __name__ == "__main__":
    sys.exit(main())

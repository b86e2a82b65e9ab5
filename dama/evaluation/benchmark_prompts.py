"""`dama benchmark-prompts`: POPE's and AMBER's question files as `dama generate` input (JSON lines of
`{"id", "image", "image_id", "question"}`), so that each answer carries the id its scorer matches it by.

- POPE (`coco_pope_*.json`, or LLaVA's `llava_pope_test.jsonl`): id "<file stem>/<question_id>" (POPE's ids restart
  at 1 in every split file), question = `text`.
- AMBER (`query_all.json`, `query_generative.json`, `query_discriminative*.json`: a JSON list of `{"id", "image",
  "query"}`): id = AMBER's id, question = `query`.

Yes/no questions (all of POPE's; AMBER's discriminative ones, ids from 1005 on as its README numbers them) get
LLaVA-1.5's short-answer instruction on a new line, as LLaVA's own POPE file has it, unless they end with it already
or `--no-short-answer` is given. Images stay file names, resolved by `dama generate --image-folder`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dama.command import run_command
from dama.data.formats import atomic_path, read_json_file
from dama.errors import DamaError
from dama.evaluation.pope import read_json_lines

SHORT_ANSWER = "Answer the question using a single word or phrase."
FIRST_DISCRIMINATIVE_AMBER_ID = 1005


def _question(text: str, short_answer: bool) -> str:
    text = text.rstrip()
    return f"{text}\n{SHORT_ANSWER}" if short_answer and not text.endswith(SHORT_ANSWER) else text


def pope_prompts(paths: Sequence[str | Path], short_answer: bool = True) -> Iterator[dict[str, Any]]:
    """One prompt per question of POPE question files, in file order."""
    for path in map(Path, paths):
        for row in read_json_lines(path):
            yield {"id": f"{path.stem}/{row['question_id']}", "image": str(row["image"]),
                   "image_id": str(row["image"]), "question": _question(str(row["text"]), short_answer)}


def amber_prompts(paths: Sequence[str | Path], short_answer: bool = True) -> Iterator[dict[str, Any]]:
    """One prompt per query of AMBER query files, in file order."""
    for path in map(Path, paths):
        queries = read_json_file(path, "query file")
        if not isinstance(queries, list) or not all(isinstance(query, dict) and {"id", "image", "query"} <= set(query)
                                                    for query in queries):
            raise DamaError(f"{path} is not an AMBER query file: expected a JSON list of {{id, image, query}}")
        for query in queries:
            yes_no = int(query["id"]) >= FIRST_DISCRIMINATIVE_AMBER_ID
            yield {"id": int(query["id"]), "image": str(query["image"]), "image_id": str(query["image"]),
                   "question": _question(str(query["query"]), short_answer and yes_no)}


def write_prompts(prompts: Iterator[dict[str, Any]], output: str | Path) -> int:
    """Writes the prompts as JSON lines, atomically; returns how many."""
    count = 0
    with atomic_path(output) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        for prompt in prompts:
            handle.write(json.dumps(prompt, ensure_ascii=False) + "\n")
            count += 1
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dama benchmark-prompts",
        description="Turn POPE's or AMBER's question files into the JSONL that `dama generate` answers; the answers "
        "then go to `dama eval-pope` or `dama eval-amber`.",
    )
    parser.add_argument("benchmark", choices=("pope", "amber"))
    parser.add_argument("files", nargs="+", help="POPE: coco_pope_{random,popular,adversarial}.json (or LLaVA's "
                        "llava_pope_test.jsonl); AMBER: query_all.json or its query_*.json parts")
    parser.add_argument("--output", required=True, help="the .jsonl file to write (the --input of `dama generate`)")
    parser.add_argument("--no-short-answer", action="store_true",
                        help=f"keep yes/no questions as shipped instead of adding {SHORT_ANSWER!r}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    make = pope_prompts if args.benchmark == "pope" else amber_prompts

    def action() -> str:
        count = write_prompts(make(args.files, short_answer=not args.no_short_answer), args.output)
        return f"wrote {count} prompts to {args.output}"

    return run_command("benchmark-prompts", action)


if __name__ == "__main__":
    sys.exit(main())

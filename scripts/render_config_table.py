"""Rewrites the config-field table in README.md from the fields' help texts (dama.arguments.fields_markdown)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dama.training.arguments import fields_markdown  # noqa: E402

START, END = "<!-- config-fields:start -->", "<!-- config-fields:end -->"


def main() -> int:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{fields_markdown()}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One way every command reads its options: a YAML file, then the command line over it, then the groups built.

    dama <command> [--config file.yaml] [--key value | --key=value ...]

1. The command line is parsed by an HfArgumentParser over the command's option groups (dataclasses): each field is
   `--field_name` or `--field-name`, with `--key value` or `--key=value`; an unknown option is an error.
2. `--config` (either form) names a YAML mapping of field: value; its keys may use dashes or underscores and must
   be fields of the command's groups. Its values are typed by the same parser, so a YAML value means what the same
   text means on the command line.
3. The command line's values replace the YAML's; every group is built from the merged values and checks itself.

Only the options actually given (in the YAML or on the command line) are passed on; the rest keep their dataclass
defaults. `--help` lists every field with its help text and default.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dama.errors import DamaError

_G = TypeVar("_G")
_ABSENT = object()
CONFIG_HELP = "YAML file of field: value pairs; command-line options win over it."
HELP_WIDTH = 100
# The options section lists every option; `dama train` has hundreds, too many for a usage line.
USAGE = "%(prog)s [--config FILE.yaml] [--key value | --key=value ...]"


def field_names(groups: Sequence[type]) -> set[str]:
    """The option names of the groups: their fields that the constructor takes."""
    return {f.name for group in groups for f in fields(group) if f.init}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help, unless the help says it; the description's paragraphs as `_described`
    wrapped them."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _described(description: str | None) -> str | None:
    """The description with each plain paragraph wrapped; indented ones (command lines) are kept as written."""
    if description is None:
        return None
    paragraphs = description.strip().split("\n\n")
    return "\n\n".join(part if part.startswith(" ") else textwrap.fill(" ".join(part.split()), HELP_WIDTH)
                       for part in paragraphs)


def _parser(prog: str, groups: Sequence[type], description: str | None, epilog: str | None) -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    # No abbreviations: `--model` must not silently mean `--model_name_or_path` of a longer option list.
    parser = HfArgumentParser(list(groups), prog=prog, usage=USAGE, description=_described(description),
                              epilog=epilog, allow_abbrev=False, formatter_class=_HelpFormatter)
    # One line and exit status 2, not the usage of every field.
    parser.error = lambda message: parser.exit(2, f"{prog}: error: {message} (`{prog} --help` lists every option)\n")
    parser.add_argument("--config", default=None, help=CONFIG_HELP)
    return parser


def read_config(path: str | Path, known: set[str]) -> dict[str, Any]:
    """The field: value mapping of a YAML file, dashes in keys read as underscores; DamaError for a missing file,
    invalid YAML, another shape or a key that is not in `known`."""
    config_path = Path(path)
    if not config_path.is_file():
        raise DamaError(f"--config {config_path}: no such file")
    try:
        values = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise DamaError(f"{config_path} is not valid YAML ({where}{problem})") from error
    if not isinstance(values, dict):
        raise DamaError(f"{config_path}: expected a mapping of field: value")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DamaError(f"{config_path}: unknown keys {unknown}; --help lists every option")
    return values


def _as_argv(values: dict[str, Any]) -> list[str]:
    """The command-line tokens that mean `values` (None values are left out: the field keeps its default)."""
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            argv += [f"--{key}", *map(str, value)] if value else []
        elif isinstance(value, dict):
            argv.append(f"--{key}={json.dumps(value)}")
        else:
            # One token: argparse would read a value such as -1e-05 as an option of its own.
            argv.append(f"--{key}={value}")
    return argv


def read_options(
    prog: str,
    groups: Sequence[type],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    epilog: str | None = None,
) -> dict[str, Any]:
    """The merged option values of a command (module docstring): the YAML's, then the command line's over them.

    Only the fields given somewhere are in the result. `--help` prints the help and exits; a malformed command line
    exits with status 2 after one error line (argparse's way); DamaError for a bad config file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(prog, groups, description, epilog)
    if "-h" in argv or "--help" in argv:
        parser.parse_args(["--help"])
    known = field_names(groups)
    given = _given(parser, groups, argv)
    config = given.pop("config")
    if config is None:
        return given
    from_file = _given(parser, groups, _as_argv(read_config(config, known)))
    from_file.pop("config")
    return {**from_file, **given}


def _given(parser: argparse.ArgumentParser, groups: Sequence[type], argv: list[str]) -> dict[str, Any]:
    """The options `argv` gives, typed; the others are absent (not defaulted), so that a default on the command
    line cannot hide the YAML's value."""
    # argparse leaves an attribute the namespace already holds alone when its option is absent; an appending option
    # must start from None (argparse then starts a list).
    start = {f.name: None if f.metadata.get("action") == "append" else _ABSENT
             for group in groups for f in fields(group) if f.init}
    parsed = vars(parser.parse_args(argv, namespace=argparse.Namespace(**start)))
    return {name: value for name, value in parsed.items() if not (name in start and value is start[name])}


def build(group: type[_G], values: dict[str, Any]) -> _G:
    """An instance of the dataclass `group` from those of `values` that are its fields (it checks itself)."""
    names = field_names([group])
    return group(**{name: value for name, value in values.items() if name in names})

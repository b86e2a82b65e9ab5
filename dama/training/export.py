"""`dama export --merge`: a LoRA run's adapters folded into its base checkpoint, written as a plain LLaVA folder.

The folder loads with `LlavaForConditionalGeneration.from_pretrained` and `LlavaProcessor.from_pretrained` alone (no
peft), like the checkpoint the run started from.
"""

from __future__ import annotations

import argparse

from dama.command import run_command
from dama.errors import DamaError
from dama.model.lora import merge_adapters
from dama.options import DTYPE_NAMES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dama export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", help="output folder (or checkpoint-N folder) of a `dama train` run with "
                        "lora_rank > 0: it holds adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--output", required=True, help="folder to write the merged LLaVA to (replaced if present)")
    parser.add_argument("--merge", action="store_true",
                        help="fold the adapters into the base weights (W + scale * B A); the one export there is, "
                        "so it must be given")
    parser.add_argument("--base", default=None,
                        help="base checkpoint folder; default: the one named in adapter_config.json (the run's "
                        "model_name_or_path)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES),
                        help="dtype of the written weights; auto = the base checkpoint's (default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def export() -> str:
        if not args.merge:
            raise DamaError("nothing to do: pass --merge to fold the adapters into the base weights")
        output = merge_adapters(args.adapters, args.output, base_model_path=args.base, dtype=args.dtype)
        return f"merged LLaVA written to {output}"

    return run_command("export", export)

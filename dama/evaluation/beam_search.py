"""Beam search for `dama generate`, and the decoding presets of the published benchmarks.

Beam search keeps the `num_beams` most probable continuations (sum of token log-probabilities) of every prompt and
returns the best finished one, its score divided by its length (length penalty 1). It runs inside transformers'
`generate`, batched and with the KV cache (every beam of every prompt is one row of the cache), which is also what
the published Object HalBench answers were decoded with: RLAIF-V's `muffin/eval/muffin_vqa.py`, run by
`script/eval/eval_rlaifv_objhal.sh` with `--num_beam 3 --temperature 0`, calls LLaVA's `model.generate` with
`num_beams=3`, greedy (`do_sample=False`) and `max_new_tokens=1024`. A search stops, as there, once `num_beams`
hypotheses have finished and the best running beam, scored at its current length, no longer beats the worst of them
(`early_stopping=False`), or at `max_new_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dama.errors import DamaError

# Option values of `dama generate --preset NAME`; options given on the command line win.
PRESETS: dict[str, dict[str, Any]] = {
    "object-halbench": {"num_beams": 3, "max_new_tokens": 1024, "sample": False},
}


@dataclass(frozen=True)
class PresetOption:
    """`--preset NAME`: a published benchmark's decoding settings, under the options given explicitly."""

    preset: Literal["object-halbench"] | None = field(
        default=None, metadata={"help": "A published benchmark's decoding; object-halbench = --num-beams 3 "
                                "--max-new-tokens 1024, no sampling (options given explicitly win)."})


def check_beams(num_beams: int, sample: bool) -> None:
    """DamaError unless `num_beams` is a usable beam count for the decoding mode."""
    if num_beams < 1:
        raise DamaError(f"--num-beams must be at least 1, got {num_beams}")
    if num_beams > 1 and sample:
        raise DamaError("--num-beams above 1 is beam search, which is deterministic: drop --sample (the published "
                         "Object HalBench setting is --preset object-halbench: 3 beams, no sampling)")


def beam_options(num_beams: int) -> dict[str, Any]:
    """The `GenerationConfig` fields of a search with `num_beams` beams (1: plain greedy or sampled decoding)."""
    if num_beams == 1:
        return {"num_beams": 1}
    return {"num_beams": num_beams, "num_return_sequences": 1, "length_penalty": 1.0, "early_stopping": False}

"""The numbers a preference row carries besides its texts: reference log-probs and data hardness (docs/method.md 9).

Reference log-probs, per response, from the first of these that is present:
- the project's columns `ref_chosen_logps`, `ref_rejected_logps` (sums), optional `ref_chosen_mean_logps`,
  `ref_rejected_mean_logps`, `ref_chosen_token_logps`, `ref_rejected_token_logps` (one value per supervised token);
- `logps`, six slots [chosen_sum, chosen_mean, chosen_per_token, rejected_sum, rejected_mean, rejected_per_token]:
  a list, its JSON text, or `{"logps": [...]}` (RLAIF-V writes the JSON text of that object), every form the
  authors' reader accepts.

A per-token list comes in one of two layouts, told apart by its length:
- one value per supervised token (what `dama precompute-ref` writes);
- one value per position of the whole image-expanded sequence but the last (what RLAIF-V's and the authors' code
  write: value t scores token t + 1, and the values outside the response are filler). Such a list fits this
  tokenization only if its length is the sequence length minus one and the values at the response's positions add
  up to the stored sum; then the stored sum and mean are used. They were made with LLaVA-1.5's own conversation
  template, so another template refuses them.
Any other per-token length, or `logps` without per-token lists (which nothing can check), is an error that says to
run `dama precompute-ref`: reference log-probs of another tokenization would make z != 0 at step 0.

Hardness δ: the `hardness` column (written by `dama hardness`); without it, sum(`chosen_logits`) −
sum(`rejected_logits`) as the authors' reader computes it (each a list or its JSON text). NaN when neither is there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dama.errors import DamaError

from .formats import REF_LOGPS_COLUMNS, REF_MEAN_COLUMNS, REF_TOKEN_COLUMNS

# Positions of (sum, mean, per-token) of the chosen and the rejected response in the `logps` list.
AUTHORS_LOGPS_SLOTS = ((0, 1, 2), (3, 4, 5))
SIDES = ("chosen", "rejected")
RECOMPUTE = "Run `dama precompute-ref` on the data with this model and template to compute reference log-probs."


@dataclass(frozen=True)
class ResponseReference:
    """The reference log-prob sum and mean of one response; NaN when the row has none."""

    logps: float = math.nan
    mean_logps: float = math.nan


def _float_or_nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def _json_list(value: Any) -> list | None:
    return json.loads(value) if isinstance(value, str) else value


def authors_logps(value: Any, row_id: str) -> list | None:
    """The six `logps` slots from a list, its JSON text or `{"logps": [...]}`; None when the cell is empty."""
    value = _json_list(value)
    if isinstance(value, Mapping):
        if "logps" not in value:
            raise DamaError(f"row {row_id}: `logps` is an object without a 'logps' key: {sorted(value)[:5]}")
        value = value["logps"]
    if value is None:
        return None
    if not isinstance(value, Sequence) or len(value) != 6:
        raise DamaError(
            f"row {row_id}: `logps` must be [chosen_sum, chosen_mean, chosen_per_token, rejected_sum, rejected_mean, "
            f"rejected_per_token] (a list, its JSON text or {{\"logps\": [...]}}), got "
            f"{len(value) if isinstance(value, Sequence) else type(value).__name__} entries"
        )
    return list(value)


def stored_reference(row: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """The reference sums and means of the chosen and the rejected response as the row stores them (NaN where absent),
    read as `reference_values` reads them but before any tokenization: what the row check looks at."""
    logps = authors_logps(row.get("logps"), row["row_id"])
    sums, means = [math.nan, math.nan], [math.nan, math.nan]
    for side in range(len(SIDES)):
        if row.get(REF_LOGPS_COLUMNS[side]) is not None:
            sums[side] = float(row[REF_LOGPS_COLUMNS[side]])
            means[side] = _float_or_nan(row.get(REF_MEAN_COLUMNS[side]))
        elif logps is not None and logps[AUTHORS_LOGPS_SLOTS[side][0]] is not None:
            total_slot, mean_slot, _ = AUTHORS_LOGPS_SLOTS[side]
            sums[side], means[side] = float(logps[total_slot]), _float_or_nan(logps[mean_slot])
    return sums, means


def reference_values(
    row: Mapping[str, Any], prompt_length: int, response_lengths: Sequence[int], authors_template: bool
) -> tuple[ResponseReference, ResponseReference]:
    """The reference sum and mean of the chosen and the rejected response of one row (module docstring's rules).

    `prompt_length`: tokens of the prompt, image tokens included; `response_lengths`: supervised tokens of each
    response (its tokens and "</s>"); `authors_template`: whether the dataset uses LLaVA-1.5's own conversation
    template, the only one whole-sequence lists can fit. A missing mean is the sum over the supervised tokens.
    """
    row_id = row["row_id"]
    logps = authors_logps(row.get("logps"), row_id)
    references = []
    for side, name in enumerate(SIDES):
        count = response_lengths[side]
        if row.get(REF_LOGPS_COLUMNS[side]) is not None:
            total, mean = float(row[REF_LOGPS_COLUMNS[side]]), _float_or_nan(row.get(REF_MEAN_COLUMNS[side]))
            tokens = row.get(REF_TOKEN_COLUMNS[side])
            if tokens is not None and len(tokens) != count:
                raise DamaError(
                    f"row {row_id}: the reference {name} per-token log-probs have {len(tokens)} values but the "
                    f"{name} response has {count} supervised tokens here: they were computed with another tokenizer "
                    f"or template. {RECOMPUTE}"
                )
        elif logps is not None and logps[AUTHORS_LOGPS_SLOTS[side][0]] is not None:
            total_slot, mean_slot, tokens_slot = AUTHORS_LOGPS_SLOTS[side]
            total, mean = float(logps[total_slot]), _float_or_nan(logps[mean_slot])
            _check_logps_tokens(_json_list(logps[tokens_slot]), total, prompt_length, count, authors_template,
                                f"row {row_id}: the {name} reference log-probs in `logps`")
        else:
            references.append(ResponseReference())
            continue
        references.append(ResponseReference(total, mean if not math.isnan(mean) else total / count))
    return references[0], references[1]


def _check_logps_tokens(tokens: list | None, total: float, prompt_length: int, count: int, authors_template: bool,
                        what: str) -> None:
    """Raises unless the per-token list of `logps` fits this tokenization (module docstring's two layouts)."""
    if tokens is None:
        raise DamaError(f"{what} have no per-token list, so nothing shows they fit this tokenization. {RECOMPUTE}")
    if len(tokens) == count:
        return
    sequence_length = prompt_length + count
    if len(tokens) != sequence_length - 1:
        raise DamaError(
            f"{what} have {len(tokens)} per-token values; this tokenization gives {count} supervised tokens in a "
            f"sequence of {sequence_length}, so they were computed with another tokenizer, template or image size. "
            f"{RECOMPUTE}"
        )
    if not authors_template:
        raise DamaError(f"{what} cover the whole sequence as the authors' code writes them, which used LLaVA-1.5's "
                        f"own conversation template; this run uses another one. {RECOMPUTE}")
    # Value t scores token t + 1: the response's tokens sit at positions prompt_length .. sequence_length - 1.
    response_sum = math.fsum(float(v) for v in tokens[prompt_length - 1:])
    # The stored sum is the same values added up and rounded once to the model's dtype (bfloat16: 8 bits).
    if abs(response_sum - total) > 2.0**-8 * abs(total) + 1e-4:
        raise DamaError(
            f"{what} cover the whole sequence, but the values at this tokenization's response positions add up to "
            f"{response_sum:.6g}, not the stored sum {total:.6g}: the prompt/response boundary differs. {RECOMPUTE}"
        )


def row_hardness(row: Mapping[str, Any]) -> float:
    """δ of one row: its `hardness`, else sum(chosen_logits) − sum(rejected_logits); NaN when neither is there."""
    if row.get("hardness") is not None:
        return float(row["hardness"])
    chosen, rejected = _json_list(row.get("chosen_logits")), _json_list(row.get("rejected_logits"))
    if chosen is None or rejected is None:
        return math.nan
    return math.fsum(float(v) for v in chosen) - math.fsum(float(v) for v in rejected)

"""Projection of a DAMA training step's FLOPs and activation memory at LLaVA-1.5-7B's shapes, from a benchmark's
micro-batches: what the CPU benchmark cannot run, counted from the token layouts it does build. A projection, not a
measurement.

Counted per step (forward + backward), from each provider's collated batch (tokens in the layout, scored rows,
attention segments, images):
- decoder linear layers: 6 x tokens x layers x (4 H^2 + 3 H I) (q, k, v, o and the SwiGLU MLP; 2 forward, 4 backward
  per multiply-add);
- decoder attention: 12 x H x layers per (query, key) pair a causal kernel computes (QK^T and PV, 2 FLOPs per
  multiply-add each, backward twice the forward; flash-attn's recomputation not counted). Packed and prefix-shared
  segments count Lq (Lk - Lq) + Lq (Lq + 1) / 2 pairs (bottom-right causal); a padded row of T tokens counts
  T (T + 1) / 2, padding included, as a causal kernel over the padded rows computes;
- head: fused 8 x scored rows x H x V (its backward recomputes the logits), full logits 6 x tokens x H x V;
- per image encoded (once per pair, or once per sequence for the baseline): the vision tower (frozen, forward only),
  2 x 577 tokens x 23 layers (read at layer -2) x (4 Hv^2 + 2 Hv Iv) plus its attention, 4 x 577^2 x Hv per layer,
  and the projector (trainable), 6 x 576 x (Hv H + H H).
Activation memory: what the decoder keeps for the backward without recomputation, in bf16: per token and layer the
layer input, the normed input, q, k, v, the attention output, the residual and its normed copy (8 H values) and the
MLP's gate, up, activated gate and product (4 I values); plus, for the full-logits head, its (tokens x V) fp32 logits
once (the CPU benchmark measures about three logits-sized tensors at the peak, so this is a lower bound).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise

from dama.data.batch import PackedBatch, PaddedBatch, PreferenceBatch, PrefixSharedBatch


@dataclass(frozen=True)
class ProjectedModel:
    """The sizes a projection uses; the defaults are LLaVA-1.5-7B's (Vicuna-7B on CLIP ViT-L/14 at 336 px)."""

    name: str = "LLaVA-1.5-7B"
    layers: int = 32
    hidden_size: int = 4096
    intermediate_size: int = 11008
    vocab_size: int = 32000
    vision_layers_run: int = 23
    vision_hidden_size: int = 1024
    vision_intermediate_size: int = 4096
    vision_tokens: int = 577
    image_tokens: int = 576
    activation_bytes: int = 2


LLAVA_15_7B = ProjectedModel()


def attended_pairs(batch: PreferenceBatch) -> int:
    """(query, key) pairs a causal attention kernel computes for the batch, summed over its segments or rows."""
    if isinstance(batch, PaddedBatch):
        rows, length = batch.input_ids.shape
        return rows * length * (length + 1) // 2
    query_bounds = batch.cu_seqlens.tolist()
    key_bounds = batch.cu_seqlens_k.tolist() if isinstance(batch, PrefixSharedBatch) else query_bounds
    total = 0
    for (qa, qb), (ka, kb) in zip(pairwise(query_bounds), pairwise(key_bounds), strict=True):
        queries, keys = qb - qa, kb - ka
        total += queries * (keys - queries) + queries * (queries + 1) // 2
    return total


def project_step(batch: PreferenceBatch, head: str, model: ProjectedModel = LLAVA_15_7B) -> dict:
    """FLOPs (by part and in all) and activation bytes of one training step on `batch` at `model`'s shapes."""
    if not isinstance(batch, PackedBatch | PrefixSharedBatch | PaddedBatch):
        raise ValueError(f"no projection for a {type(batch).__name__}")
    hidden, inter, vocab = model.hidden_size, model.intermediate_size, model.vocab_size
    tokens = batch.input_ids.numel()
    scored = batch.supervised_positions.numel()
    vision_hidden, vision_inter = model.vision_hidden_size, model.vision_intermediate_size
    vision_per_image = 2 * model.vision_tokens * model.vision_layers_run * (
        4 * vision_hidden ** 2 + 2 * vision_hidden * vision_inter) + (
        4 * model.vision_tokens ** 2 * vision_hidden * model.vision_layers_run)
    flops = {
        "decoder_linear": 6 * tokens * model.layers * (4 * hidden ** 2 + 3 * hidden * inter),
        "decoder_attention": 12 * hidden * model.layers * attended_pairs(batch),
        "head": 8 * scored * hidden * vocab if head == "fused" else 6 * tokens * hidden * vocab,
        "vision_tower": batch.pixel_values.shape[0] * vision_per_image,
        "projector": 6 * batch.pixel_values.shape[0] * model.image_tokens * (vision_hidden * hidden + hidden ** 2),
    }
    decoder_bytes = tokens * model.layers * (8 * hidden + 4 * inter) * model.activation_bytes
    logits_bytes = tokens * vocab * 4 if head == "full_logits" else 0
    return {
        "tokens": tokens,
        "scored_rows": scored,
        "attended_pairs": attended_pairs(batch),
        "flops": {**flops, "total": sum(flops.values())},
        "activation_bytes": {"decoder": decoder_bytes, "logits": logits_bytes, "total": decoder_bytes + logits_bytes},
    }


def mean_projection(steps: Sequence[dict], model: ProjectedModel = LLAVA_15_7B) -> dict:
    """project_step's results averaged over steps (micro-batches of one provider), with the model's sizes."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return {
        "model": asdict(model),
        "micro_batches": len(steps),
        "tokens": mean([s["tokens"] for s in steps]),
        "scored_rows": mean([s["scored_rows"] for s in steps]),
        "attended_pairs": mean([s["attended_pairs"] for s in steps]),
        "flops": {part: mean([s["flops"][part] for s in steps]) for part in steps[0]["flops"]},
        "activation_bytes": {part: mean([s["activation_bytes"][part] for s in steps])
                             for part in steps[0]["activation_bytes"]},
    }


def format_projection(projections: dict[str, dict], pairs: int, packed: str, baseline: str) -> str:
    """A markdown table of the providers' projections (TFLOP and GB per step), with ratios over packed and the
    baseline."""
    first = next(iter(projections.values()))
    lines = [f"Projection (not a measurement) at {first['model']['name']} shapes: the benchmark's token layouts, "
             f"{pairs} pairs per micro-batch, mean of {first['micro_batches']} micro-batches of its length "
             "distribution:",
             "| provider | tokens/step | decoder TFLOP | attention TFLOP | head TFLOP | vision + projector TFLOP | "
             "step TFLOP | x fewer than packed | x fewer than baseline | activations GB | x packed |",
             "|" + "---|" * 11]
    for name, p in projections.items():
        flops, memory = p["flops"], p["activation_bytes"]
        total = flops["total"]
        lines.append(
            f"| {name} | {p['tokens']:.0f} | {flops['decoder_linear'] / 1e12:.1f} | "
            f"{flops['decoder_attention'] / 1e12:.1f} | {flops['head'] / 1e12:.2f} | "
            f"{(flops['vision_tower'] + flops['projector']) / 1e12:.2f} | {total / 1e12:.1f} | "
            f"{projections[packed]['flops']['total'] / total:.2f} | "
            f"{projections[baseline]['flops']['total'] / total:.2f} | {memory['total'] / 1e9:.1f} | "
            f"{memory['total'] / projections[packed]['activation_bytes']['total']:.2f} |")
    return "\n".join(lines)

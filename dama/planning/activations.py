"""Activation memory of one DAMA training step, op by op, from the model's sizes and the batch's token counts.

Every figure here is the bytes of tensors that autograd keeps for the backward ("saved") or that live only while an
op runs ("transient"), read off the forward code of transformers' Llama and CLIP layers, LLaVA's projector and
DamaPolicy's heads. Autograd saves an op's input only when a gradient needs it: a frozen linear layer keeps its
weight (already counted) but not its input, so what a layer saves depends on what trains in and below it (`Grads`).

Dtypes, in bytes per element (`Precision`): w the weights as stored (the residual stream and norm outputs take it),
c what linear layers compute in (2 under 16-bit autocast), 4 the fp32 inside RMSNorm. Under autocast with fp32
weights every linear layer casts its input to c bytes, and that copy is what it saves.

Letters: H hidden size, I MLP width, Hq/Hkv query/key-value heads of D dims, V vocabulary, N tokens in the layout's
rows, M scored tokens, P images (pairs), r LoRA rank. Per-token figures are multiplied by N by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from dama.errors import DamaError

from .model_shape import ModelShape

FP32 = 4
# What each attention implementation keeps: "varlen" is flash-attn's varlen kernel (q, k, v, out, lse; its output is
# the o_proj input as it is); "segments" the exact per-segment SDPA fallback (GQA key/value heads repeated before the
# kernel, per-segment outputs concatenated and reshaped into a new o_proj input); "padded" transformers' sdpa on
# (rows, T) with a padding mask, which SDPA turns into an additive float mask in every layer and keeps
# (`padded_mask_per_layer`); its output is laid out as the o_proj input already.
ATTENTIONS = ("varlen", "segments", "padded")


@dataclass(frozen=True)
class Precision:
    """Bytes per element: w of the stored (frozen) weights, c of what linear layers compute and output."""

    weight_bytes: int
    compute_bytes: int

    @property
    def casts(self) -> bool:
        """Autocast over wider weights: every linear layer casts its input (and its weight) to compute_bytes."""
        return self.compute_bytes < self.weight_bytes


@dataclass(frozen=True)
class Grads:
    """What needs a gradient in a decoder layer: its own weights (full fine-tuning), LoRA adapters on its seven
    projections, and its input (true when anything in or below the layer trains)."""

    weights: bool
    lora_rank: int
    input: bool

    @property
    def saves_linear_inputs(self) -> bool:
        return self.weights or self.lora_rank > 0


def _norm_saved(shape: ModelShape, precision: Precision, grads: Grads, input_grad: bool) -> int:
    """RMSNorm: the fp32 view of its input and 1 / rms (for the input's gradient), the normalised input (for the
    weight's)."""
    saved = FP32 * shape.hidden_size + FP32 if input_grad else 0
    if grads.weights:
        saved += precision.weight_bytes * shape.hidden_size
    return saved


def _linear_inputs_saved(width: int, consumers: int, precision: Precision, grads: Grads) -> int:
    """The input of `consumers` projections reading one tensor of `width`: one shared tensor, or one autocast copy per
    projection (and per adapter), kept when a weight or an adapter needs it."""
    if not grads.saves_linear_inputs:
        return 0
    if not precision.casts:
        return precision.weight_bytes * width
    savers = consumers * (int(grads.weights) + int(grads.lora_rank > 0))
    return savers * precision.compute_bytes * width


def layer_saved_per_token(shape: ModelShape, precision: Precision, grads: Grads, attention: str) -> int:
    """Bytes per token one decoder layer keeps for the backward (without activation checkpointing)."""
    if attention not in ATTENTIONS:
        raise DamaError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    h, i, c = shape.hidden_size, shape.intermediate_size, precision.compute_bytes
    q_width, kv_width = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    saved = _norm_saved(shape, precision, grads, grads.input)
    saved += _linear_inputs_saved(h, 3, precision, grads)  # q, k, v read the norm's output
    # Rotated q and k, v (SDPA paths repeat GQA's key/value heads first and save the repeats), the output and its
    # fp32 log-sum-exp per head.
    kv_saved = q_width if attention != "varlen" and kv_width < q_width else kv_width
    saved += c * (q_width + 2 * kv_saved) + c * q_width + FP32 * shape.num_heads
    if attention == "segments" and grads.saves_linear_inputs:
        saved += c * q_width  # the o_proj input is a new contiguous copy of the concatenated outputs
    saved += _norm_saved(shape, precision, grads, True)
    saved += _linear_inputs_saved(h, 2, precision, grads)  # gate and up read the second norm's output
    # SwiGLU: silu keeps gate, the product keeps silu(gate) and up; down keeps the product when it trains.
    saved += 3 * c * i + (c * i if grads.saves_linear_inputs else 0)
    saved += 7 * c * grads.lora_rank  # each adapter's A output, kept for B's gradient
    return saved


def layer_weight_copies(shape: ModelShape, precision: Precision, lora_rank: int, trained_bytes: int) -> int:
    """Bytes per decoder layer of weights autocast casts to the compute dtype and the backward keeps: every
    projection's weight when the weights are wider than the compute dtype (frozen ones are kept for the input's
    gradient, trained ones for both), else the fp32 adapters' when they run in 16 bits."""
    adapters = shape.lora_params(lora_rank) // shape.num_layers if lora_rank else 0
    if precision.casts:
        return precision.compute_bytes * (shape.decoder_layer_linear_params() + adapters)
    if trained_bytes > precision.compute_bytes:
        return precision.compute_bytes * adapters
    return 0


def gathered_keys_per_layer(shape: ModelShape, precision: Precision, attention: str, shared_keys: int) -> int:
    """The prefix_shared layout gathers each pair's prompt keys and values a second time, for its rejected response,
    and the attention keeps the gathered copies (GQA heads repeated after the gather on the SDPA path)."""
    q_width, kv_width = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    width = q_width if attention != "varlen" and kv_width < q_width else kv_width
    return shared_keys * 2 * precision.compute_bytes * width


def padded_mask_per_layer(precision: Precision, rows: int, longest: int) -> int:
    """The padded layout's (rows, 1, T, T) boolean mask as the additive mask of the compute dtype that SDPA makes
    from it in each layer and keeps for the backward."""
    return rows * longest * longest * precision.compute_bytes


def layer_forward_transient_per_token(shape: ModelShape, precision: Precision) -> int:
    """The most bytes per token a decoder layer's forward holds beyond what it saves: RMSNorm's fp32 square and
    normalised input, or rotary embedding's three products of q and k, or the attention output before its copy."""
    h, c = shape.hidden_size, precision.compute_bytes
    rotated = shape.num_heads * shape.head_dim + shape.num_kv_heads * shape.head_dim
    return max(2 * FP32 * h + precision.weight_bytes * h, 3 * c * rotated, 2 * c * shape.num_heads * shape.head_dim)


def layer_backward_transient_per_token(shape: ModelShape, precision: Precision, grads: Grads) -> int:
    """The most bytes per token a decoder layer's backward adds to what the layer saved (the incoming gradient of the
    residual stream apart). Autograd releases an op's saved tensors once its backward has run, so each op's new
    gradients replace part of what it kept: the MLP's product backward holds the product's gradient and the
    gradients of silu(gate) and up while the product itself is gone (+2 I-wide) beside an H-wide input gradient;
    attention's backward holds the output's gradient and q, k, v's; RMSNorm's fp32 chain a few H-wide tensors."""
    h, i, c = shape.hidden_size, shape.intermediate_size, precision.compute_bytes
    q_width, kv_width = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    mlp = 2 * c * i + c * h
    attention = c * (2 * q_width + 2 * kv_width)
    norm = 3 * FP32 * h
    if precision.casts:
        mlp += FP32 * h  # the gradient of an autocast copy comes back in the wider dtype
    return max(mlp, attention, norm)


def checkpointed_layer_saved_per_token(shape: ModelShape, precision: Precision) -> int:
    """With activation checkpointing a layer keeps only its input (the residual stream) until its backward."""
    return precision.weight_bytes * shape.hidden_size


def rotary_per_token(shape: ModelShape, precision: Precision) -> int:
    """cos and sin of every position, made once per forward and shared by all layers."""
    return 2 * precision.weight_bytes * shape.head_dim


@dataclass(frozen=True)
class HeadMemory:
    """The log-prob head's bytes: saved for the backward, its forward's and backward's transient peaks, and whether
    the lm_head's gradient appears only after the backward's peak (an autocast cast turns it into the fp32 gradient
    once the kernel has returned) rather than at it."""

    saved: int
    forward_transient: int
    backward_transient: int
    gradient_after_peak: bool = False


def fused_head(shape: ModelShape, precision: Precision, *, tokens: int, scored: int, trains_lm_head: bool,
               kernel_rows: int, upcasts_weight: bool) -> HeadMemory:
    """DamaPolicy's fused head: the final norm's output is gathered at the M scored positions, and the kernel keeps
    those rows and two fp32 per row; its chunks of kernel_rows x V logits are recomputed in the backward. Under
    autocast the rows and the weight enter the kernel in the compute dtype, as they would enter F.linear (the cast
    weight is kept for the backward).

    upcasts_weight: the chunked torch path computes in fp32 and upcasts a 16-bit weight once per call (the Triton
    kernels read it as it is).
    """
    h, v, w, c = shape.hidden_size, shape.vocab_size, precision.weight_bytes, precision.compute_bytes
    casts = precision.casts
    chunk = kernel_rows * v * (FP32 if upcasts_weight or c == FP32 else c)
    weight_copy = FP32 * v * h if upcasts_weight and c < FP32 else 0
    saved = scored * (c * h + 2 * FP32) + (c * v * h if casts else 0)
    gather = tokens * w * h + scored * (w + (c if casts else 0)) * h  # the final norm's output and its rows
    forward = max(gather, weight_copy + FP32 * kernel_rows * v + 3 * FP32 * scored)
    # The fp32 sum of d_weight for a 16-bit weight, and its cast back: that cast is the lm_head's gradient for 16-bit
    # weights (counted with the gradients), an autocast copy on its way to the fp32 gradient otherwise. For an fp32
    # weight the sum is the gradient itself.
    accumulator = FP32 * v * h if trains_lm_head and c < FP32 else 0
    cast_back = c * v * h if trains_lm_head and casts else 0
    # The upcast weight, d_hidden rows, the accumulator, and a chunk of d_logits with its fp32 products (deleted
    # before the cast back); then the scattered gradient of the final norm's output and RMSNorm's fp32 chain.
    kernel = weight_copy + scored * c * h + accumulator + max(chunk + 2 * FP32 * kernel_rows * h, cast_back)
    backward = max(kernel, tokens * (w * h + 3 * FP32 * h))
    return HeadMemory(saved, forward, backward, gradient_after_peak=trains_lm_head and casts)


def full_logits_head(shape: ModelShape, precision: Precision, *, tokens: int, scored: int,
                     trains_lm_head: bool) -> HeadMemory:
    """DamaPolicy's full_logits head: lm_head over every position, fp32 log_softmax (saved), gather of the scored
    rows. The backward holds the saved log-probs, their incoming gradient and log_softmax's output gradient at once."""
    h, v, c = shape.hidden_size, shape.vocab_size, precision.compute_bytes
    logits = tokens * v
    saved = FP32 * logits + (precision.weight_bytes * tokens * h if trains_lm_head else 0)
    saved += c * v * h if precision.casts else 0  # autocast's copy of the weight, kept for the input's gradient
    upcast = c * logits if c < FP32 else 0  # lm_head's 16-bit output, alive while .float() copies it
    forward = max(upcast + FP32 * logits, FP32 * logits + FP32 * scored * v)
    backward = max(2 * FP32 * logits, FP32 * logits + FP32 * scored * v) + tokens * (c * h + 3 * FP32 * h)
    return HeadMemory(saved, forward, backward)


def vision_forward_transient(shape: ModelShape, precision: Precision, images: int) -> int:
    """The frozen CLIP tower's forward: every layer's hidden states (kept for the feature layer) and one layer's
    q, k, v, output and two MLP-wide tensors."""
    hv, per_image = shape.vision_hidden_size, shape.vision_tokens
    per_token = (shape.vision_layers + 1) * hv + 4 * hv + 2 * shape.vision_intermediate_size
    return images * per_image * per_token * precision.weight_bytes


def vision_saved(shape: ModelShape, precision: Precision, images: int) -> int:
    """A trained CLIP tower: per layer, its two LayerNorms' inputs and outputs, q, k, v, the attention output and
    its copy, fc1's output and quick-GELU's sigmoid and output."""
    hv, iv, c, w = shape.vision_hidden_size, shape.vision_intermediate_size, precision.compute_bytes, \
        precision.weight_bytes
    per_layer = 4 * w * hv + 2 * FP32 + 5 * c * hv + 3 * c * iv
    return images * shape.vision_tokens * shape.vision_layers * per_layer


def projector_saved(shape: ModelShape, precision: Precision, images: int, *, trains: bool) -> int:
    """The projector keeps its input (the whole hidden state its image tokens are sliced from) and GELU's output for
    its weights' gradients, and GELU's input for the gradient it passes down."""
    h, c = shape.hidden_size, precision.compute_bytes
    saved = shape.image_tokens * c * h  # GELU's input
    if trains:
        saved += shape.vision_tokens * precision.weight_bytes * shape.vision_hidden_size + shape.image_tokens * c * h
    return images * saved


def image_features_transient(shape: ModelShape, precision: Precision, images: int, image_slots: int,
                             tokens: int) -> int:
    """The projected features, their copy per image slot and the embeddings they are scattered into (the new
    residual stream of N tokens is counted by the first layer)."""
    features = shape.image_tokens * precision.compute_bytes * shape.hidden_size
    return (images + image_slots) * features + tokens * precision.weight_bytes * shape.hidden_size

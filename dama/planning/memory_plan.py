"""The peak memory of one DAMA training step on one GPU, part by part, before any run.

`plan_memory(shape, setup, batch)` replays a step as the tensors it allocates and frees, in order: the reference
forward (online), the vision tower, the projector and the embeddings, each decoder layer's forward (keeping what it
saves for the backward), the head, then the backward layer by layer (the layer's activations freed, its weight
gradients allocated), then the optimizer step. The peak is the largest total along the way, and the plan reports
what each part holds at that moment. The sizes come from dama.planning.activations (activations, from the forward
code) and from the parameter counts and dtypes here (weights, gradients, optimizer state, DeepSpeed's partitions).

On a GPU the caching allocator keeps more than the tensors need (freed blocks of the wrong size) and the CUDA
context, cuBLAS workspaces and NCCL buffers sit outside it: `gpu_bytes` adds them as a fraction and a fixed amount,
both assumptions stated in the table rather than measurements.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from dama.errors import DamaError
from dama.options import LAYOUTS

from . import activations as act
from .model_shape import ModelShape

# TrainingArguments.optim values the plan knows: AdamW keeps two moments per trained parameter, 8-bit AdamW two
# one-byte moments, SGD (without momentum, the Trainer's default) none.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "adamw_bnb_8bit", "adamw_8bit",
              "paged_adamw_8bit", "adamw_torch_8bit", "sgd")
EIGHT_BIT_OPTIMIZERS = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit")
PARTS = ("weights", "reference model", "optimizer state", "gradients", "activations", "head", "vision + projector",
         "reference forward", "optimizer step", "batch")


@dataclass(frozen=True)
class TrainingSetup:
    """What a run does that sets its memory (resolved from the training config by dama.planning.setup)."""

    precision: act.Precision
    train_language_model: bool = True
    lora_rank: int = 0
    train_projector: bool = True
    train_vision_tower: bool = False
    trained_bytes: int = 4  # bytes of a trained parameter as the model holds it (LoRA adapters: fp32)
    optimizer: str = "adamw_torch_fused"
    optimizer_on_gpu_foreach: bool = False  # torch's multi-tensor AdamW: one state-sized temporary in the step
    layout: str = "packed"
    head: str = "fused"
    reference: str = "precomputed"
    activation_checkpointing: bool = False
    attention: str = "varlen"
    head_kernel: str = "triton"  # "triton" on a GPU, "torch" (chunked, fp32) elsewhere
    head_kernel_rows: int = 128
    zero_stage: int | None = None  # None: no DeepSpeed
    num_gpus: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket: int = 0  # elements, DeepSpeed
    prefetch_bucket: int = 0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise DamaError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.optimizer not in OPTIMIZERS:
            raise DamaError(f"the plan knows the optimizers {sorted(OPTIMIZERS)}, not {self.optimizer!r}")


@dataclass(frozen=True)
class BatchShape:
    """One micro-batch as the language model sees it: N tokens in its rows, M scored tokens, P pairs (images),
    the image slots the features are copied into."""

    pairs: int
    tokens: int
    scored: int
    image_slots: int
    longest: int = 0  # padded layout: T, the rows' length
    shared_keys: int = 0  # prefix_shared: prompt tokens gathered a second time as keys of the rejected responses
    # prefix_shared: query x key elements of the rejected responses' bottom-right causal masks (SDPA path only)
    segment_mask_elements: int = 0

    @property
    def rows(self) -> int:
        return 2 * self.pairs


def batch_shape(shape: ModelShape, layout: str, pairs: int, prompt_text: int, response: int) -> BatchShape:
    """The batch of `pairs` pairs whose prompts have `prompt_text` text tokens and whose responses have `response`
    tokens each, in `layout`. A layout is one entry here: how many tokens its rows hold and how many image slots.
    packed: every sequence whole, end to end; padded: 2P rows of the longest sequence; prefix_shared: each pair's
    prompt (image included) once, then both responses."""
    prompt = shape.image_tokens + prompt_text
    scored = 2 * pairs * response
    if layout == "prefix_shared":
        return BatchShape(pairs, pairs * (prompt + 2 * response), scored, pairs, shared_keys=pairs * prompt,
                          segment_mask_elements=pairs * response * (prompt + response))
    if layout == "packed":
        return BatchShape(pairs, 2 * pairs * (prompt + response), scored, 2 * pairs)
    if layout == "padded":
        return BatchShape(pairs, 2 * pairs * (prompt + response), scored, 2 * pairs, longest=prompt + response)
    raise DamaError(f"layout must be one of {LAYOUTS}, got {layout!r}")


@dataclass
class MemoryPlan:
    """The predicted peak of tensor bytes on one GPU and what each part holds at that moment."""

    peak_bytes: int
    peak_moment: str
    parts: dict[str, int]
    persistent_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def working_bytes(self) -> int:
        """The peak beyond what stays allocated between steps (weights, optimizer state): what a step adds."""
        return self.peak_bytes - self.persistent_bytes

    def gpu_bytes(self, fragmentation: float, context_bytes: int) -> int:
        """What the GPU must have: the tensors' peak, the allocator's slack on top, and the CUDA context."""
        return int(self.peak_bytes * (1 + fragmentation)) + context_bytes


class _Timeline:
    """Running totals per part; mark() records the total (with transient extras) and keeps the largest."""

    def __init__(self) -> None:
        self.live: Counter[str] = Counter()
        self.peak, self.moment, self.parts = -1, "", {}

    def add(self, part: str, nbytes: int) -> None:
        self.live[part] += nbytes

    def mark(self, moment: str, **transient: int) -> None:
        extra = {part.replace("_", " "): n for part, n in transient.items()}
        now = Counter(self.live)
        now.update(extra)
        total = sum(now.values())
        if total > self.peak:
            self.peak, self.moment, self.parts = total, moment, {p: now.get(p, 0) for p in PARTS}


def _layer_grads(setup: TrainingSetup, layer: int) -> act.Grads:
    below = setup.train_projector or setup.train_vision_tower
    inside = setup.train_language_model or setup.lora_rank > 0
    return act.Grads(weights=setup.train_language_model, lora_rank=setup.lora_rank,
                     input=below or setup.train_language_model or (layer > 0 and inside))


def _trained_counts(shape: ModelShape, setup: TrainingSetup) -> dict[str, int]:
    """Trained parameters per gradient group: each decoder layer, lm_head, embeddings + final norm, projector,
    vision tower."""
    per_layer = shape.decoder_layer_params() if setup.train_language_model else 0
    if setup.lora_rank:
        per_layer += shape.lora_params(setup.lora_rank) // shape.num_layers
    full = setup.train_language_model
    return {"layer": per_layer, "lm_head": shape.lm_head_params() if full else 0,
            "embeddings": shape.embedding_params() + shape.hidden_size if full else 0,
            "projector": shape.projector_params() if setup.train_projector else 0,
            "vision_tower": shape.vision_tower_params() if setup.train_vision_tower else 0}


def _state_bytes_per_param(setup: TrainingSetup) -> int:
    """Optimizer bytes per trained parameter: its moments (in the parameter's dtype for torch's AdamW, fp32 under
    DeepSpeed, one byte each for 8-bit AdamW), plus DeepSpeed's fp32 master copy of 16-bit weights."""
    if setup.optimizer in EIGHT_BIT_OPTIMIZERS:
        moments = 2
    elif setup.optimizer == "sgd":
        moments = 0
    else:
        moments = 2 * (setup.trained_bytes if setup.zero_stage is None else 4)
    master = 4 if setup.zero_stage is not None and setup.precision.weight_bytes < 4 else 0
    return moments + master


def _persistent(shape: ModelShape, setup: TrainingSetup, trained: int) -> dict[str, int]:
    """Weights, optimizer state and the online reference copy per GPU, between steps."""
    w = setup.precision.weight_bytes
    copies = (shape.projector_params() if setup.lora_rank and setup.train_projector else 0) + \
        (shape.vision_tower_params() if setup.lora_rank and setup.train_vision_tower else 0)
    total = shape.total_params() + (shape.lora_params(setup.lora_rank) if setup.lora_rank else 0) + copies
    parts = {}
    if setup.zero_stage is None:
        parts["weights"] = (total - trained) * w + trained * setup.trained_bytes
        parts["optimizer state"] = trained * _state_bytes_per_param(setup)
    else:
        # ZeRO: 16-bit weights on the GPU (partitioned from stage 3, on the CPU with offload_param); fp32 masters
        # and the optimizer's states partitioned from stage 1 (on the CPU with offload_optimizer).
        weights = total * w
        if setup.zero_stage == 3:
            gathered = max(shape.decoder_layer_params(), shape.embedding_params()) + setup.prefetch_bucket
            weights = (0 if setup.offload_params else weights // setup.num_gpus) + w * gathered
        parts["weights"] = weights
        shards = setup.num_gpus if setup.zero_stage >= 1 else 1
        parts["optimizer state"] = 0 if setup.offload_optimizer else trained * _state_bytes_per_param(setup) // shards
    if setup.reference == "online" and not setup.lora_rank:
        parts["reference model"] = shape.total_params() * w
    return parts


def _gradient_bytes(count: int, setup: TrainingSetup) -> int:
    """Gradients of `count` trained parameters on one GPU, as they are allocated in the backward."""
    if setup.zero_stage is None:
        return count * setup.trained_bytes
    if setup.zero_stage >= 2:
        return count * setup.precision.weight_bytes // setup.num_gpus
    return count * setup.precision.weight_bytes


def _no_grad_layer_per_token(shape: ModelShape, precision: act.Precision) -> int:
    """A decoder layer's forward without autograd: its input and output, and the larger of attention's q, k, v and
    output and the MLP's three I-wide tensors."""
    c, q, kv = precision.compute_bytes, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    inner = max(c * (2 * q + 2 * kv), 3 * c * shape.intermediate_size)
    return 2 * precision.weight_bytes * shape.hidden_size + inner + act.layer_forward_transient_per_token(shape,
                                                                                                        precision)


def _head(shape: ModelShape, setup: TrainingSetup, batch: BatchShape, trains_lm_head: bool) -> act.HeadMemory:
    if setup.head == "fused":
        return act.fused_head(shape, setup.precision, tokens=batch.tokens, scored=batch.scored,
                              trains_lm_head=trains_lm_head, kernel_rows=setup.head_kernel_rows,
                              upcasts_weight=setup.head_kernel == "torch")
    return act.full_logits_head(shape, setup.precision, tokens=batch.tokens, scored=batch.scored,
                                trains_lm_head=trains_lm_head)


def _batch_bytes(shape: ModelShape, batch: BatchShape) -> int:
    """The micro-batch on the device: int64 ids, labels, positions and targets per token, the pixels of each image."""
    return 5 * 8 * batch.tokens + batch.pairs * 3 * shape.image_size ** 2 * 4


def plan_memory(shape: ModelShape, setup: TrainingSetup, batch: BatchShape) -> MemoryPlan:
    """The peak tensor bytes of one training step (forward, backward, optimizer step) on one GPU; module docstring."""
    precision, n = setup.precision, batch.tokens
    w = precision.weight_bytes
    counts = _trained_counts(shape, setup)
    trained = counts["layer"] * shape.num_layers + sum(v for k, v in counts.items() if k != "layer")
    timeline = _Timeline()
    persistent = _persistent(shape, setup, trained)
    for part, nbytes in persistent.items():
        timeline.add(part, nbytes)
    timeline.add("batch", _batch_bytes(shape, batch))

    head = _head(shape, setup, batch, trains_lm_head=setup.train_language_model and not shape.tie_word_embeddings)
    if setup.reference == "online":
        # The reference runs first, without autograd: one layer's tensors at a time, then its head.
        no_grad_head = _head(shape, replace(setup, train_language_model=False), batch, trains_lm_head=False)
        timeline.mark("reference forward", reference_forward=max(
            act.vision_forward_transient(shape, precision, batch.pairs),
            n * _no_grad_layer_per_token(shape, precision), no_grad_head.forward_transient))

    # Vision tower and projector, then the image features scattered into the embeddings.
    timeline.mark("vision tower", vision_projector=act.vision_forward_transient(shape, precision, batch.pairs))
    vision_saved = 0
    if setup.train_vision_tower:
        vision_saved += act.vision_saved(shape, precision, batch.pairs)
    if setup.train_projector or setup.train_vision_tower:
        vision_saved += act.projector_saved(shape, precision, batch.pairs, trains=setup.train_projector)
    timeline.add("vision + projector", vision_saved)
    timeline.mark("image features", vision_projector=act.image_features_transient(
        shape, precision, batch.pairs, batch.image_slots, n))
    timeline.add("activations", n * act.rotary_per_token(shape, precision))
    if setup.layout == "padded":
        timeline.add("activations", batch.rows * batch.longest ** 2)  # the boolean attention mask

    # Decoder layers, forward.
    kept = []
    for layer in range(shape.num_layers):
        grads = _layer_grads(setup, layer)
        saved = act.layer_saved_per_token(shape, precision, grads, setup.attention)
        # Keys gathered for prefix sharing are saved beside the row's own (k and v of the prompts once more), autocast
        # keeps 16-bit copies of wider weights, SDPA keeps a float copy of the padded layout's mask, and of the
        # prefix-shared rejected responses' bottom-right masks, in every layer.
        saved_extra = act.gathered_keys_per_layer(shape, precision, setup.attention, batch.shared_keys)
        saved_extra += act.layer_weight_copies(shape, precision, setup.lora_rank, setup.trained_bytes)
        if setup.attention == "padded":
            saved_extra += act.padded_mask_per_layer(precision, batch.rows, batch.longest)
        if setup.attention == "segments":
            saved_extra += batch.segment_mask_elements * precision.compute_bytes  # SDPA's float copy of each mask
        saved += saved_extra // max(n, 1)
        kept.append((grads, saved))
        if setup.activation_checkpointing:
            timeline.add("activations", n * act.checkpointed_layer_saved_per_token(shape, precision))
            timeline.mark(f"forward, layer {layer}", activations=n * _no_grad_layer_per_token(shape, precision))
        else:
            timeline.add("activations", n * saved)
            timeline.mark(f"forward, layer {layer}",
                          activations=n * act.layer_forward_transient_per_token(shape, precision))

    # Final norm and head.
    final_norm = act.Grads(weights=setup.train_language_model, lora_rank=0, input=True)
    head_saved = n * act._norm_saved(shape, precision, final_norm, True) + head.saved
    timeline.add("head", head_saved)
    timeline.mark("head forward", head=head.forward_transient)
    lm_head_gradient = _gradient_bytes(counts["lm_head"], setup)
    if not head.gradient_after_peak:
        timeline.add("gradients", lm_head_gradient)
    timeline.mark("head backward", head=head.backward_transient)
    if head.gradient_after_peak:
        timeline.add("gradients", lm_head_gradient)
    timeline.add("head", -head_saved)

    # Decoder layers, backward: the residual stream's gradient runs down beside each layer's own.
    stream = n * w * shape.hidden_size
    for layer in reversed(range(shape.num_layers)):
        grads, saved = kept[layer]
        timeline.add("gradients", _gradient_bytes(counts["layer"], setup))
        recomputed = n * saved if setup.activation_checkpointing else 0
        timeline.mark(f"backward, layer {layer}", activations=stream + recomputed + n *
                      act.layer_backward_transient_per_token(shape, precision, grads))
        freed = act.checkpointed_layer_saved_per_token(shape, precision) if setup.activation_checkpointing else saved
        timeline.add("activations", -n * freed)

    # Embeddings, projector and vision tower gradients.
    for group in ("embeddings", "projector", "vision_tower"):
        timeline.add("gradients", _gradient_bytes(counts[group], setup))
    timeline.mark("backward, embeddings and projector", activations=stream)
    timeline.add("vision + projector", -vision_saved)
    timeline.add("activations", -timeline.live["activations"])

    # Optimizer step: torch's multi-tensor AdamW makes one state-sized temporary; ZeRO-2/3 turn the 16-bit gradient
    # partition into fp32 for the masters.
    step = 0
    if setup.zero_stage is None and setup.optimizer_on_gpu_foreach:
        step = trained * setup.trained_bytes
    elif setup.zero_stage is not None and setup.zero_stage >= 2 and not setup.offload_optimizer:
        step = trained * 4 // setup.num_gpus
    timeline.mark("optimizer step", optimizer_step=step)
    notes = []
    if setup.zero_stage is not None:
        notes.append(f"DeepSpeed ZeRO-{setup.zero_stage} over {setup.num_gpus} GPU(s): 16-bit weights, fp32 masters "
                     "and states as the ZeRO paper counts them; communication buckets are not counted")
    return MemoryPlan(peak_bytes=timeline.peak, peak_moment=timeline.moment, parts=timeline.parts,
                      persistent_bytes=sum(persistent.values()), notes=notes)

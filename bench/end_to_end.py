"""End-to-end benchmark: full DAMA training steps of a shape-faithful small LLaVA-1.5, prefix-shared and packed with
the fused head against padded + full logits, on one machine, in one run.

Providers (P pairs per micro-batch, S = 2P sequences)
  dama_prefix_shared  PrefixSharedCollator + DamaPolicy(head="fused", packed attention): each pair laid out as
                      [prompt | chosen | rejected] in one row, so its image and prompt tokens go through the language
                      model once for both responses (each response attends to the prompt and to itself only);
                      otherwise as dama.
  dama                PackedCollator + DamaPolicy(head="fused", packed attention): the S sequences end to end in one
                      row without padding, each pair's image encoded once, and only the supervised positions scored,
                      so the (tokens x V) logits are never built.
  padded_full_logits  the authors' trainer: PaddedCollator (right padding to the longest of the S sequences), the
                      language model on "sdpa" attention with a padding mask, DamaPolicy(head="full_logits") (lm_head
                      over all S * T positions, log_softmax, gather), and each image encoded once per sequence: chosen
                      and rejected are one batch of S rows with the pixels repeated, so each pair's image goes through
                      the vision tower twice.
A step is the same for all three after the log-probs: DamaLoss (data-aware with a synthetic hardness and
hardness_mean, model-aware, outlier filter on), backward, torch AdamW step. bench/test_end_to_end.py checks that the
providers give the same loss and gradients, so that the benchmark compares one computation done three ways.
Plain DPO, beside a DPO library:
  dama_dpo            dama_prefix_shared with the DAMA loss as plain DPO (data_aware and model_aware off), its
                      reference log-probs precomputed (from the data).
  trl_dpo             TRL's DPOTrainer as it ships for vision data (bench/trl_provider.py): padded, a live reference
                      model, each image encoded once per sequence, its fused LM head, activation checkpointing.

Model: LLaVA-1.5's shapes where they set the cost of a step, small widths elsewhere. CLIP at 336 px with patch 14
(576 image tokens per sequence, as LLaVA-1.5-7B), read at layer -2; a GELU projector; a Llama language model with
LLaVA's vocabulary of 32000 and an untied head, hidden size and layer count from the command line (head dim 64, MLP
width 11008 / 4096 of the hidden size as in Llama-2-7B). The vision tower is frozen, as in LLaVA DPO training.
fp32 on the CPU; on a GPU (--device cuda) the weights are in --dtype (bf16 by default) and LLaVA-1.5-7B's width is
--hidden-size 4096 --head-dim 128 --vocab-size 32064.

Data: PreferenceExample objects are synthesized directly, without a tokenizer or images on disk, since only the token
counts and the layout matter to speed and memory. Each sequence is "<s>", 37 tokens of the vicuna v1 system line and
"USER:", 576 image tokens, a question of 8 to 24 tokens and 6 tokens of "ASSISTANT:" (about 60 text tokens of prompt,
as RLAIF-V), then the response ending in "</s>". Token ids are uniform random. Response lengths are drawn from a seeded
distribution: a pair's base length is 150 * exp(N(0, 0.2^2)) and each response's is the base times exp(N(0, 0.2^2)),
so 80% of responses run 104 to 216 tokens and chosen and rejected differ in length as real pairs do. Labels are -100
on the prompt. Reference log-probs are about those of a uniform model (-ln V per token, plus noise) and the hardness is
N(0, 1): they only feed the loss, whose cost does not depend on them.

Measurement: each provider runs in a fresh process of this module (--worker), so that its peak RSS is its own, in
--rounds rounds that alternate between the providers; per provider the round with the shortest median step is kept
(other work on a shared machine only slows a run down), with every round's median in the record. The micro-batches
(warm-up + timed steps) are the same for all. Reported: pairs per second from the median time of the timed steps
(forward + loss + backward + optimizer step; collation is done beforehand, as data-loader workers would), and the
median CPU time of a step (with --threads 1, a measure of the work that other jobs on the machine do not inflate);
peak working memory, the most tensor bytes live at once during one step beyond what was resident before it (weights,
optimizer state, the batch), read by bench/memory.py's allocator replay in one more step under the profiler, on the
run's micro-batch with the largest padded size S x T; and the process's peak RSS, read before that profiled step
(the profiler itself keeps memory resident). Ratios are over the baseline and over dama (packed). Beside the
measurements, each record projects its step's FLOPs and activation memory to LLaVA-1.5-7B's shapes from micro-batches
of the same length distribution (bench/projection.py; a projection, labelled as such). On a GPU, also the peak CUDA
memory of the timed steps (torch.cuda.max_memory_allocated), tokens per second (the pairs' sequence tokens) and the
model FLOP utilisation: the FLOPs of the provider's own step (bench/projection.py's count at the run's sizes, over
its own layout, padding included; TRL's reference forward added) per second over the bf16 matmul peak measured in
the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from dama.data.batch import IGNORE_INDEX, PaddedBatch, PreferenceBatch, PreferenceExample
from dama.data.collator import PackedCollator, PaddedCollator, PrefixSharedCollator
from dama.method.config import DamaMethodConfig
from dama.method.loss import DamaLoss, DamaLossResult
from dama.model.loading import configure_trainable
from dama.model.policy import DamaPolicy
from dama_kernels.functional import CHUNK_ELEMENTS

from .dtypes import DTYPES
from .end_to_end_report import MIB, format_table, format_targets, write_chart
from .environment import REPO_ROOT, git_state
from .loss_head import matmul_peak_tflops
from .memory import current_rss_bytes, peak_rss_bytes, track_peak
from .projection import ProjectedModel, format_projection, mean_projection, project_step
from .trl_provider import PROVIDER as TRL
from .trl_provider import build_trl_setup, trl_forward_backward, trl_inputs, trl_missing_reason

PROVIDERS = ("dama_prefix_shared", "dama", "padded_full_logits")
BASELINE = "padded_full_logits"
PACKED = "dama"
# Plain DPO: dama's default layout with the DAMA factors off, and TRL's DPOTrainer (module docstring).
DPO = "dama_dpo"
ALL_PROVIDERS = (*PROVIDERS, DPO, TRL)
LAYOUT_OF = {"dama_prefix_shared": "prefix_shared", "dama": "packed", BASELINE: "padded", DPO: "prefix_shared",
             TRL: "padded"}
# Micro-batches of the benchmark's length distribution (the run's own first) that the LLaVA-1.5-7B projection averages.
PROJECTION_BATCHES = 64
# Llama's special ids; the image token takes the last id so that the vocabulary stays LLaVA's 32000.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
PAD_ID = UNK_ID  # LLaVA-1.5 pads with <unk>
FIRST_TEXT_ID = 3
SYSTEM_TOKENS = 38  # "<s>" + the vicuna v1 system line + " USER:" in Llama tokens
ASSISTANT_TOKENS = 6  # " ASSISTANT:" after the question
QUESTION_TOKENS = (8, 24)
LENGTH_SPREAD = 0.2  # std of the log of a pair's base length and of each response around it
HARDNESS_MEAN = 0.0
HEAD_DIM = 64
LEARNING_RATE = 1e-6
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "end_to_end.json"
# (provider, ratio key, limit, label, True when the ratio must be at least the limit)
TARGETS = (
    (PACKED, "pairs_per_s_vs_baseline", 1.5, ">= 1.5x pairs/s of the baseline", True),
    (PACKED, "peak_vs_baseline", 0.5, "<= 0.5x peak working memory of the baseline", False),
    ("dama_prefix_shared", "pairs_per_s_vs_packed", 1.35, ">= 1.35x pairs/s of packed", True),
    ("dama_prefix_shared", "peak_vs_packed", 0.75, "<= 0.75x peak working memory of packed", False),
    ("dama_prefix_shared", "projected_flops_fewer_vs_packed", 1.6, ">= 1.6x fewer step FLOPs than packed, projected "
     "to LLaVA-1.5-7B", True),
    ("dama_prefix_shared", "projected_flops_fewer_vs_baseline", 1.8, ">= 1.8x fewer step FLOPs than the baseline, "
     "projected to LLaVA-1.5-7B", True),
)
# On a GPU, at LLaVA-1.5-7B's width (bench/gpu_check.sh).
GPU_TARGETS = (
    ("dama_prefix_shared", "pairs_per_s_vs_packed", 1.4, ">= 1.4x pairs/s of packed", True),
    ("dama_prefix_shared", "pairs_per_s_vs_baseline", 2.0, ">= 2.0x pairs/s of the baseline", True),
    ("dama_prefix_shared", "cuda_peak_vs_baseline", 0.6, "<= 0.6x peak CUDA memory of the baseline", False),
    ("dama_prefix_shared", "mfu", 0.4, ">= 40% model FLOP utilisation of the measured bf16 matmul peak", True),
)


@dataclass(frozen=True)
class Shape:
    """Model and data sizes of a run; the defaults are the shape-faithful benchmark's (P = 4 pairs)."""

    num_pairs: int = 4
    hidden_size: int = 256
    num_layers: int = 2
    steps: int = 6
    warmup: int = 2
    vocab_size: int = 32000
    image_size: int = 336
    patch_size: int = 14
    vision_hidden_size: int = 64
    response_mean: int = 150
    seed: int = 0
    head_dim: int = HEAD_DIM

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_token_id(self) -> int:
        return self.vocab_size - 1

    @property
    def num_heads(self) -> int:
        return max(2, self.hidden_size // self.head_dim)

    @property
    def intermediate_size(self) -> int:
        # Llama-2-7B's MLP ratio 11008 / 4096, rounded to a multiple of 8.
        return 8 * round(self.hidden_size * 11008 / 4096 / 8)


def llava_config(shape: Shape) -> LlavaConfig:
    """LLaVA-1.5's architecture (CLIP read at layer -2, CLS dropped, GELU projector, untied head) at `shape`'s sizes."""
    if shape.image_size % shape.patch_size or shape.hidden_size % shape.num_heads:
        raise ValueError(f"image_size must be a multiple of patch_size, and hidden_size of the {shape.num_heads} "
                         f"heads; got {shape.image_size}, {shape.patch_size} and {shape.hidden_size}")
    vision_config = CLIPVisionConfig(
        hidden_size=shape.vision_hidden_size, intermediate_size=4 * shape.vision_hidden_size, num_hidden_layers=2,
        num_attention_heads=2, image_size=shape.image_size, patch_size=shape.patch_size,
        projection_dim=shape.vision_hidden_size,
    )
    text_config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_heads,
        max_position_embeddings=4096, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=shape.image_token_id,
        image_seq_length=shape.num_image_tokens, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )


def synthetic_pair(shape: Shape, generator: torch.Generator, row_id: str) -> PreferenceExample:
    """One pair laid out as LLaVA-1.5's template lays it out (module docstring), with random token ids."""

    def text_ids(count: int) -> torch.Tensor:
        return torch.randint(FIRST_TEXT_ID, shape.image_token_id, (count,), generator=generator)  # (count,)

    def lognormal() -> float:
        return math.exp(LENGTH_SPREAD * float(torch.randn((), generator=generator)))

    question = int(torch.randint(QUESTION_TOKENS[0], QUESTION_TOKENS[1] + 1, (), generator=generator))
    prompt = torch.cat([
        torch.tensor([BOS_ID]), text_ids(SYSTEM_TOKENS - 1),
        torch.full((shape.num_image_tokens,), shape.image_token_id), text_ids(question + ASSISTANT_TOKENS),
    ])  # (Lp,)
    base_length = shape.response_mean * lognormal()

    def sequence() -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """(input ids, labels) of prompt + response, its reference log-prob and its response length."""
        length = max(2, round(base_length * lognormal()))
        response = torch.cat([text_ids(length - 1), torch.tensor([EOS_ID])])  # (length,)
        labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), response])
        # Near a uniform model's log-prob, -ln V per token, so the margins start close to 0.
        ref_logps = -math.log(shape.vocab_size) * length + float(torch.randn((), generator=generator))
        return torch.cat([prompt, response]), labels, ref_logps, length

    chosen_ids, chosen_labels, ref_chosen, chosen_length = sequence()
    rejected_ids, rejected_labels, ref_rejected, rejected_length = sequence()
    return PreferenceExample(
        row_id=row_id,
        prompt_length=prompt.shape[0],
        chosen_input_ids=chosen_ids,
        chosen_labels=chosen_labels,
        rejected_input_ids=rejected_ids,
        rejected_labels=rejected_labels,
        pixel_values=torch.randn(3, shape.image_size, shape.image_size, generator=generator),
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        ref_chosen_mean_logps=ref_chosen / chosen_length,
        ref_rejected_mean_logps=ref_rejected / rejected_length,
        hardness=float(torch.randn((), generator=generator)),
    )


def micro_batches(shape: Shape) -> list[list[PreferenceExample]]:
    """The warm-up and timed micro-batches of a run, P pairs each; a function of shape (its seed included) only."""
    generator = torch.Generator().manual_seed(shape.seed)
    return [
        [synthetic_pair(shape, generator, f"synthetic:{step * shape.num_pairs + k}") for k in range(shape.num_pairs)]
        for step in range(shape.warmup + shape.steps)
    ]


def padded_tokens(examples: Sequence[PreferenceExample]) -> int:
    """S x T: the tokens of the padded layout of these pairs."""
    longest = max(max(e.chosen_input_ids.shape[0], e.rejected_input_ids.shape[0]) for e in examples)
    return 2 * len(examples) * longest


class ImagePerSequenceCollator:
    """PaddedCollator, then one image per sequence: the authors' trainer concatenates chosen and rejected into one
    batch of S = 2P rows and repeats the pixels, so the vision tower encodes each pair's image twice.

    pixel_values (P, 3, h, w) -> (S, 3, h, w) and image_index -> arange(S): sequence k (chosen block, then rejected
    block) reads image k, a copy of pair k mod P's.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.padded = PaddedCollator(pad_token_id)

    def __call__(self, examples: Sequence[PreferenceExample]) -> PaddedBatch:
        batch = self.padded(examples)
        return dataclasses.replace(batch, pixel_values=batch.pixel_values.repeat(2, 1, 1, 1),
                                   image_index=torch.arange(batch.num_seqs))


def make_collate(provider: str) -> Callable[[Sequence[PreferenceExample]], PreferenceBatch]:
    """The collator of a provider's layout (TRL's: ImagePerSequenceCollator, the same padded rows it gets)."""
    if provider in (BASELINE, TRL):
        return ImagePerSequenceCollator(PAD_ID)
    return PrefixSharedCollator() if LAYOUT_OF[provider] == "prefix_shared" else PackedCollator()


@dataclass
class TrainingSetup:
    """What one provider trains with; params are the trainable ones, in the model's parameter order."""

    provider: str
    policy: DamaPolicy
    collate: Callable[[Sequence[PreferenceExample]], PreferenceBatch]
    loss_fn: DamaLoss
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]


def build_llava(shape: Shape, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The benchmark's LLaVA in training mode, vision tower frozen; its weights are a function of shape.seed (per
    device type), built on `device` (a 7B-wide model is built on the GPU in a fraction of the CPU's time)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(shape.seed)
    try:
        with torch.device(device):
            llava = LlavaForConditionalGeneration(llava_config(shape)).to(dtype).train()
    finally:
        torch.random.set_rng_state(generator_state)
    configure_trainable(llava)
    return llava


def build_setup(provider: str, shape: Shape, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> TrainingSetup:
    """A fresh model (weights a function of shape.seed), policy, collator, loss and optimizer for `provider` (one of
    PROVIDERS or dama_dpo; TRL's has its own, bench/trl_provider.py)."""
    if provider not in (*PROVIDERS, DPO):
        raise ValueError(f"provider must be one of {(*PROVIDERS, DPO)}, got {provider!r}")
    llava = build_llava(shape, device, dtype)
    if provider == BASELINE:
        llava.set_attn_implementation({"text_config": "sdpa"})
        policy = DamaPolicy(llava, head="full_logits", packed_attention=False)
    else:
        policy = DamaPolicy(llava, head="fused", packed_attention=True)
    collate = make_collate(provider)
    params = [p for p in policy.llava.parameters() if p.requires_grad]
    if provider == DPO:
        loss_fn = DamaLoss(DamaMethodConfig(beta=0.1, data_aware=False, model_aware=False))
    else:
        loss_fn = DamaLoss(DamaMethodConfig(beta=0.1), hardness_mean=HARDNESS_MEAN)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    return TrainingSetup(provider, policy, collate, loss_fn.to(device), optimizer, params)


def forward_backward(setup: TrainingSetup, batch: PreferenceBatch) -> DamaLossResult:
    """Policy log-probs (S,), the DAMA loss of the P pairs, and its backward into the trainable parameters."""
    logps = setup.policy(batch)  # (S,)
    chosen_logps, rejected_logps = batch.split_chosen_rejected(logps)  # (P,), (P,)
    result = setup.loss_fn(chosen_logps, rejected_logps, batch.ref_chosen_logps, batch.ref_rejected_logps,
                           batch.hardness)
    result.loss.backward()
    return result


def train_step(setup: TrainingSetup, batch: PreferenceBatch) -> float:
    """forward_backward and an optimizer step; the gradients are cleared before, not after (they stay readable)."""
    setup.optimizer.zero_grad(set_to_none=True)
    result = forward_backward(setup, batch)
    setup.optimizer.step()
    return result.loss.item()


def matmul_flops(shape: Shape, tokens: int, scored_rows: int, head: str) -> dict[str, int]:
    """Matmul FLOPs of a step, forward + backward: the language model's linear layers and the lm_head.

    Counts 6 x rows x in x out per linear layer (2 forward, 4 backward); the fused head adds 2 more per row, since its
    backward recomputes the logits. Attention scores and the frozen vision tower are left out.
    """
    hidden, inter = shape.hidden_size, shape.intermediate_size
    body = 6 * tokens * shape.num_layers * (4 * hidden * hidden + 3 * hidden * inter)
    head_rows = scored_rows if head == "fused" else tokens
    per_row = 8 if head == "fused" else 6
    return {"body": body, "head": per_row * head_rows * hidden * shape.vocab_size}


@dataclass
class StepRunner:
    """One provider's timed work: its inputs on the device, its step and the parts the records describe.

    inputs: one per micro-batch (a PreferenceBatch, or TRL's dict); layouts: the same micro-batches as
    PreferenceBatch on the CPU (token and FLOP counts); step(inputs) -> loss runs forward, loss, backward and the
    optimizer step; forward_backward(inputs) the step without the optimizer (the profiled step adds it).
    """

    inputs: list
    layouts: list[PreferenceBatch]
    step: Callable[[object], float]
    forward_backward: Callable[[object], object]
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    model: nn.Module
    head: str
    attention: str


def make_runner(provider: str, shape: Shape, examples: list[list[PreferenceExample]], device: torch.device,
                dtype: torch.dtype) -> StepRunner:
    """The StepRunner of a provider: a fresh model, its inputs collated on the CPU and moved to the device."""
    layouts = [make_collate(provider)(pairs) for pairs in examples]
    if provider == TRL:
        reason = trl_missing_reason()
        if reason is not None:
            raise RuntimeError(reason)
        llava = build_llava(shape, device, dtype)
        setup = build_trl_setup(llava, PAD_ID, shape.image_size, shape.patch_size, LEARNING_RATE, device)
        inputs = [{name: tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
                   for name, tensor in trl_inputs(pairs, PAD_ID).items()} for pairs in examples]

        def trl_step(batch: dict) -> float:
            setup.optimizer.zero_grad(set_to_none=True)
            loss = trl_forward_backward(setup, batch)
            setup.optimizer.step()
            return loss.item()

        return StepRunner(inputs, layouts, trl_step, lambda batch: trl_forward_backward(setup, batch),
                          setup.optimizer, setup.params, llava, "trl_fused",
                          llava.config.text_config._attn_implementation)
    setup = build_setup(provider, shape, device, dtype)
    return StepRunner([batch.to(device) for batch in layouts], layouts, lambda batch: train_step(setup, batch),
                      lambda batch: forward_backward(setup, batch), setup.optimizer, setup.params,
                      setup.policy.llava, setup.policy.head_kind,
                      setup.policy.llava.config.text_config._attn_implementation)


def step_model_flops(provider: str, batch: PreferenceBatch, shape: Shape) -> float:
    """FLOPs of one step of `provider` on `batch` at the run's sizes (bench/projection.py's count over the provider's
    own layout, padding included), with TRL's reference forward: a third of the decoder's and the projector's
    forward + backward, the fused head's forward (2 of its 8 per row) and the vision tower again."""
    model = ProjectedModel(
        name=f"H {shape.hidden_size}, {shape.num_layers} layers", layers=shape.num_layers,
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size, vocab_size=shape.vocab_size,
        vision_layers_run=1, vision_hidden_size=shape.vision_hidden_size,
        vision_intermediate_size=4 * shape.vision_hidden_size, vision_tokens=shape.num_image_tokens + 1,
        image_tokens=shape.num_image_tokens,
    )
    flops = project_step(batch, "full_logits" if provider == BASELINE else "fused", model)["flops"]
    total = flops["total"]
    if provider == TRL:
        total += (flops["decoder_linear"] + flops["decoder_attention"] + flops["projector"]) / 3 + (
            flops["head"] / 4 + flops["vision_tower"])
    return total


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads")


def run_provider(provider: str, shape: Shape, device: str = "cpu", dtype: str = "fp32") -> dict:
    """Measures one provider in this process and returns its record (without ratios or the environment)."""
    examples = micro_batches(shape)
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    runner = make_runner(provider, shape, examples, device, DTYPES[dtype])
    rss_ready = current_rss_bytes()
    times, cpu_times, losses = [], [], []
    for index, inputs in enumerate(runner.inputs):
        if on_gpu and index == shape.warmup:
            torch.cuda.reset_peak_memory_stats(device)
        if on_gpu:
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(runner.step(inputs))  # the loss's .item() waits for the device
        if index >= shape.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    cuda_peak = torch.cuda.max_memory_allocated(device) if on_gpu else None
    # Read before the profiled step: the profiler keeps a few hundred MB resident.
    rss_peak = peak_rss_bytes()
    profiled = max(range(len(examples)), key=lambda k: padded_tokens(examples[k]))
    runner.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    with track_peak(device) as reading:
        runner.forward_backward(runner.inputs[profiled])
        runner.optimizer.step()
    grads = [p.grad for p in runner.params]
    state_bytes = sum(t.untyped_storage().nbytes() for state in runner.optimizer.state.values()
                      for t in state.values() if isinstance(t, torch.Tensor))

    timed = runner.layouts[shape.warmup:]
    layout_tokens = [b.input_ids.numel() for b in timed]
    sequence_tokens = [sum(e.chosen_input_ids.shape[0] + e.rejected_input_ids.shape[0] for e in pairs)
                       for pairs in examples[shape.warmup:]]
    scored = [b.supervised_positions.numel() for b in timed]
    step_time = statistics.median(times)
    mean_tokens = statistics.mean(layout_tokens)
    flops = matmul_flops(shape, round(mean_tokens), round(statistics.mean(scored)),
                         "full_logits" if runner.head == "full_logits" else "fused")
    model_flops = statistics.mean(step_model_flops(provider, b, shape) for b in timed)
    return {
        "provider": provider,
        "status": "ok",
        "layout": LAYOUT_OF[provider],
        "head": runner.head,
        "attention": runner.attention,
        "images_encoded_per_step": int(timed[0].pixel_values.shape[0]),
        "pairs": shape.num_pairs,
        "step_time_s": step_time,
        "step_times_s": times,
        "pairs_per_s": shape.num_pairs / step_time,
        "pairs_per_s_overall": shape.num_pairs * len(times) / sum(times),
        "tokens_per_s": statistics.mean(sequence_tokens) / step_time,
        # CPU seconds of this process, all its threads together.
        "step_cpu_s": statistics.median(cpu_times),
        "step_cpu_times_s": cpu_times,
        # About the thread count when the step had the cores to itself, nearer 1 when other work took a core.
        "cpu_per_wall": statistics.median(c / t for c, t in zip(cpu_times, times, strict=True)),
        "threads": torch.get_num_threads(),
        "peak_bytes": reading.working_bytes(),
        "peak_bytes_without_grads": reading.working_bytes(grads),
        "cuda_peak_bytes": cuda_peak,
        "grad_bytes": sum(g.untyped_storage().nbytes() for g in grads if g is not None),
        "weights_bytes": sum(p.untyped_storage().nbytes() for p in runner.model.parameters()),
        "optimizer_state_bytes": state_bytes,
        "profiled_step": profiled,
        "rss_ready_bytes": rss_ready,
        "rss_peak_bytes": rss_peak,
        "rss_extra_bytes": rss_peak - rss_ready,
        "layout_tokens_mean": mean_tokens,
        "sequence_tokens_mean": statistics.mean(sequence_tokens),
        # Pad tokens over the layout's tokens (only the padded layout pads; prefix sharing holds fewer tokens than the
        # sequences have, which is not padding).
        "padding_fraction": statistics.mean(
            float(1 - b.attention_mask.float().mean()) if isinstance(b, PaddedBatch) else 0.0 for b in timed),
        "scored_tokens_mean": statistics.mean(scored),
        "logits_rows": round(mean_tokens) if runner.head == "full_logits" else max(
            16, CHUNK_ELEMENTS // shape.vocab_size),
        "matmul_gflops_per_step": {part: value / 1e9 for part, value in flops.items()},
        "model_tflop_per_step": model_flops / 1e12,
        "model_tflop_per_s": model_flops / step_time / 1e12,
        "losses": losses,
        "device": device.type,
        "device_name": _device_name(device),
        "dtype": dtype,
        # Other work on a shared machine slows a provider down; the load average over the last minute says how much.
        "load_average_1min": os.getloadavg()[0],
    }


def _skipped(provider: str, reason: str) -> dict:
    return {"provider": provider, "status": "skipped", "reason": reason, "pairs_per_s": None, "peak_bytes": None,
            "rss_peak_bytes": None}


def run_isolated(provider: str, shape: Shape, threads: int | None = None, device: str = "cpu",
                 dtype: str = "fp32") -> dict:
    """run_provider in a fresh process of this module (with `threads` torch threads, else torch's default); a failure
    becomes a skipped record with the reason."""
    if provider == TRL and trl_missing_reason() is not None:
        return _skipped(provider, f"{provider} skipped: {trl_missing_reason()}")
    worker = {"provider": provider, "threads": threads, "device": device, "dtype": dtype, **asdict(shape)}
    command = [sys.executable, "-m", "bench.end_to_end", "--worker", json.dumps(worker)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    reason = lines[-1] if lines else f"exit status {done.returncode}"
    return _skipped(provider, f"{provider} failed: {reason}")


def best_round(rounds: list[dict]) -> dict:
    """The round with the shortest median step among a provider's measured rounds, with every round's median.

    Other work on a shared machine only ever slows a run down, so the fastest round is the least disturbed one.
    """
    measured = [r for r in rounds if r["status"] == "ok"]
    if not measured:
        return rounds[0]
    best = min(measured, key=lambda r: r["step_time_s"])
    return {**best, "rounds": len(rounds), "round_step_times_s": [r["step_time_s"] for r in measured]}


def shape_fields(shape: Shape, examples: list[list[PreferenceExample]]) -> dict:
    """The shape of a run as stored in every record: sizes, and the token counts its data actually has."""
    pairs = [e for batch in examples[shape.warmup:] for e in batch]
    responses = [ids.shape[0] - e.prompt_length for e in pairs for ids in (e.chosen_input_ids, e.rejected_input_ids)]
    return {
        **asdict(shape),
        "num_heads": shape.num_heads,
        "intermediate_size": shape.intermediate_size,
        "image_tokens_per_sequence": shape.num_image_tokens,
        "prompt_text_tokens_mean": statistics.mean(e.prompt_length - shape.num_image_tokens for e in pairs),
        "response_tokens": {"min": min(responses), "mean": statistics.mean(responses), "max": max(responses)},
        "chosen_minus_rejected_abs_mean": statistics.mean(
            abs(e.chosen_input_ids.shape[0] - e.rejected_input_ids.shape[0]) for e in pairs),
    }


def _ratio(value: float | None, peer: float | None) -> float | None:
    return None if value is None or not peer else value / peer


def add_projections(records: list[dict], shape: Shape, num_batches: int = PROJECTION_BATCHES) -> None:
    """Adds to each measured record its step projected to LLaVA-1.5-7B's shapes (bench/projection.py), averaged over
    num_batches micro-batches of P pairs drawn as the run draws its own (so the run's micro-batches come first)."""
    generator = torch.Generator().manual_seed(shape.seed)
    providers = [r["provider"] for r in records if r["status"] == "ok"]
    collates = {provider: make_collate(provider) for provider in providers}
    steps = {provider: [] for provider in providers}
    for index in range(num_batches):
        examples = [synthetic_pair(shape, generator, f"synthetic:{index * shape.num_pairs + k}")
                    for k in range(shape.num_pairs)]
        for provider in providers:
            head = "full_logits" if provider == BASELINE else "fused"
            steps[provider].append(project_step(collates[provider](examples), head))
    for record in records:
        if record["status"] == "ok":
            record["projection"] = mean_projection(steps[record["provider"]])


def _projected_flops(record: dict) -> float | None:
    return record["projection"]["flops"]["total"] if "projection" in record else None


def add_mfu(records: list[dict], peak_tflops: float) -> None:
    """Model FLOP utilisation of each measured record against a matmul peak measured in the same run."""
    for record in records:
        if record["status"] == "ok":
            record["matmul_peak_tflops"] = peak_tflops
            record["mfu"] = record["model_tflop_per_s"] / peak_tflops


def add_ratios_and_targets(records: list[dict]) -> None:
    """Adds ratios over the baseline, packed, dama_dpo and TRL to every measured record, and each provider's targets
    (on a GPU, the GPU targets)."""
    peers = {name: next((r for r in records if r["provider"] == provider), {})
             for name, provider in (("baseline", BASELINE), ("packed", PACKED), ("dpo", DPO), ("trl", TRL))}
    for record in records:
        if record["status"] != "ok":
            continue
        record["ratios"] = {}
        for name, peer in peers.items():
            record["ratios"].update({
                f"pairs_per_s_vs_{name}": _ratio(record["pairs_per_s"], peer.get("pairs_per_s")),
                f"cpu_s_per_step_vs_{name}": _ratio(record["step_cpu_s"], peer.get("step_cpu_s")),
                f"peak_vs_{name}": _ratio(record["peak_bytes"], peer.get("peak_bytes")),
                f"rss_peak_vs_{name}": _ratio(record["rss_peak_bytes"], peer.get("rss_peak_bytes")),
                f"rss_extra_vs_{name}": _ratio(record["rss_extra_bytes"], peer.get("rss_extra_bytes")),
                # How many times fewer FLOPs this provider's step needs at LLaVA-1.5-7B's shapes (projected).
                f"projected_flops_fewer_vs_{name}": _ratio(_projected_flops(peer), _projected_flops(record)),
                f"cuda_peak_vs_{name}": _ratio(record.get("cuda_peak_bytes"), peer.get("cuda_peak_bytes")),
            })
        record["ratios"]["mfu"] = record.get("mfu")
        record["targets"] = []
        for provider, key, limit, label, at_least in GPU_TARGETS if record.get("device") == "cuda" else TARGETS:
            if provider != record["provider"]:
                continue
            value = record["ratios"][key]
            met = None if value is None else (value >= limit if at_least else value <= limit)
            record["targets"].append({"target": label, "ratio": key, "value": value, "limit": limit, "met": met})


def environment() -> dict:
    """Versions and the commit, stored in every record."""
    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        **git_state(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.end_to_end", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="hidden size 128, 1 warm-up + 2 timed steps and 1 round unless given: the smoke run, "
                             "under 2 minutes on 2 cores")
    parser.add_argument("--pairs", type=int, default=Shape.num_pairs,
                        help=f"pairs per micro-batch, P (S = 2P sequences; default {Shape.num_pairs})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed training steps per provider after the warm-up; the median is reported "
                             f"(default {Shape.steps}, 2 with --quick)")
    parser.add_argument("--hidden-size", type=int, default=None,
                        help=f"hidden size of the language model, head dim {HEAD_DIM} (default {Shape.hidden_size}, "
                             "128 with --quick; LLaVA-1.5-7B has 4096)")
    parser.add_argument("--layers", type=int, default=Shape.num_layers,
                        help=f"decoder layers of the language model (default {Shape.num_layers}; LLaVA-1.5-7B has 32)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed training steps before the timed ones (default {Shape.warmup}, 1 with --quick): "
                             "the first step maps its memory in for the first time")
    parser.add_argument("--rounds", type=int, default=None,
                        help="fresh processes per provider, alternating between the providers; the round with the "
                             "shortest median step is kept, since other work on a shared machine only slows a run "
                             "down (default 2, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of each provider's process (default: torch's, one per core). On a "
                             "machine shared with other jobs, 1 keeps the CPU s/step column a measure of the work "
                             "done, free of the waits of threads that another job descheduled")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM,
                        help=f"head dimension; heads = hidden size / head dim (default {HEAD_DIM}; LLaVA-1.5-7B: 128)")
    parser.add_argument("--vocab-size", type=int, default=Shape.vocab_size,
                        help=f"vocabulary of the language model (default {Shape.vocab_size}; llava-1.5-7b-hf: 32064)")
    parser.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS, default=list(ALL_PROVIDERS),
                        help="providers to run (default all; trl_dpo is skipped with its reason when trl is absent)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the steps run (default cpu); cuda also measures the bf16 matmul peak for the "
                             "model FLOP utilisation")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights and compute dtype (default fp32 on the CPU, bf16 on cuda)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"JSON file for the records; the chart goes next to it with a .png suffix (default "
                             f"{DEFAULT_OUTPUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--worker", metavar="JSON", default=None,
                        help="internal: measure the one provider and shape given as JSON in this process and print "
                             "its record as JSON; the main run starts one such process per provider")
    args = parser.parse_args(argv)
    for name in ("pairs", "steps", "hidden_size", "layers", "rounds", "threads", "head_dim", "vocab_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device == "cuda" and args.worker is None and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch here")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        fields = json.loads(args.worker)
        provider, threads = fields.pop("provider"), fields.pop("threads")
        device, dtype = fields.pop("device"), fields.pop("dtype")
        if threads is not None:
            torch.set_num_threads(threads)
        print(json.dumps(run_provider(provider, Shape(**fields), device, dtype)))
        return

    shape = Shape(
        num_pairs=args.pairs,
        hidden_size=args.hidden_size or (128 if args.quick else Shape.hidden_size),
        num_layers=args.layers,
        steps=args.steps or (2 if args.quick else Shape.steps),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else Shape.warmup),
        head_dim=args.head_dim,
        vocab_size=args.vocab_size,
    )
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    rounds = args.rounds or (1 if args.quick else 2)
    started = time.perf_counter()
    env = environment()
    fields = shape_fields(shape, micro_batches(shape))
    runs = {provider: [] for provider in (BASELINE, PACKED, "dama_prefix_shared", DPO, TRL)
            if provider in args.providers}
    for round_index in range(rounds):
        for provider, provider_runs in runs.items():
            record = run_isolated(provider, shape, args.threads, args.device, dtype)
            provider_runs.append(record)
            shown = (f"{record['pairs_per_s']:.3f} pairs/s, {record['peak_bytes'] / MIB:.0f} MiB, load "
                     f"{record['load_average_1min']:.1f}" if record["status"] == "ok" else record["reason"])
            print(f"round {round_index + 1}/{rounds}, {provider}: {shown}", file=sys.stderr, flush=True)
    records = [{**best_round(provider_runs), "shape": fields} for provider_runs in runs.values()]
    add_projections(records, shape)
    if args.device == "cuda":
        add_mfu(records, matmul_peak_tflops(torch.device("cuda"), DTYPES[dtype]))
    add_ratios_and_targets(records)
    records = [{**record, **env} for record in records]

    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial_path = args.output.with_name(args.output.name + ".tmp")
    partial_path.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(partial_path, args.output)
    chart = args.output.with_suffix(".png")
    write_chart(records, chart, BASELINE)

    print(format_table(records))
    measured = {r["provider"]: r["projection"] for r in records if r["status"] == "ok"}
    if {PACKED, BASELINE} <= measured.keys():
        print(format_projection(measured, shape.num_pairs, PACKED, BASELINE))
    print(format_targets(records))
    print(f"{args.device} ({dtype}), H {shape.hidden_size}, {shape.num_layers} layers, P {shape.num_pairs}, "
          f"{shape.warmup} + {shape.steps} "
          f"steps, best of {rounds} rounds, {records[0].get('threads', '?')} threads; "
          f"{time.perf_counter() - started:.0f} s; torch {env['torch']}, transformers {env['transformers']}, commit "
          f"{env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}; records in {args.output}, chart in {chart}")


if __name__ == "__main__":
    main()

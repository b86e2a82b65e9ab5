"""`dama plan`: a training config's predicted peak GPU memory, part by part, before loading anything but config.json.

    dama plan --config configs/llava15_7b_dama_lora_24gb.yaml --gpu-memory 24GiB [--num-gpus N] [--field value ...]

Reads the config exactly as `dama train` does (YAML, then any `dama train` field on the command line), the model's
config.json (never its weights) and the DeepSpeed JSON, and prints what one GPU holds at the step's peak: weights
(trained and frozen, by dtype), gradients, optimizer state, the decoder layers' activations (for the layout, with or
without activation checkpointing), the head (fused or full logits), the vision tower and projector, the reference
model (online) and the allocator's slack. It says whether the config fits; when not, the largest
max_tokens_per_batch that does and which switches would make it fit, cheapest in step time first.

The micro-batch planned for is the largest the config makes: max_tokens_per_batch tokens (pairs of
--prompt-tokens + --response-tokens per sequence counted to fill it), or per_device_train_batch_size pairs whose
sequences all reach max_length. The activation sizes are validated against allocator measurements on the CPU
(bench/memory_plan.py); the GPU's allocator slack and CUDA context are assumptions, given as options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dama.command import run_command
from dama.errors import DamaError
from dama.option_loader import build, read_options
from dama.options import check_at_least
from dama.training.arguments import DamaTrainingArguments, training_arguments

from .advice import evaluate_switches, largest_fitting
from .checkpoint_size import checkpoint_size, describe_checkpoint_size
from .memory_plan import PARTS, BatchShape, MemoryPlan, TrainingSetup, plan_memory
from .model_shape import ModelShape, read_model_shape
from .setup import largest_batch, training_setup

GIB = 1 << 30
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20,
         "gib": 1 << 30, "tib": 1 << 40}
# Architectures shipped with the project, for planning before the weights are downloaded.
SHIPPED_MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"
PROMPT_TOKENS = 60  # RLAIF-V's prompts: the conversation template's ~44 tokens and a short question
RESPONSE_TOKENS = 150


def parse_bytes(text: str) -> int:
    """'24GiB', '80 GB', '16g' (GiB), '1.5TiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    unit = {"k": "kib", "m": "mib", "g": "gib", "t": "tib"}.get(unit, unit)
    if not match or unit not in UNITS:
        raise DamaError(f"not a memory size: {text!r}; write e.g. 24GiB, 80GB or 16g")
    return int(float(match.group(1)) * UNITS[unit])


@dataclass
class PlanOptions:
    """What `dama plan` plans for, beside the training config."""

    gpu_memory: str | None = field(default=None, metadata={"help": "Memory of one GPU, e.g. 24GiB, 16GiB, 80GiB."})
    num_gpus: int = field(
        default=1, metadata={"help": "GPUs the run spreads over (ZeRO partitions over them; each holds its own "
                             "micro-batch)."})
    model_config: str | None = field(
        default=None, metadata={"help": "The model's config.json (default: <model_name_or_path>/config.json, else "
                                "the architecture shipped in configs/models/<folder name>/)."})
    prompt_tokens: int = field(default=PROMPT_TOKENS, metadata={"help": "Text tokens of a prompt, image tokens apart."})
    response_tokens: int = field(
        default=RESPONSE_TOKENS, metadata={"help": "Tokens of a typical response; with a token budget it sets how "
                                           "many pairs fill it."})
    fragmentation: float = field(
        default=0.10, metadata={"help": "Allocator slack as a fraction of the tensors' peak (an assumption)."})
    context_memory: str = field(
        default="1GiB", metadata={"help": "CUDA context, cuBLAS workspaces and NCCL buffers outside the allocator "
                                  "(an assumption)."})

    def __post_init__(self) -> None:
        if not self.gpu_memory:
            raise DamaError("--gpu-memory is required: the memory of one GPU, e.g. 24GiB")
        check_at_least("num_gpus", self.num_gpus, 1)
        check_at_least("response_tokens", self.response_tokens, 1)
        check_at_least("prompt_tokens", self.prompt_tokens, 0)
        if not 0 <= self.fragmentation < 10:
            raise DamaError(f"fragmentation is a fraction of the peak, e.g. 0.1; got {self.fragmentation}")


def parse_options(argv: list[str] | None = None) -> tuple[PlanOptions, DamaTrainingArguments]:
    """The plan's options and the training config, read as `dama train` reads it but for another machine."""
    values = read_options("dama plan", [PlanOptions, DamaTrainingArguments], argv, __doc__,
                          epilog="Every other option is a `dama train` field (dama train --help), e.g. "
                          "--max_tokens_per_batch 4096 --lora_rank 64.")
    return build(PlanOptions, values), training_arguments(values, check_devices=False)


def model_shape_for(args: DamaTrainingArguments, model_config: str | None) -> tuple[ModelShape, str]:
    """The model's shape and where it was read from."""
    if model_config:
        path = Path(model_config)
        folder = path.parent if path.name == "config.json" else path
        return read_model_shape(folder), str(folder / "config.json")
    if not args.model_name_or_path:
        raise DamaError("the config names no model_name_or_path: set it or pass --model-config")
    folder = Path(args.model_name_or_path)
    if (folder / "config.json").is_file():
        return read_model_shape(folder), str(folder / "config.json")
    shipped = SHIPPED_MODELS / folder.name
    if (shipped / "config.json").is_file():
        return read_model_shape(shipped), f"{_shown(shipped / 'config.json')} (no {folder / 'config.json'} yet)"
    raise DamaError(f"no {folder / 'config.json'}: download the model first or pass --model-config")


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def _millions(count: int) -> str:
    return f"{count / 1e6:,.1f} M" if count < 1e9 else f"{count / 1e9:.2f} B"


def describe_setup(shape: ModelShape, setup: TrainingSetup, batch: BatchShape) -> list[str]:
    precision = setup.precision
    dtype = {4: "fp32", 2: "16-bit"}
    trained = []
    if setup.train_language_model:
        full = shape.language_model_params() + shape.lm_head_params()
        trained.append(f"language model + lm_head ({_millions(full)})")
    if setup.lora_rank:
        trained.append(f"LoRA r={setup.lora_rank} ({_millions(shape.lora_params(setup.lora_rank))})")
    if setup.train_projector:
        trained.append(f"projector ({_millions(shape.projector_params())})")
    if setup.train_vision_tower:
        trained.append(f"vision tower ({_millions(shape.vision_tower_params())})")
    compute = f"{dtype[precision.weight_bytes]} weights"
    if setup.trained_bytes != precision.weight_bytes:
        compute += f", trained ones {dtype[setup.trained_bytes]}"
    if precision.casts or setup.trained_bytes > precision.compute_bytes:
        compute += ", 16-bit autocast"
    engine = "no DeepSpeed" if setup.zero_stage is None else (
        f"DeepSpeed ZeRO-{setup.zero_stage}" + (", optimizer offload" if setup.offload_optimizer else "")
        + (", parameter offload" if setup.offload_params else ""))
    attention = {"varlen": "FlashAttention-2 varlen", "segments": "exact per-sequence SDPA", "padded": "sdpa with mask"}
    return [
        f"model: {_millions(shape.total_params())} parameters (vision tower {_millions(shape.vision_tower_params())}, "
        f"projector {_millions(shape.projector_params())}, language model {_millions(shape.language_model_params())}, "
        f"lm_head {_millions(shape.lm_head_params())}); {shape.num_layers} layers, H {shape.hidden_size}, "
        f"V {shape.vocab_size}, {shape.image_tokens} image tokens",
        f"trains: {', '.join(trained)}; {compute}; {setup.optimizer}; {engine}",
        f"step: {setup.layout} layout, {setup.head} head ({setup.head_kernel}), {attention[setup.attention]}, "
        f"reference {setup.reference}, activation checkpointing {'on' if setup.activation_checkpointing else 'off'}",
        f"micro-batch: {batch.pairs} pairs, {batch.tokens} tokens in the layout, {batch.scored} scored",
    ]


def format_plan(plan: MemoryPlan, gpu_bytes: int, budget: int, fragmentation: float, context: int) -> str:
    rows = ["| part | GiB |", "|---|---:|"]
    rows += [f"| {part} | {_gib(plan.parts[part])} |" for part in PARTS if plan.parts.get(part)]
    rows.append(f"| **tensors at the peak** ({plan.peak_moment}) | **{_gib(plan.peak_bytes)}** |")
    rows.append(f"| allocator slack ({fragmentation:.0%} of the peak, assumed) | "
                f"{_gib(int(plan.peak_bytes * fragmentation))} |")
    rows.append(f"| CUDA context and libraries (assumed) | {_gib(context)} |")
    verdict = "fits" if gpu_bytes <= budget else "does NOT fit"
    rows.append(f"| **total per GPU** | **{_gib(gpu_bytes)}** of {_gib(budget)}: {verdict} |")
    return "\n".join(rows)


def run_plan(argv: list[str] | None = None) -> str:
    plan_args, args = parse_options(argv)
    shape, source = model_shape_for(args, plan_args.model_config)
    budget = parse_bytes(plan_args.gpu_memory)
    context = parse_bytes(plan_args.context_memory)
    setup = training_setup(args, shape, num_gpus=plan_args.num_gpus)
    data = dict(prompt_text=plan_args.prompt_tokens, response=plan_args.response_tokens)

    def batch_for(candidate: TrainingSetup, tokens: int | None = None) -> BatchShape:
        return largest_batch(args, shape, layout=candidate.layout, max_tokens_per_batch=tokens, **data)

    def gpu_bytes(plan: MemoryPlan) -> int:
        return plan.gpu_bytes(plan_args.fragmentation, context)

    batch = batch_for(setup)
    plan = plan_memory(shape, setup, batch)
    total = gpu_bytes(plan)
    lines = [f"dama plan: {plan_args.num_gpus} GPU(s) of {_gib(budget)} GiB; model from {source}",
             *describe_setup(shape, setup, batch), "", format_plan(plan, total, budget, plan_args.fragmentation,
                                                                  context)]
    lines.insert(-2, describe_checkpoint_size(checkpoint_size(shape, setup), args.save_total_limit))
    lines += [f"note: {note}" for note in plan.notes]
    if setup.layout != "padded":
        one_pair = batch_for(setup, 1).tokens  # a budget below one pair still holds that pair

        def fits_at(tokens: int) -> bool:
            return gpu_bytes(plan_memory(shape, setup, batch_for(setup, max(tokens, one_pair)))) <= budget

        largest = largest_fitting(fits_at, one_pair, 1 << 20)
        lines.append("")
        lines.append(f"largest max_tokens_per_batch that fits: {largest}" if largest else
                     f"not even one pair ({one_pair} tokens) fits as configured")
    if total > budget:
        alone, cumulative = evaluate_switches(shape, setup, batch_for, gpu_bytes, budget)
        lines += ["", "switches, cheapest in step time first (each alone, same micro-batch):"]
        lines += [f"- {o.switch.name}: {_gib(o.gpu_bytes)} GiB ({'fits' if o.fits else 'not enough'}); set "
                  f"{o.switch.config}; speed: {o.switch.speed_cost}" for o in alone]
        if cumulative:
            lines += ["together, in that order:"]
            lines += [f"- + {o.switch.name}: {_gib(o.gpu_bytes)} GiB ({'fits' if o.fits else 'not enough'})"
                      for o in cumulative]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_command("plan", lambda: run_plan(argv))

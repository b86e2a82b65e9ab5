"""`dama plan` against measurement: the predicted peak working memory of a training step beside the one measured by
bench/memory.py's allocator replay, on the CPU, for configurations of a small LLaVA.

Each case builds what `dama train` builds (dama.training.train.prepare_models: freezing or LoRA, the policy, the
online reference) around a small LLaVA-1.5 (bench/end_to_end.py's: CLIP at 336 px / patch 14 so 576 image tokens per
image, V 32000, H 256, decoder layers as the case says), a DamaTrainer with the case's arguments, and synthetic pairs
of LLaVA-1.5's lengths (bench/end_to_end.py). It runs one warm-up step (so the optimizer state exists), clears the
gradients as the Trainer does between steps, then measures one more step - DamaTrainer.training_step (reference,
forward, DAMA loss, backward, under the Trainer's autocast) and the optimizer step - under the allocator replay.

Compared: working memory, the most tensor bytes live at once during the step beyond what stays allocated between
steps (weights, optimizer state, the batch); the plan's figure is the same quantity (MemoryPlan.working_bytes) for
the same batch (its token, scored-token and pair counts) and the same arguments read through
dama.planning.setup.training_setup(device="cpu"): the CPU's attention (exact per-segment SDPA) and head kernel
(chunked torch). Totals (with weights and optimizer state) are stored too; they match to the byte, since weights
and optimizer state are counted, not estimated. Each case runs in a fresh process of this module.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .environment import REPO_ROOT, git_state

DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "memory_plan.json"
TOLERANCE = 0.15
MIB = 1 << 20


@dataclass(frozen=True)
class Case:
    """One configuration: the small LLaVA's depth, the micro-batch's pairs and the training options."""

    name: str
    layers: int = 2
    pairs: int = 4
    layout: str = "packed"  # explicit: the training default is prefix_shared
    head: str = "fused"
    checkpointing: bool = False
    lora_rank: int = 0
    reference: str = "precomputed"
    model_dtype: str = "float32"
    bf16: bool = False
    freeze_projector: bool = False
    freeze_language_model: bool = False
    hidden_size: int = 256


CASES = (
    Case("full, 2 layers, 1 pair", pairs=1),
    Case("full, 2 layers"),
    Case("full, 4 layers, checkpointing", layers=4, checkpointing=True),
    Case("full, full-logits head", head="full_logits"),
    Case("full, padded, full-logits head", layout="padded", head="full_logits"),
    Case("LoRA, 4 layers", layers=4, lora_rank=16),
    Case("LoRA, 4 layers, checkpointing", layers=4, lora_rank=16, checkpointing=True),
    Case("LoRA, 4 layers, padded", layers=4, lora_rank=16, layout="padded"),
    Case("LoRA, 4 layers, prefix-shared", layers=4, lora_rank=16, layout="prefix_shared"),
    Case("full, 2 layers, prefix-shared", layout="prefix_shared"),
    Case("LoRA, 4 layers, online reference", layers=4, lora_rank=16, reference="online"),
    Case("projector only, 4 layers", layers=4, freeze_language_model=True),
    Case("full, fp32 weights + bf16 autocast", bf16=True),
    Case("LoRA, bf16 weights + autocast, checkpointing", layers=4, lora_rank=16, checkpointing=True,
         model_dtype="bfloat16", bf16=True),
)
QUICK = ("full, 2 layers, 1 pair", "LoRA, 4 layers, checkpointing", "full, full-logits head")


def training_argv(case: Case, output_dir: str) -> list[str]:
    """The `dama train` arguments of a case (the model and data are built here, not read from files)."""
    attention = "sdpa" if case.layout == "padded" else "packed"
    flag = {True: "true", False: "false"}
    return ["--output_dir", output_dir, "--use_cpu", "true", "--report_to", "none", "--data_aware", "false",
            "--layout", case.layout, "--attention", attention, "--head", case.head, "--reference", case.reference,
            "--lora_rank", str(case.lora_rank), "--freeze_projector", flag[case.freeze_projector],
            "--freeze_language_model", flag[case.freeze_language_model or case.lora_rank > 0],
            "--activation_checkpointing", flag[case.checkpointing], "--model_dtype", case.model_dtype,
            "--bf16", flag[case.bf16], "--learning_rate", "1e-6", "--seed", "0"]


def measure_case(case: Case) -> dict:
    """Builds the case, measures one training step's working memory and predicts it; returns the record."""
    from transformers import LlavaForConditionalGeneration

    from dama.data.collator import make_collator
    from dama.method.loss import DamaLoss
    from dama.planning.memory_plan import BatchShape, plan_memory
    from dama.planning.model_shape import ModelShape
    from dama.planning.setup import training_setup
    from dama.training.arguments import parse_training_arguments
    from dama.training.train import prepare_models
    from dama.training.trainer import DamaTrainer

    from .end_to_end import PAD_ID, Shape, llava_config, micro_batches
    from .memory import track_peak

    shape = Shape(num_pairs=case.pairs, hidden_size=case.hidden_size, num_layers=case.layers, steps=1, warmup=1)
    config = llava_config(shape)
    torch.manual_seed(shape.seed)
    llava = LlavaForConditionalGeneration(config).to(getattr(torch, case.model_dtype)).train()
    args = parse_training_arguments(training_argv(case, tempfile.mkdtemp(prefix="memory_plan_")))
    policy, ref_policy, adapters = prepare_models(args, llava)
    collate = make_collator(case.layout, PAD_ID)
    examples = micro_batches(shape)
    trainer = DamaTrainer(model=policy, dama_loss=DamaLoss(args, hardness_mean=0.0), ref_policy=ref_policy,
                          adapters=adapters, args=args, train_dataset=[e for pairs in examples for e in pairs],
                          data_collator=collate)
    if case.checkpointing:
        policy.activation_checkpointing_enable()  # what Trainer.train() does first
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    # As Trainer.train(): accelerate wraps the forward in the mixed-precision autocast (--bf16).
    policy = trainer.accelerator.prepare_model(policy)
    warmup, measured = (collate(pairs) for pairs in examples)

    def step(batch) -> None:
        trainer.training_step(policy, batch)
        trainer.optimizer.step()
        policy.zero_grad(set_to_none=True)  # as the Trainer does after each optimizer step

    step(warmup)
    gc.collect()
    with track_peak(torch.device("cpu")) as reading:
        step(measured)
    measured_bytes = reading.working_bytes()
    resident = sum(p.untyped_storage().nbytes() for p in trainer.model.parameters())
    if ref_policy is not None:
        resident += sum(p.untyped_storage().nbytes() for p in ref_policy.parameters())
    resident += sum(t.untyped_storage().nbytes() for state in trainer.optimizer.state.values()
                    for t in state.values() if isinstance(t, torch.Tensor))

    model_shape = ModelShape.from_config(config)
    batch = BatchShape(pairs=case.pairs, tokens=measured.input_ids.numel(),
                       scored=measured.supervised_positions.numel(), image_slots=int(measured.image_index.numel()),
                       longest=measured.input_ids.shape[1] if case.layout == "padded" else 0,
                       **(prefix_shared_fields(measured) if case.layout == "prefix_shared" else {}))
    plan = plan_memory(model_shape, training_setup(args, model_shape, device="cpu"), batch)
    return {
        "config": asdict(case),
        "predicted_bytes": plan.working_bytes,
        "measured_bytes": measured_bytes,
        "ratio": plan.working_bytes / measured_bytes,
        "within_tolerance": abs(plan.working_bytes / measured_bytes - 1) <= TOLERANCE,
        "predicted_total_bytes": plan.peak_bytes,
        "measured_total_bytes": measured_bytes + resident,
        "predicted_resident_bytes": plan.persistent_bytes,
        "measured_resident_bytes": resident,
        "predicted_peak_moment": plan.peak_moment,
        "predicted_parts_at_peak": plan.parts,
        "tokens": batch.tokens,
        "scored_tokens": batch.scored,
        "device": "cpu",
    }


def prefix_shared_fields(batch) -> dict:
    """A PrefixSharedBatch's keys gathered beyond its row and its bottom-right masks' elements (segments with more
    keys than queries)."""
    queries, keys = batch.cu_seqlens.diff().long(), batch.cu_seqlens_k.diff().long()
    return {"shared_keys": batch.key_index.numel() - batch.input_ids.numel(),
            "segment_mask_elements": int((queries * keys)[queries != keys].sum())}


def run_isolated(case: Case) -> dict:
    """measure_case in a fresh process; a failure becomes a record with the reason."""
    command = [sys.executable, "-m", "bench.memory_plan", "--worker", json.dumps(asdict(case))]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return {"config": asdict(case), "status": "failed", "reason": lines[-1] if lines else str(done.returncode)}


def format_table(records: list[dict]) -> str:
    header = ["configuration", "tokens", "measured MiB", "predicted MiB", "predicted / measured", "peak (plan)"]
    rows = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|---|"]
    for r in records:
        if "measured_bytes" not in r:
            rows.append(f"| {r['config']['name']} | failed: {r['reason']} |")
            continue
        mark = "" if r["within_tolerance"] else " (outside ±15%)"
        rows.append(f"| {r['config']['name']} | {r['tokens']} | {r['measured_bytes'] / MIB:.1f} | "
                    f"{r['predicted_bytes'] / MIB:.1f} | {r['ratio']:.3f}{mark} | {r['predicted_peak_moment']} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} cases: {', '.join(QUICK)}")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"JSON file for the records (default {DEFAULT_OUTPUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--worker", metavar="JSON", default=None,
                        help="internal: measure the one case given as JSON in this process and print its record")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure_case(Case(**json.loads(args.worker)))))
        return
    cases = [c for c in CASES if c.name in QUICK] if args.quick else list(CASES)
    started, records = time.perf_counter(), []
    for index, case in enumerate(cases):
        records.append(run_isolated(case))
        shown = records[-1].get("ratio")
        print(f"{index + 1}/{len(cases)} {case.name}: "
              f"{'failed' if shown is None else f'predicted / measured {shown:.3f}'}", file=sys.stderr, flush=True)
    environment = {"torch": torch.__version__, **git_state()}
    records = [{**record, **environment} for record in records]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".tmp")
    partial.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(partial, args.output)
    print(format_table(records))
    within = sum(bool(r.get("within_tolerance")) for r in records)
    print(f"{within} of {len(records)} within ±{TOLERANCE:.0%}; {time.perf_counter() - started:.0f} s; records in "
          f"{args.output}")


if __name__ == "__main__":
    main()

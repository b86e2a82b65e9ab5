"""`dama demo`: RLAIF-V's recipe in miniature on a CPU, then DAMA and plain DPO side by side, from nothing.

Steps, all under --output-dir (default outputs/demo):
  1. the demo world (`dama.demo.world`): drawn objects with a co-occurrence prior; a supervised split whose captions
     sometimes name an absent partner object (data/sft.parquet), the images the pairs are made on
     (data/train.parquet) and held-out images (data/eval.parquet), each with a COCO-format instances file;
  2. the start model: a tiny random LLaVA given a supervised stage on the captions, vision tower included (model/),
     standing in for LLaVA-1.5; it learns to see the objects, and to name a partner that is not there;
  3. `dama make-pairs` with the start model on the train and held-out images: K sampled answers per image judged by
     CHAIR against the instances file, the best against the worst (data/*.pairs.parquet);
  4. a tiny CLIP (clip/) given a contrastive warm-up on the supervised images (a statement per drawn object against
     statements of absent ones), then hardness of the pairs (data/*.scored.parquet), and for comparison the hardness
     the random CLIP gave before its warm-up;
  5. reference log-probs with the start model (data/*.scored.ref.parquet);
  6. DAMA training (run/) and, from the same start on the same pairs with the same steps, plain DPO (run-dpo/:
     data_aware and model_aware off), each with its held-out reward accuracy;
  7. `dama generate` on the held-out images with the start, DPO and DAMA models (generations/), scored by
     `dama eval-chair`: CHAIR_s, CHAIR_i and object recall;
  8. the training table, curves.png, chair.png (the three models), a few answers, and summary.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dama.demo.data import instances_path
from dama.demo.hallucination import chair_before_after, chair_table, examples_table, hardness_report, plot_chair
from dama.demo.supervised import SupervisedSettings, supervised_fine_tune
from dama.demo.tiny_clip import build_tiny_clip, contrastive_warm_up
from dama.demo.tiny_llava import build_tiny_llava
from dama.demo.world import make_world_data, world_clip_examples, world_corpus
from dama.errors import DamaError
from dama.evaluation.make_pairs import MakePairsOptions, SamplingSettings, make_pairs
from dama.offline.hardness import HardnessOptions, compute_hardness
from dama.offline.reference import ReferenceOptions, precompute_reference
from dama.training.arguments import parse_training_arguments, resolved_config
from dama.training.run_folder import mark_complete, plan_run_folder
from dama.training.train import build_trainer, start_run

# Images per contrastive step of the tiny CLIP (fewer when the split is smaller).
CLIP_BATCH_SIZE = 32
REPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_demo.yaml"
TABLE_COLUMNS = (("step", "step"), ("loss", "loss"), ("rewards/accuracies", "reward acc"),
                 ("rewards/margins", "margin"), ("dama/beta_mean", "mean beta"), ("dama/alpha_model", "alpha_M"))
# The pairs' answers, sampled from the start model. At temperature 1 the tiny model's samples include broken
# sentences, which then become chosen answers too (fewest hallucinations) and teach broken sentences; at 0.7 they
# differ mostly where the model hesitates between what it sees and what the prior says.
DEMO_SAMPLING = SamplingSettings(samples=4, temperature=0.7, max_new_tokens=48)
# What turns DAMA's two strategies off: the loss is then exactly DPO's.
PLAIN_DPO = ("--data_aware", "false", "--model_aware", "false")
MODEL_NAMES = {"start": "start", "dpo": "DPO", "dama": "DAMA"}


@dataclass(frozen=True)
class DemoSizes:
    """How much data each stage sees."""

    num_sft: int = 2000
    num_train: int = 512
    num_eval: int = 200
    supervised: SupervisedSettings = SupervisedSettings()
    clip_steps: int = 200


def prepare_start_model(output_dir: Path, sizes: DemoSizes, seed: int) -> dict[str, Path]:
    """Steps 1-2; returns the world's parquet files by split."""
    data = make_world_data(output_dir / "data", {"sft": sizes.num_sft, "train": sizes.num_train,
                                                 "eval": sizes.num_eval}, seed=seed)
    build_tiny_llava(world_corpus(), output_dir / "model", seed=seed)
    steps = sizes.supervised.steps
    print(f"[demo] supervised stage of the tiny LLaVA ({steps} steps of {sizes.supervised.batch_size} captions)",
          flush=True)
    torch.manual_seed(seed)
    loss = supervised_fine_tune(output_dir / "model", data["sft"], sizes.supervised)
    print(f"[demo] supervised token loss {loss:.3f}", flush=True)
    return data


def prepare_pairs(output_dir: Path, data: dict[str, Path], seed: int) -> dict[str, Path]:
    """Step 3: the start model's own answers on the train and held-out images, paired by the CHAIR judge."""
    pairs = {}
    for split in ("train", "eval"):
        pairs[split] = data[split].with_name(f"{split}.pairs.parquet")
        sampling = SamplingSettings(**{**DEMO_SAMPLING.__dict__, "seed": seed})
        options = MakePairsOptions(input=data[split], output=pairs[split], model=output_dir / "model",
                                   annotations=[instances_path(data[split])], batch_size=64, device="cpu",
                                   overwrite=True)
        metadata = make_pairs(options, sampling, progress=False)
        print(f"[demo] make-pairs ({split}): {metadata['pairs']} pairs from {metadata['rows']} images "
              f"({metadata['skipped_by_reason'].get('all answers tie', 0)} whose {sampling.samples} answers tie); "
              f"hallucinated objects: chosen {metadata['chosen_hallucinated_mean']:.2f}, rejected "
              f"{metadata['rejected_hallucinated_mean']:.2f}", flush=True)
        if metadata["pairs"] == 0:
            raise DamaError(f"the start model's answers on every {split} image tie, so there are no pairs to train "
                            "on: give the supervised stage more --warm-up-steps, or more images")
    return pairs


def prepare_hardness(output_dir: Path, data: dict[str, Path], pairs: dict[str, Path], steps: int,
                     seed: int) -> tuple[dict[str, Path], dict]:
    """Step 4: the tiny CLIP and the pairs' hardness; returns the scored files and the hardness reports."""
    examples = world_clip_examples(data["sft"])
    corpus = [sentence for example in examples for sentence in (*example.true, *example.false)]
    clip = build_tiny_clip(output_dir / "clip", seed=seed, corpus=corpus)
    random_scored = output_dir / "cache" / "train.random_clip.scored.parquet"
    compute_hardness(HardnessOptions(input=pairs["train"], output=random_scored, clip=clip, device="cpu",
                                     overwrite=True))
    print(f"[demo] contrastive warm-up of the tiny CLIP ({steps} steps)", flush=True)
    loss = contrastive_warm_up(clip, examples, steps, batch_size=min(CLIP_BATCH_SIZE, len(examples)), seed=seed)
    print(f"[demo] CLIP warm-up loss {loss:.3f}", flush=True)
    scored = {}
    for split, path in pairs.items():
        scored[split] = path.with_name(f"{split}.scored.parquet")
        # Each demo run makes its data and models afresh: its earlier outputs are replaced.
        compute_hardness(HardnessOptions(input=path, output=scored[split], clip=clip, device="cpu", overwrite=True))
    annotations = instances_path(data["train"])
    return scored, {"random_clip": hardness_report(random_scored, annotations),
                    "warmed_up_clip": hardness_report(scored["train"], annotations)}


def prepare_reference(output_dir: Path, scored: dict[str, Path]) -> dict[str, Path]:
    """Step 5."""
    ready = {}
    for split, path in scored.items():
        print(f"[demo] reference log-probs ({split})", flush=True)
        ready[split] = path.with_name(f"{split}.scored.ref.parquet")
        precompute_reference(ReferenceOptions(input=path, output=ready[split], model=output_dir / "model",
                                              cache_dir=output_dir / "cache", device="cpu", overwrite=True))
    return ready


def train(output_dir: Path, run_dir: Path, inputs: dict[str, Path], seed: int,
          extra_args: list[str]) -> dict[str, Any]:
    """Step 6 for one method: train from the start model; returns the evaluations before and after and the log."""
    args = parse_training_arguments([
        "--config", str(REPO_CONFIG), "--output_dir", str(run_dir),
        "--model_name_or_path", str(output_dir / "model"), "--train_file", str(inputs["train"]),
        "--eval_file", str(inputs["eval"]), "--seed", str(seed), "--overwrite_output_dir", "true", *extra_args,
    ])
    plan = plan_run_folder(args.output_dir, resolved_config(args), resume=args.resume,
                           overwrite=args.overwrite_output_dir)
    trainer = build_trainer(args)
    start_run(args, plan, trainer)
    before = trainer.evaluate()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = trainer.evaluate()
    trainer.save_model(args.output_dir)
    trainer.save_state()
    mark_complete(args.output_dir, trainer.state.global_step)
    return {"before": before, "after": after, "seconds": seconds, "steps": trainer.state.global_step,
            "history": trainer.state.log_history}


def training_table(log_history: list[dict]) -> str:
    rows = [entry for entry in log_history if "loss" in entry and "rewards/accuracies" in entry]
    lines = ["  ".join(title.rjust(10) for _, title in TABLE_COLUMNS)]
    for entry in rows:
        lines.append("  ".join(f"{entry[key]:10.4g}" if key != "step" else f"{entry[key]:10d}"
                               for key, _ in TABLE_COLUMNS))
    return "\n".join(lines)


def plot_curves(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [entry for entry in log_history if "loss" in entry and "rewards/accuracies" in entry]
    steps = [entry["step"] for entry in rows]
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for axis, (key, title) in zip(axes, TABLE_COLUMNS[1:5], strict=True):
        axis.plot(steps, [entry[key] for entry in rows], marker=".")
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle("DAMA on the demo's own pairs (tiny LLaVA, CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_demo(output_dir: Path, sizes: DemoSizes, seed: int, extra_args: list[str]) -> dict:
    # A tiny model's matrices are too small to share between threads: one thread measured faster on 2 cores.
    torch.set_num_threads(1)
    started = time.perf_counter()
    data = prepare_start_model(output_dir, sizes, seed)
    pairs = prepare_pairs(output_dir, data, seed)
    scored, hardness = prepare_hardness(output_dir, data, pairs, sizes.clip_steps, seed)
    inputs = prepare_reference(output_dir, scored)
    print("[demo] DAMA training", flush=True)
    dama = train(output_dir, output_dir / "run", inputs, seed, extra_args)
    print("\n" + training_table(dama["history"]))
    plot_curves(dama["history"], output_dir / "curves.png")
    print("[demo] plain DPO training, same start, pairs and steps", flush=True)
    dpo = train(output_dir, output_dir / "run-dpo", inputs, seed, [*extra_args, *PLAIN_DPO])
    print("[demo] answering the held-out images with the start, DPO and DAMA models", flush=True)
    chair = chair_before_after(data["eval"], instances_path(data["eval"]),
                               {"start": output_dir / "model", "dpo": output_dir / "run-dpo",
                                "dama": output_dir / "run"}, output_dir / "generations")
    plot_chair(chair, output_dir / "chair.png", MODEL_NAMES)
    print("\nheld-out hallucination (CHAIR):\n" + chair_table(chair) + "\n\n" + examples_table(chair))
    before, after = dama["before"], dama["after"]
    summary = {
        "eval_reward_accuracy_before": before["eval_rewards/accuracies"],
        "eval_reward_accuracy": after["eval_rewards/accuracies"],
        "eval_reward_margin_before": before["eval_rewards/margins"],
        "eval_reward_margin": after["eval_rewards/margins"],
        "eval_loss_before": before["eval_loss"],
        "eval_loss": after["eval_loss"],
        "eval_chair_s_before": chair["start"]["chair_s"],
        "eval_chair_s": chair["dama"]["chair_s"],
        "eval_chair_i_before": chair["start"]["chair_i"],
        "eval_chair_i": chair["dama"]["chair_i"],
        "eval_object_recall_before": chair["start"]["recall"],
        "eval_object_recall": chair["dama"]["recall"],
        "dpo_eval_chair_s": chair["dpo"]["chair_s"],
        "dpo_eval_chair_i": chair["dpo"]["chair_i"],
        "dpo_eval_object_recall": chair["dpo"]["recall"],
        "dpo_eval_reward_accuracy": dpo["after"]["eval_rewards/accuracies"],
        "hardness_hallucination_correlation": hardness["warmed_up_clip"]["correlation"],
        "hardness_hallucination_correlation_random_clip": hardness["random_clip"]["correlation"],
        "hardness_mean_by_level": hardness["warmed_up_clip"]["mean_by_level"],
        "train_seconds": dama["seconds"],
        "dpo_train_seconds": dpo["seconds"],
        "steps": dama["steps"],
        "train_pairs": hardness["warmed_up_clip"]["pairs"],
        "eval_pairs": json.loads(Path(f"{pairs['eval']}.meta.json").read_text())["pairs"],
        "train_images": sizes.num_train,
        "eval_images": sizes.num_eval,
        "seed": seed,
        "total_seconds": time.perf_counter() - started,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dama demo",
        description="Run RLAIF-V's recipe in miniature on the CPU, then DAMA and plain DPO side by side: a tiny LLaVA "
        "taught to see drawn objects from captions with a co-occurrence prior (so it also names absent partners), "
        "preference pairs from its own sampled answers judged by CHAIR (dama make-pairs), hardness, reference "
        "log-probs, DAMA and DPO training from the same start on the same pairs, then the held-out reward accuracy "
        "and the held-out object hallucination (CHAIR_s, CHAIR_i, object recall of greedy descriptions) of the "
        "start, DPO and DAMA models. Any option after `--` is passed to both trainings (configs/tiny_demo.yaml), "
        "e.g. `-- --num_train_epochs 1`.",
    )
    parser.add_argument("--output-dir", default="outputs/demo", help="where everything is written")
    parser.add_argument("--num-sft", type=int, default=DemoSizes.num_sft,
                        help="captioned images of the supervised stage (default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=DemoSizes.num_train,
                        help="images the preference pairs are made on (default: %(default)s)")
    parser.add_argument("--num-eval", type=int, default=DemoSizes.num_eval,
                        help="held-out images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the models and training")
    parser.add_argument("--warm-up-steps", type=int, default=SupervisedSettings.steps,
                        help="steps of the supervised stage (default: %(default)s)")
    parser.add_argument("--clip-steps", type=int, default=DemoSizes.clip_steps,
                        help="contrastive steps of the tiny CLIP before it scores hardness (default: %(default)s)")
    args, extra = parser.parse_known_args(argv)
    extra = [item for item in extra if item != "--"]
    if min(args.num_sft, args.num_train, args.num_eval) < 2 or args.warm_up_steps < 0 or args.clip_steps < 0:
        parser.error("need --num-sft, --num-train and --num-eval >= 2, and steps >= 0")
    sizes = DemoSizes(num_sft=args.num_sft, num_train=args.num_train, num_eval=args.num_eval,
                      supervised=SupervisedSettings(steps=args.warm_up_steps, seed=args.seed),
                      clip_steps=args.clip_steps)
    output_dir = Path(args.output_dir)
    summary = run_demo(output_dir, sizes, args.seed, extra)
    print(f"\nheld-out reward accuracy on the start model's own pairs: {summary['eval_reward_accuracy_before']:.3f} "
          f"before (all margins 0: the policy is the reference) -> DPO {summary['dpo_eval_reward_accuracy']:.3f}, "
          f"DAMA {summary['eval_reward_accuracy']:.3f} ({summary['steps']} steps each)")
    print(f"held-out CHAIR_i: start {summary['eval_chair_i_before']:.3f} -> DPO {summary['dpo_eval_chair_i']:.3f}, "
          f"DAMA {summary['eval_chair_i']:.3f}; object recall: start {summary['eval_object_recall_before']:.3f} -> "
          f"DPO {summary['dpo_eval_object_recall']:.3f}, DAMA {summary['eval_object_recall']:.3f}")
    print(f"hardness vs hallucinated words in the rejected answer: correlation "
          f"{summary['hardness_hallucination_correlation']:.2f} (random CLIP: "
          f"{summary['hardness_hallucination_correlation_random_clip']:.2f})")
    print(f"whole demo: {summary['total_seconds']:.0f} s   curves: {output_dir / 'curves.png'}   CHAIR: "
          f"{output_dir / 'chair.png'}   summary: {output_dir / 'summary.json'}")
    return 0

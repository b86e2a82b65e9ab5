"""`dama demo`: the whole pipeline on a CPU in a few minutes, from nothing to a trained tiny LLaVA.

Steps, all under --output-dir (default outputs/demo):
  1. synthetic preference data (data/train.parquet, data/eval.parquet) and COCO-format annotation files of the drawn
     objects (data/train.instances.json, data/eval.instances.json);
  2. a tiny random LLaVA built from configs, given a short supervised warm-up on the chosen answers (model/),
     standing in for the SFT model that DAMA starts from;
  3. a tiny CLIP (clip/) given a short contrastive warm-up on the training images and the sentences of their answers,
     so that its hardness separates easy pairs from hard ones (reported: the correlation of hardness with the
     number of hallucinated words in the rejected answer, and the same with the random CLIP before its warm-up);
  4. hardness with CLIP (data/*.scored.parquet and their .meta.json with the mean hardness);
  5. reference log-probs with the starting model (data/*.scored.ref.parquet);
  6. DAMA training (run/), with held-out reward accuracy measured before and after;
  7. `dama generate` on the held-out images with the warmed-up start and the trained model (generations/), scored
     by `dama eval-chair` against data/eval.instances.json: CHAIR_s, CHAIR_i and object recall before and after;
  8. a table of the training curve, curves.png, chair.png, a few answers before and after, and summary.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from dama.data.collator import PackedCollator
from dama.data.dataset import PreferenceDataset
from dama.demo.data import demo_corpus, instances_path, make_demo_data
from dama.demo.hallucination import (
    chair_before_after,
    chair_table,
    clip_examples,
    examples_table,
    hardness_report,
    plot_chair,
)
from dama.demo.tiny_clip import build_tiny_clip, contrastive_warm_up
from dama.demo.tiny_llava import build_tiny_llava
from dama.model.loading import load_llava
from dama.model.policy import DamaPolicy
from dama.offline.hardness import HardnessOptions, compute_hardness
from dama.offline.reference import ReferenceOptions, precompute_reference
from dama.training.arguments import parse_training_arguments, resolved_config
from dama.training.run_folder import mark_complete, plan_run_folder
from dama.training.train import build_trainer, start_run

# Images per contrastive step of the tiny CLIP (fewer when the training split is smaller).
CLIP_BATCH_SIZE = 32
REPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_demo.yaml"
TABLE_COLUMNS = (("step", "step"), ("loss", "loss"), ("rewards/accuracies", "reward acc"),
                 ("rewards/margins", "margin"), ("dama/beta_mean", "mean beta"), ("dama/alpha_model", "alpha_M"))


def supervised_warm_up(model_dir: Path, train_file: Path, steps: int, seed: int, pairs_per_step: int = 8,
                       learning_rate: float = 3e-3) -> float:
    """Next-token training on the chosen answers, in place; returns the last mean token loss.

    A random LLaVA knows no language: preference pairs alone teach it slowly. Real DAMA starts from LLaVA-1.5, an SFT
    model, and so does the demo.
    """
    llava, processor = load_llava(model_dir)
    dataset = PreferenceDataset.from_path(train_file, processor)
    policy = DamaPolicy(llava)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=0.0)
    collator, rng = PackedCollator(), random.Random(seed)
    for _ in range(steps):
        batch = collator([dataset[i] for i in rng.sample(range(len(dataset)), min(pairs_per_step, len(dataset)))])
        chosen_logps, _ = batch.split_chosen_rejected(policy(batch))
        chosen_tokens, _ = batch.split_chosen_rejected(batch.supervised_counts)
        loss = -chosen_logps.sum() / chosen_tokens.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    llava.save_pretrained(model_dir)
    return loss.item()


def prepare_clip(output_dir: Path, train_file: Path, steps: int, seed: int) -> tuple[Path, dict]:
    """Step 3: the tiny CLIP, warmed up; returns its folder and the hardness report of the random CLIP it started as."""
    examples = clip_examples(train_file)
    corpus = [sentence for example in examples for sentence in (*example.true, *example.false)]
    clip = build_tiny_clip(output_dir / "clip", seed=seed, corpus=corpus)
    random_scored = output_dir / "cache" / "train.random_clip.scored.parquet"
    compute_hardness(HardnessOptions(input=train_file, output=random_scored, clip=clip, device="cpu",
                                     overwrite=True))
    print(f"[demo] contrastive warm-up of the tiny CLIP ({steps} steps)", flush=True)
    loss = contrastive_warm_up(clip, examples, steps, batch_size=min(CLIP_BATCH_SIZE, len(examples)), seed=seed)
    print(f"[demo] CLIP warm-up loss {loss:.3f}", flush=True)
    return clip, hardness_report(random_scored)


def prepare_inputs(output_dir: Path, num_train: int, num_eval: int, seed: int, warm_up_steps: int,
                   clip_steps: int) -> tuple[dict[str, Path], dict]:
    """Steps 1-5; returns the scored-and-referenced train and eval files, and the hardness reports."""
    data = make_demo_data(output_dir / "data", num_train=num_train, num_eval=num_eval, seed=seed)
    build_tiny_llava(demo_corpus(), output_dir / "model", seed=seed)
    print(f"[demo] supervised warm-up of the tiny LLaVA ({warm_up_steps} steps)", flush=True)
    torch.manual_seed(seed)
    loss = supervised_warm_up(output_dir / "model", data["train"], warm_up_steps, seed)
    print(f"[demo] warm-up token loss {loss:.3f}", flush=True)
    clip, random_clip_report = prepare_clip(output_dir, data["train"], clip_steps, seed)
    ready = {}
    for split, path in data.items():
        scored = path.with_name(f"{split}.scored.parquet")
        print(f"[demo] hardness ({split})", flush=True)
        # Each demo run makes its data and models afresh: its earlier outputs are replaced.
        compute_hardness(HardnessOptions(input=path, output=scored, clip=clip, device="cpu",
                                     overwrite=True))
        print(f"[demo] reference log-probs ({split})", flush=True)
        ready[split] = path.with_name(f"{split}.scored.ref.parquet")
        precompute_reference(ReferenceOptions(input=scored, output=ready[split], model=output_dir / "model",
                                              cache_dir=output_dir / "cache", device="cpu", overwrite=True))
    hardness = {"random_clip": random_clip_report, "warmed_up_clip": hardness_report(data["train"].with_name(
        "train.scored.parquet"))}
    return ready, hardness


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
    figure.suptitle("DAMA on the synthetic demo (tiny LLaVA, CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_demo(output_dir: Path, num_train: int, num_eval: int, seed: int, warm_up_steps: int,
             extra_args: list[str], clip_steps: int = 400) -> dict:
    # A tiny model's matrices are too small to share between threads: one thread measured faster on 2 cores.
    torch.set_num_threads(1)
    inputs, hardness = prepare_inputs(output_dir, num_train, num_eval, seed, warm_up_steps, clip_steps)
    args = parse_training_arguments([
        "--config", str(REPO_CONFIG), "--output_dir", str(output_dir / "run"),
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
    train_seconds = time.perf_counter() - start
    after = trainer.evaluate()
    trainer.save_model(args.output_dir)
    trainer.save_state()
    mark_complete(args.output_dir, trainer.state.global_step)

    history = trainer.state.log_history
    print("\n" + training_table(history))
    plot_curves(history, output_dir / "curves.png")
    print("[demo] answering the held-out images before and after DAMA", flush=True)
    eval_parquet = output_dir / "data" / "eval.parquet"
    chair = chair_before_after(eval_parquet, instances_path(eval_parquet),
                               {"before": output_dir / "model", "after": Path(args.output_dir)},
                               output_dir / "generations")
    plot_chair(chair, output_dir / "chair.png")
    print("\nheld-out hallucination (CHAIR):\n" + chair_table(chair) + "\n\n" + examples_table(chair))
    summary = {
        "eval_reward_accuracy_before": before["eval_rewards/accuracies"],
        "eval_reward_accuracy": after["eval_rewards/accuracies"],
        "eval_reward_margin_before": before["eval_rewards/margins"],
        "eval_reward_margin": after["eval_rewards/margins"],
        "eval_loss_before": before["eval_loss"],
        "eval_loss": after["eval_loss"],
        "eval_chair_s_before": chair["before"]["chair_s"],
        "eval_chair_s": chair["after"]["chair_s"],
        "eval_chair_i_before": chair["before"]["chair_i"],
        "eval_chair_i": chair["after"]["chair_i"],
        "eval_object_recall_before": chair["before"]["recall"],
        "eval_object_recall": chair["after"]["recall"],
        "hardness_hallucination_correlation": hardness["warmed_up_clip"]["correlation"],
        "hardness_hallucination_correlation_random_clip": hardness["random_clip"]["correlation"],
        "hardness_mean_by_level": hardness["warmed_up_clip"]["mean_by_level"],
        "train_seconds": train_seconds,
        "steps": trainer.state.global_step,
        "train_pairs": num_train,
        "eval_pairs": num_eval,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dama demo",
        description="Run the whole DAMA pipeline on the CPU: synthetic data, tiny LLaVA and CLIP, hardness, "
        "reference log-probs, training, then the held-out reward accuracy and the held-out object hallucination "
        "(CHAIR of the model's own descriptions) before and after. Any option after `--` is passed to the training "
        "config (configs/tiny_demo.yaml), e.g. `-- --num_train_epochs 1`.",
    )
    parser.add_argument("--output-dir", default="outputs/demo", help="where everything is written")
    parser.add_argument("--num-train", type=int, default=1024, help="training pairs (default: %(default)s)")
    parser.add_argument("--num-eval", type=int, default=200, help="held-out pairs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the models and training")
    parser.add_argument("--warm-up-steps", type=int, default=300,
                        help="supervised steps on the chosen answers before DAMA (default: %(default)s)")
    parser.add_argument("--clip-steps", type=int, default=400,
                        help="contrastive steps of the tiny CLIP before it scores hardness (default: %(default)s)")
    args, extra = parser.parse_known_args(argv)
    extra = [item for item in extra if item != "--"]
    summary = run_demo(Path(args.output_dir), args.num_train, args.num_eval, args.seed, args.warm_up_steps, extra,
                       args.clip_steps)
    # Accuracy counts strict wins (chosen reward > rejected reward): before training every margin is exactly 0.
    print(f"\nheld-out reward accuracy: {summary['eval_reward_accuracy_before']:.3f} before (all margins 0: the "
          f"policy is the reference) -> {summary['eval_reward_accuracy']:.3f} after ({summary['steps']} steps, "
          f"{summary['train_seconds']:.0f} s of training)")
    print(f"held-out CHAIR_s {summary['eval_chair_s_before']:.3f} -> {summary['eval_chair_s']:.3f}, CHAIR_i "
          f"{summary['eval_chair_i_before']:.3f} -> {summary['eval_chair_i']:.3f}, object recall "
          f"{summary['eval_object_recall_before']:.3f} -> {summary['eval_object_recall']:.3f} (before -> after)")
    print(f"hardness vs hallucinated words in the rejected answer: correlation "
          f"{summary['hardness_hallucination_correlation']:.2f} (random CLIP: "
          f"{summary['hardness_hallucination_correlation_random_clip']:.2f})")
    print(f"curves: {Path(args.output_dir) / 'curves.png'}   CHAIR: {Path(args.output_dir) / 'chair.png'}   "
          f"summary: {Path(args.output_dir) / 'summary.json'}")
    return 0

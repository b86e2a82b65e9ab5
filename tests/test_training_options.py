"""Training options that used to break or be ignored silently: activation checkpointing, best-model tracking with
checkpoints completed by a marker, the online reference's attention, filter options without the filter,
data-awareness without any hardness, δ̄ without metadata, the recipe's gradient clipping, and the head's gradient
filter."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from dama.demo.data import demo_corpus, make_demo_data
from dama.demo.tiny_llava import build_tiny_llava
from dama.method.config import DamaMethodConfig
from dama.model import policy as policy_module
from dama.training.arguments import parse_training_arguments
from dama.training.checkpointing import COMPLETE_MARKER
from dama.training.train import build_trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    build_tiny_llava(demo_corpus(), root / "model", seed=0)
    return root, make_demo_data(root / "data", num_train=16, num_eval=8, image_size=32)


def make_args(root: Path, paths: dict, output_dir: Path, *extra: str):
    return parse_training_arguments([
        "--output_dir", str(output_dir), "--model_name_or_path", str(root / "model"),
        "--train_file", str(paths["train"]), "--reference", "online", "--data_aware", "false",
        "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--logging_steps", "1",
        "--report_to", "none", "--use_cpu", "true", "--seed", "3", *extra,
    ])


def test_activation_checkpointing_reaches_the_llava_and_trains(tiny_setup, tmp_path):
    root, paths = tiny_setup
    trainer = build_trainer(make_args(root, paths, tmp_path, "--max_steps", "2", "--save_strategy", "no",
                                      "--activation_checkpointing", "true"))
    trainer.train()  # the Trainer passes every_n_layers and offload, which the policy hands on to the LLaVA
    assert trainer.model.is_activation_checkpointing
    layers = trainer.model.llava.model.language_model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert trainer.state.global_step == 2 and trainer.state.log_history[-2]["loss"] > 0


@pytest.mark.parametrize("strategy", [["--save_strategy", "steps", "--load_best_model_at_end", "true"],
                                      ["--save_strategy", "best"]], ids=["load_best_model_at_end", "save_best"])
def test_best_checkpoint_is_recorded_where_it_lands_and_survives_rotation(strategy, tiny_setup, tmp_path):
    root, paths = tiny_setup
    trainer = build_trainer(make_args(
        root, paths, tmp_path, "--max_steps", "4", "--eval_file", str(paths["eval"]), "--eval_strategy", "steps",
        "--eval_steps", "1", "--save_steps", "1", "--save_total_limit", "1", "--metric_for_best_model", "loss",
        *strategy,
    ))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == tmp_path
    assert (best / COMPLETE_MARKER).is_file()
    saved_state = json.loads((best / "trainer_state.json").read_text())
    assert saved_state["best_model_checkpoint"] == str(best)
    eval_losses = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert best.name == f"checkpoint-{min(eval_losses, key=eval_losses.get)}"
    if "--load_best_model_at_end" in strategy:
        # The model in memory at the end is the best checkpoint's.
        saved = LlavaForConditionalGeneration.from_pretrained(best).state_dict()
        for name, value in trainer.model.llava.state_dict().items():
            assert torch.equal(value, saved[name]), name


@pytest.mark.parametrize("attention,layout", [("packed", "packed"), ("sdpa", "padded"), ("eager", "padded")])
def test_online_reference_runs_the_attention_of_the_policy(attention, layout, tiny_setup, tmp_path):
    root, paths = tiny_setup
    trainer = build_trainer(make_args(root, paths, tmp_path, "--attention", attention, "--layout", layout))
    policy, reference = trainer.model.llava, trainer.ref_policy.llava
    assert reference is not policy
    assert reference.config.text_config._attn_implementation == policy.config.text_config._attn_implementation
    assert not any(p.requires_grad for p in reference.parameters())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():  # same weights, same attention: the reference scores exactly what the policy does
        assert torch.equal(trainer.ref_policy(batch), trainer.model(batch))


def test_filter_options_are_refused_where_the_filter_does_not_run():
    with pytest.raises(ValueError, match="keep_ratio, filter_seed only act with model_aware=true"):
        DamaMethodConfig(model_aware=False, keep_ratio=0.5, filter_seed=1)
    with pytest.raises(ValueError, match="filter_width only act with outlier_filter=true"):
        DamaMethodConfig(outlier_filter=False, filter_width=2.0)
    DamaMethodConfig(model_aware=False)  # the defaults stay accepted


def test_data_aware_needs_a_hardness_and_takes_its_mean_from_the_rows(tiny_setup, tmp_path):
    root, paths = tiny_setup
    base = ["--max_steps", "1", "--data_aware", "true"]
    with pytest.raises(ValueError, match="data_aware=True, but no pair of .* has a hardness"):
        build_trainer(make_args(root, paths, tmp_path / "none", *base))
    # The authors' columns of CLIP scores and no metadata file: δ = sum(chosen) - sum(rejected), δ̄ their mean.
    table = pq.read_table(paths["train"])
    logits = [([0.5, 0.25], [0.125]), ([0.125], [0.5, 0.25])] * (table.num_rows // 2)
    table = table.append_column("chosen_logits", pa.array([json.dumps(c) for c, _ in logits]))
    table = table.append_column("rejected_logits", pa.array([json.dumps(r) for _, r in logits]))
    scored = tmp_path / "scored.parquet"
    pq.write_table(table, scored)
    trainer = build_trainer(make_args(root, {"train": scored}, tmp_path / "run", *base))
    assert trainer.train_dataset[0].hardness == 0.625 and trainer.train_dataset[1].hardness == -0.625
    assert trainer.dama_loss.hardness_mean == 0.0 and "mean over the 16 training pairs" in trainer.hardness_source


def test_the_recipe_does_not_clip_gradients_and_saves_once_per_epoch(tmp_path):
    deepspeed = pytest.importorskip("deepspeed")
    del deepspeed
    args = parse_training_arguments(["--config", str(REPO / "configs" / "llava15_7b_dama.yaml"), "--output_dir",
                                     str(tmp_path), "--use_cpu", "true"])
    assert args.max_grad_norm == 0
    assert args.hf_deepspeed_config.config["gradient_clipping"] == 0  # zero3.json's "auto" takes max_grad_norm
    # ~100 GB per ZeRO-3 checkpoint of the 7B model: one per epoch, the newest kept.
    assert (args.save_strategy, args.save_total_limit) == ("epoch", 1)


def test_grad_filter_eps_reaches_the_fused_head(tiny_setup, tmp_path):
    """eps 2 filters every d_logits tile (|onehot - softmax| <= 1): the loss sends no gradient back through the head,
    so the steps leave the model as it was, and after the first log the head skips filtered tiles; the default (fp32:
    exact) filters none, moves the model and keeps the dense products."""
    root, paths = tiny_setup
    for eps in ("2.0", None):
        extra = ["--grad_filter_eps", eps] if eps else []
        trainer = build_trainer(make_args(root, paths, tmp_path / str(eps), "--max_steps", "2",
                                          "--save_strategy", "no", *extra))
        head = trainer.model.head
        assert (head.grad_filter_eps, head.skip_filtered_tiles) == (float(eps) if eps else None, False)
        before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        moved = any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters()
                    if name in before)
        shares = [e["head/filtered_tile_share"] for e in trainer.state.log_history if "head/filtered_tile_share" in e]
        assert moved == (eps is None)
        assert shares == ([1.0, 1.0] if eps else [0.0, 0.0])
        assert head.skip_filtered_tiles == (eps is not None)


def test_the_heads_filter_settings_reach_the_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(policy_module.dama_kernels, "sequence_logps", lambda *args, **kwargs: calls.append(kwargs))
    head = policy_module.SequenceLogpsHead(torch.nn.Linear(8, 20, bias=False), "torch", grad_filter_eps=2**-12)
    for skip in (False, True):
        head.skip_filtered_tiles = skip
        head(torch.randn(5, 8), torch.randint(0, 20, (5,)), torch.zeros(5, dtype=torch.long), 1)
    assert [(c["grad_filter_eps"], c["skip_filtered_tiles"]) for c in calls] == [(2**-12, False), (2**-12, True)]

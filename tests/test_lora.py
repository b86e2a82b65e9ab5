"""LoRA end to end on the tiny LLaVA: what a step changes, the adapter folder and the merged export reload to the same
log-probs, the online reference is the base model without a copy, precomputed references work, and resume (with and
without DeepSpeed) equals the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration, TrainerCallback

from dama.demo.data import demo_corpus, make_demo_data
from dama.demo.tiny_llava import build_tiny_llava
from dama.model.lora import LORA_TARGETS, trainable_parameter_counts
from dama.model.policy import DamaPolicy
from dama.offline.reference import ReferenceOptions, precompute_reference
from dama.training.arguments import parse_training_arguments
from dama.training.checkpointing import newest_checkpoint
from dama.training.train import build_trainer

peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
RANK = 4


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    build_tiny_llava(demo_corpus(), root / "model", seed=0)
    paths = make_demo_data(root / "data", num_train=12, num_eval=0, image_size=32)
    return root, paths


def make_args(root: Path, paths: dict, output_dir: Path, *extra: str):
    return parse_training_arguments([
        "--output_dir", str(output_dir), "--model_name_or_path", str(root / "model"),
        "--train_file", str(paths["train"]), "--reference", "online", "--data_aware", "false",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--report_to", "none", "--use_cpu", "true", "--seed", "3", "--save_steps", "2",
        "--lora_rank", str(RANK), "--lora_alpha", "8", "--freeze_language_model", "true", *extra,
    ])


def losses(log_history: list[dict]) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


def batch_of(trainer, count: int = 4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(count)])


def policy_logps(llava, batch) -> torch.Tensor:
    policy = DamaPolicy(llava).eval()
    with torch.no_grad():
        return policy(batch)


def load_base(root: Path) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(root / "model", local_files_only=True)


@pytest.mark.parametrize("train_projector", [False, True], ids=["adapters", "adapters+projector"])
def test_one_step_changes_only_the_adapters_and_the_projector_when_trainable(tiny_setup, tmp_path, train_projector):
    root, paths = tiny_setup
    trainer = build_trainer(make_args(root, paths, tmp_path / "run", "--max_steps", "1", "--save_strategy", "no",
                                      "--freeze_projector", str(not train_projector).lower()))
    llava = trainer.model.llava
    text = llava.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    sizes = {"q_proj": (text.hidden_size, text.num_attention_heads * head_dim),
             "k_proj": (text.hidden_size, text.num_key_value_heads * head_dim),
             "v_proj": (text.hidden_size, text.num_key_value_heads * head_dim),
             "o_proj": (text.num_attention_heads * head_dim, text.hidden_size),
             "gate_proj": (text.hidden_size, text.intermediate_size),
             "up_proj": (text.hidden_size, text.intermediate_size),
             "down_proj": (text.intermediate_size, text.hidden_size)}
    assert set(sizes) == set(LORA_TARGETS)
    projector = sum(p.numel() for p in load_base(root).model.multi_modal_projector.parameters())
    expected = {"lora_adapters": text.num_hidden_layers * sum(RANK * (i + o) for i, o in sizes.values()),
                "vision_tower": 0, "projector": projector if train_projector else 0,
                "language_model": 0, "lm_head": 0}
    assert trainable_parameter_counts(llava) == expected

    before = {name: p.detach().clone() for name, p in llava.named_parameters()}
    trainer.train()
    changed = {name for name, p in llava.named_parameters() if not torch.equal(p, before[name])}
    adapters = {name for name in changed if ".lora_" in name}
    copies = {name for name in changed if ".modules_to_save." in name}
    assert changed == adapters | copies
    # lora_B starts at zero, so the first step moves B only (A's gradient is B^T times something: zero).
    assert adapters and all(".lora_B." in name for name in adapters)
    assert bool(copies) == train_projector
    assert all("multi_modal_projector" in name for name in copies)


@pytest.fixture(scope="module")
def trained_run(tiny_setup, tmp_path_factory):
    """Three LoRA steps with the projector trained; the final adapter folder in output_dir."""
    root, paths = tiny_setup
    output_dir = tmp_path_factory.mktemp("trained")
    trainer = build_trainer(make_args(root, paths, output_dir, "--max_steps", "3", "--save_strategy", "no"))
    trainer.train()
    trainer.save_model(output_dir)
    return trainer, output_dir


def test_online_reference_is_the_base_model_without_a_copy(tiny_setup, trained_run):
    root, _ = tiny_setup
    trainer, _ = trained_run
    assert trainer.ref_policy is None
    assert sum(isinstance(m, LlavaForConditionalGeneration) for m in trainer.model.modules()) == 1
    # Step 1: the policy is the reference (B = 0), so the loss is log 2.
    assert losses(trainer.state.log_history)[1] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    batch = batch_of(trainer)
    reference = trainer._base_model_logps(batch)
    torch.testing.assert_close(reference, policy_logps(load_base(root), batch), rtol=0, atol=1e-6)
    with torch.no_grad():
        trained = trainer.model.eval()(batch)
    assert (trained - reference).abs().max() > 1e-3  # the adapters and the projector copy did move


def test_adapter_folder_and_merged_export_reload_to_the_same_logps(tiny_setup, trained_run, tmp_path):
    root, _ = tiny_setup
    trainer, output_dir = trained_run
    batch = batch_of(trainer)
    with torch.no_grad():
        trained = trainer.model.eval()(batch)

    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (root / "model").resolve()
    reloaded = peft.PeftModel.from_pretrained(load_base(root), str(output_dir))
    torch.testing.assert_close(policy_logps(reloaded.base_model.model, batch), trained, rtol=0, atol=1e-6)

    merged_dir = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "dama.cli", "export", str(output_dir), "--merge", "--output",
                           str(merged_dir)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    merged, info = LlavaForConditionalGeneration.from_pretrained(merged_dir, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not any(".lora_" in name or "base_layer" in name for name, _ in merged.named_parameters())
    # W + s B A is rounded once more than the two-branch sum: agreement to fp32 rounding of the ~150-nat sums.
    torch.testing.assert_close(policy_logps(merged, batch), trained, rtol=2e-6, atol=1e-5)


def test_export_without_adapters_is_a_clear_error(tiny_setup, tmp_path):
    root, _ = tiny_setup
    done = subprocess.run([sys.executable, "-m", "dama.cli", "export", str(root / "model"), "--merge", "--output",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith("dama export: error:") and "adapter_config.json" in done.stderr


def test_export_never_overwrites_its_inputs(tiny_setup, trained_run):
    _, output_dir = trained_run
    done = subprocess.run([sys.executable, "-m", "dama.cli", "export", str(output_dir), "--merge", "--output",
                           str(output_dir)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and "would replace" in done.stderr
    assert (output_dir / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def with_reference(tiny_setup, tmp_path_factory):
    """The training pairs with the base model's precomputed reference log-probs."""
    root, paths = tiny_setup
    folder = tmp_path_factory.mktemp("reference")
    precompute_reference(ReferenceOptions(input=paths["train"], output=folder / "train.ref.parquet",
                                          model=root / "model", cache_dir=folder / "cache", device="cpu"))
    return {"train": folder / "train.ref.parquet"}


def test_precomputed_reference_with_lora(tiny_setup, with_reference, tmp_path):
    root, _ = tiny_setup
    trainer = build_trainer(make_args(root, with_reference, tmp_path / "run", "--max_steps", "2",
                                      "--save_strategy", "no", "--reference", "precomputed"))
    trainer.train()
    logged = losses(trainer.state.log_history)
    # The precomputed reference is the base model, which the policy still is at step 1.
    assert logged[1] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)
    assert logged[2] != logged[1]


def test_sixteen_bit_weights_need_autocast(tiny_setup, tmp_path):
    root, paths = tiny_setup
    with pytest.raises(ValueError, match="needs --bf16 true"):
        build_trainer(make_args(root, paths, tmp_path / "run", "--model_dtype", "bfloat16"))


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


def test_resume_equals_uninterrupted(tiny_setup, tmp_path):
    root, paths = tiny_setup
    uninterrupted = build_trainer(make_args(root, paths, tmp_path / "full", "--max_steps", "4"))
    uninterrupted.train()
    killed = build_trainer(make_args(root, paths, tmp_path / "killed", "--max_steps", "4"))
    killed.add_callback(StopAt(3))
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert newest_checkpoint(tmp_path / "killed").name == "checkpoint-2"
    resumed = build_trainer(make_args(root, paths, tmp_path / "killed", "--max_steps", "4", "--resume", "true"))
    resumed.train(resume_from_checkpoint=True)
    expected, got = losses(uninterrupted.state.log_history), losses(resumed.state.log_history)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    for (name, a), (_, b) in zip(uninterrupted.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def deepspeed_train(root: Path, train_file: Path, output_dir: Path, max_steps: int, *extra: str) -> list[dict]:
    """`dama train` with LoRA under DeepSpeed in one CPU process (a constant learning rate); its log history."""
    argv = ["train", "--output_dir", str(output_dir), "--model_name_or_path", str(root / "model"),
            "--train_file", str(train_file), "--data_aware", "false", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--report_to",
            "none", "--use_cpu", "true", "--seed", "3", "--save_steps", "2", "--max_steps", str(max_steps),
            "--lora_rank", str(RANK), "--lora_alpha", "8", "--freeze_language_model", "true", *extra]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    done = subprocess.run([sys.executable, "-m", "dama.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def test_resume_under_deepspeed_equals_uninterrupted(tiny_setup, tmp_path):
    pytest.importorskip("deepspeed")
    root, paths = tiny_setup
    zero2 = ("--reference", "online", "--deepspeed", str(REPO / "configs/deepspeed/zero2.json"))
    expected = losses(deepspeed_train(root, paths["train"], tmp_path / "full", 4, *zero2))
    # A constant learning rate: stopping at 2 of 4 steps changes nothing before it.
    deepspeed_train(root, paths["train"], tmp_path / "cut", 2, *zero2)
    assert (tmp_path / "cut" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    got = losses(deepspeed_train(root, paths["train"], tmp_path / "cut", 4, *zero2, "--resume", "true"))
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_zero3_with_offloaded_weights_trains_as_without_deepspeed(tiny_setup, with_reference, tmp_path):
    """The 16 GB recipe's engine: ZeRO-3 with the weights on the CPU gives the plain run's losses and adapters."""
    pytest.importorskip("deepspeed")
    root, _ = tiny_setup
    offload = str(REPO / "configs/deepspeed/zero3_offload_params.json")
    got = losses(deepspeed_train(root, with_reference["train"], tmp_path / "zero3", 2, "--deepspeed", offload))
    plain = build_trainer(make_args(root, with_reference, tmp_path / "plain", "--max_steps", "2", "--reference",
                                    "precomputed", "--lr_scheduler_type", "constant", "--save_strategy", "no"))
    plain.train()
    expected = losses(plain.state.log_history)
    assert sorted(got) == [1, 2]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    batch = batch_of(plain)
    with torch.no_grad():
        trained = plain.model.eval()(batch)
    reloaded = peft.PeftModel.from_pretrained(load_base(root), str(tmp_path / "zero3"))
    torch.testing.assert_close(policy_logps(reloaded.base_model.model, batch), trained, rtol=1e-5, atol=1e-4)

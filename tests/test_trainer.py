"""DamaTrainer on a tiny LLaVA: training runs, resume reproduces the loss curve, non-finite steps, checkpoints that
count only once complete, the public Trainer hooks, and every shipped YAML parses."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback

from dama.demo.data import demo_corpus, make_demo_data
from dama.demo.tiny_llava import build_tiny_llava
from dama.training.arguments import parse_training_arguments
from dama.training.checkpointing import COMPLETE_MARKER, DAMA_STATE_NAME, newest_checkpoint
from dama.training.train import build_trainer
from dama.training.trainer import DamaTrainer, NonFiniteLossError

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_llava(demo_corpus(), root / "model", seed=0)
    paths = make_demo_data(root / "data", num_train=24, num_eval=8, image_size=32)
    return root, paths


def make_args(root: Path, paths: dict, output_dir: Path, *extra: str):
    return parse_training_arguments([
        "--output_dir", str(output_dir), "--model_name_or_path", str(root / "model"),
        "--train_file", str(paths["train"]), "--reference", "online", "--data_aware", "false",
        "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--logging_steps", "1",
        "--report_to", "none", "--use_cpu", "true", "--seed", "3", "--save_steps", "2", *extra,
    ])


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


class StopAt(TrainerCallback):
    """Simulates a kill: raises once `step` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


def test_training_logs_dama_metrics_and_moves_the_policy(tiny_setup, tmp_path):
    root, paths = tiny_setup
    trainer = build_trainer(make_args(root, paths, tmp_path / "run", "--max_steps", "3"))
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    trainer.train()
    after = [p.detach() for p in trainer.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    logged = trainer.state.log_history[0]
    for name in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "dama/alpha_model", "dama/beta_mean", "dama/selected", "dama/running_margin"):
        assert name in logged and logged[name] == logged[name]  # present and not NaN
    # The first step is plain DPO at z = 0: the policy equals the reference.
    assert logged["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert logged["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)


def test_resume_after_kill_gives_the_same_loss_curve(tiny_setup, tmp_path):
    root, paths = tiny_setup
    uninterrupted = build_trainer(make_args(root, paths, tmp_path / "full", "--max_steps", "5"))
    uninterrupted.train()

    killed = build_trainer(make_args(root, paths, tmp_path / "killed", "--max_steps", "5"))
    killed.add_callback(StopAt(3))
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert newest_checkpoint(tmp_path / "killed").name == "checkpoint-2"

    resumed = build_trainer(make_args(root, paths, tmp_path / "killed", "--max_steps", "5", "--resume", "true"))
    resumed.train(resume_from_checkpoint=True)
    expected, got = losses(uninterrupted), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4, 5]  # steps 1-2 come from the checkpoint's history, 3-5 were run again
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    for name, value in uninterrupted.dama_loss.state_dict().items():
        torch.testing.assert_close(resumed.dama_loss.state_dict()[name], value, rtol=1e-6, atol=1e-9, equal_nan=True)


class PoisonPolicy:
    """Makes the policy's log-probs NaN on the listed forward calls (counted from 1)."""

    def __init__(self, policy, poisoned_calls) -> None:
        self.calls = 0
        self.poisoned_calls = set(poisoned_calls)
        policy.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1
        return output * float("nan") if self.calls in self.poisoned_calls else output


def test_a_non_finite_micro_batch_is_skipped_and_counted(tiny_setup, tmp_path):
    root, paths = tiny_setup
    trainer = build_trainer(make_args(root, paths, tmp_path / "run", "--max_steps", "3"))
    PoisonPolicy(trainer.model, poisoned_calls={2})
    state_before = {k: v.clone() for k, v in trainer.dama_loss.state_dict().items()}
    weights = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            weights[state.global_step] = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]

    trainer.add_callback(Snapshot())
    trainer.train()
    # Step 2's only micro-batch was skipped: no gradient, so the optimizer left every weight as it was.
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights[2], weights[3], strict=True))
    assert trainer.nonfinite_steps == 1
    assert trainer.state.log_history[-2]["dama/nonfinite_steps"] == 1.0
    assert int(trainer.dama_loss.num_steps) == int(state_before["num_steps"]) + 2  # the skipped one left no trace


def test_too_many_non_finite_steps_stop_with_checkpoint_intact(tiny_setup, tmp_path):
    root, paths = tiny_setup
    trainer = build_trainer(make_args(root, paths, tmp_path / "run", "--max_steps", "6",
                                      "--max_nonfinite_steps", "2"))
    PoisonPolicy(trainer.model, poisoned_calls={3, 4})
    with pytest.raises(NonFiniteLossError, match="2 micro-batches in a row"):
        trainer.train()
    checkpoint = newest_checkpoint(tmp_path / "run")
    assert checkpoint.name == "checkpoint-2"
    assert (checkpoint / DAMA_STATE_NAME).is_file() and (checkpoint / "model.safetensors").is_file()


def test_a_save_cut_short_is_never_resumed_from_and_resume_gives_the_same_losses(tiny_setup, tmp_path, monkeypatch):
    root, paths = tiny_setup
    trainer = build_trainer(make_args(root, paths, tmp_path / "run", "--max_steps", "4"))
    original = Trainer._save_optimizer_and_scheduler

    def crash_on_second_save(self, output_dir):
        if self.state.global_step == 4:
            raise OSError("disk full")
        original(self, output_dir)

    # The crash comes after the model files of checkpoint-4 are written, before the optimizer's.
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", crash_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    monkeypatch.undo()
    cut = tmp_path / "run" / "checkpoint-4"
    assert (cut / "model.safetensors").is_file() and not (cut / COMPLETE_MARKER).exists()
    assert newest_checkpoint(tmp_path / "run").name == "checkpoint-2"
    assert (tmp_path / "run" / "checkpoint-2" / COMPLETE_MARKER).is_file()

    resumed = build_trainer(make_args(root, paths, tmp_path / "run", "--max_steps", "4", "--resume", "true"))
    resumed.train(resume_from_checkpoint=True)
    assert sorted(losses(resumed)) == [1, 2, 3, 4]
    for step, loss in losses(trainer).items():  # the crashed run had logged all four steps
        assert losses(resumed)[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert (cut / COMPLETE_MARKER).is_file() and (cut / "optimizer.pt").is_file()


def test_dama_trainer_overrides_two_private_trainer_methods_and_imports_nothing_private_from_liger():
    own = {name for cls in DamaTrainer.__mro__ if cls.__module__.startswith("dama.") for name in vars(cls)}
    private = sorted(name for name in own if name.startswith("_") and not name.startswith("__")
                     and hasattr(Trainer, name))
    assert private == ["_load_best_model", "_load_from_checkpoint"]
    package = Path(__file__).resolve().parents[1] / "dama"
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("liger_kernel"):
                assert not any(alias.name.startswith("_") for alias in node.names), source


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_parses(config, tmp_path):
    on_cpu = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    args = parse_training_arguments(["--config", str(config), "--output_dir", str(tmp_path), *on_cpu])
    assert args.output_dir == str(tmp_path)  # the command line wins over the file


def test_unknown_config_key_is_an_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("output_dir: out\nbetta: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['betta'\]"):
        parse_training_arguments(["--config", str(config)])

"""`dama train` under launchers on the CPU: 2-process data parallel (torchrun, gloo) and DeepSpeed ZeRO-2 / ZeRO-3
in one process reproduce the single-process run on the same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dama.demo.data import demo_corpus, make_demo_data
from dama.demo.tiny_llava import build_tiny_llava
from dama.offline.reference import ReferenceOptions, precompute_reference

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    build_tiny_llava(demo_corpus(), root / "model", seed=0)
    raw = make_demo_data(root / "data", num_train=16, num_eval=0, image_size=32)
    # Precomputed reference log-probs: the default, and the only reference that ZeRO-3 supports.
    paths = {"train": root / "data" / "train.ref.parquet"}
    precompute_reference(ReferenceOptions(input=raw["train"], output=paths["train"], model=root / "model",
                                          cache_dir=root / "cache", device="cpu"))
    return root, paths


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_argv(root: Path, paths: dict, output_dir: Path, per_device_batch: int, *extra: str) -> list[str]:
    return [
        "train", "--output_dir", str(output_dir), "--model_name_or_path", str(root / "model"),
        "--train_file", str(paths["train"]), "--data_aware", "false",
        "--per_device_train_batch_size", str(per_device_batch), "--learning_rate", "5e-3", "--max_steps", "3",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--shuffle", "false", "--seed", "5", "--keep_ratio", "0.5", *extra,
    ]


def run(command: list[str], extra_env: dict | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(extra_env or {})}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def single_process(tiny_setup, tmp_path_factory):
    root, paths = tiny_setup
    output_dir = tmp_path_factory.mktemp("single")
    run([sys.executable, "-m", "dama.cli", *train_argv(root, paths, output_dir, 4)])
    return logged_losses(output_dir)


def test_two_process_data_parallel_matches_one_process(tiny_setup, single_process, tmp_path):
    root, paths = tiny_setup
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "dama.cli"]
    run([*launcher, *train_argv(root, paths, tmp_path, 2)])
    assert logged_losses(tmp_path) == pytest.approx(single_process, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("zero_config", ["zero2.json", "zero3.json"])
def test_deepspeed_zero_matches_plain_training(zero_config, tiny_setup, single_process, tmp_path):
    pytest.importorskip("deepspeed")
    root, paths = tiny_setup
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    argv = train_argv(root, paths, tmp_path, 4, "--deepspeed", str(REPO / "configs/deepspeed" / zero_config))
    run([sys.executable, "-m", "dama.cli", *argv], env)
    assert logged_losses(tmp_path) == pytest.approx(single_process, rel=1e-5, abs=1e-6)

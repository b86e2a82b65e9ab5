"""Every YAML in configs/ runs end to end on the CPU, as the README runs it: `dama hardness` -> `dama precompute-ref`
-> `dama train --config <the YAML>`, then the saved checkpoint is reloaded with
LlavaForConditionalGeneration.from_pretrained (no missing or unexpected keys, the trained weights) and training
resumes from it for one more step.

Only paths, the step counts and what a CPU cannot do are overridden; each override is listed with its reason.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from dama.cli import main as dama
from dama.demo.data import demo_corpus, make_demo_data, make_rows
from dama.demo.tiny_clip import build_tiny_clip
from dama.demo.tiny_llava import build_tiny_llava
from dama.training.arguments import parse_training_arguments
from dama.training.checkpointing import COMPLETE_MARKER
from dama.training.train import prepare_training, run_training

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RUN_BY_THIS_MODULE = {"llava15_7b_dama.yaml", "llava15_7b_dama_lora_24gb.yaml", "llava15_7b_dama_lora_16gb.yaml",
                      "tiny_demo.yaml"}
STEPS = 2


def test_every_shipped_yaml_is_run_here():
    assert {path.name for path in CONFIGS.glob("*.yaml")} == RUN_BY_THIS_MODULE


def rlaif_v_rows(count: int) -> list[dict]:
    """Rows with RLAIF-V's columns (origin_split as JSON text naming the generator) and 500 x 375 JPEG images."""
    rows = []
    for number, row in enumerate(make_rows(count, seed=7, image_size=64, split="train")):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").resize((500, 375)).save(buffer, format="JPEG")
        model = "OmniLMM-12B" if number % 4 == 3 else "llava15_7b"
        rows.append(dict(row, ds_name="RLAIF-V-Dataset", image={"bytes": buffer.getvalue(), "path": f"{number}.jpg"},
                         idx=str(number), image_path=f"{number}.jpg",
                         origin_split=json.dumps({"model": model, "type": "question_answering"})))
    return rows


def reload(folder: Path) -> dict[str, torch.Tensor]:
    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    return model.state_dict()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def deepspeed_train(argv: list[str]) -> str:
    """`dama train` as one DeepSpeed rank (what the deepspeed launcher sets up, for one CPU process); its stdout."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-m", "dama.cli", "train", *argv], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout


@pytest.fixture(scope="module")
def llava15_data(llava15_checkpoint, tmp_path_factory) -> Path:
    """RLAIF-V-shaped rows through the README's steps 1 and 2 (hardness, then the reference log-probs of the
    llava-1.5-shaped checkpoint), with the LLaVA-1.5 subset selected by the generator named in origin_split."""
    root = tmp_path_factory.mktemp("llava15_data")
    data = root / "rlaif-v"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(rlaif_v_rows(8)), data / "train-00000-of-00001.parquet")
    clip = build_tiny_clip(root / "clip", seed=0)
    scored, ready = root / "llava15" / "train.scored.parquet", root / "llava15" / "train.parquet"
    assert dama(["hardness", "--input", str(data), "--clip", str(clip), "--output", str(scored), "--select",
                 "origin_split.model~llava", "--cache-dir", str(root / "cache")]) == 0
    assert pq.read_table(scored).num_rows == 6
    assert dama(["precompute-ref", "--input", str(scored), "--model", str(llava15_checkpoint), "--output",
                 str(ready), "--dtype", "bfloat16", "--cache-dir", str(root / "cache")]) == 0
    return ready


def test_llava15_7b_recipe_with_zero3_on_a_llava15_shaped_checkpoint(llava15_checkpoint, llava15_data, tmp_path):
    deepspeed_zero = pytest.importorskip("deepspeed.utils.zero_to_fp32")
    ready = llava15_data
    output = tmp_path / "run"
    recipe = [
        "--config", str(CONFIGS / "llava15_7b_dama.yaml"),
        # Paths: the llava-1.5-shaped checkpoint and this test's data and folder instead of the README's.
        "--model_name_or_path", str(llava15_checkpoint), "--train_file", str(ready), "--output_dir", str(output),
        # What a CPU cannot do: there is no GPU. Everything else (ZeRO-3 through configs/deepspeed/zero3.json, bf16,
        # activation checkpointing, 4 pairs per device, no gradient clipping) is the recipe's own.
        "--use_cpu", "true",
        # Steps: two instead of four epochs, with a checkpoint at step 2 instead of one per epoch.
        "--save_strategy", "steps", "--save_steps", str(STEPS),
    ]
    printed = deepspeed_train([*recipe, "--max_steps", str(STEPS)])
    assert "576 of them image tokens" in printed and "[32000 x 576] 29871 13" in printed
    assert "6 training pairs" in printed

    checkpoint = output / f"checkpoint-{STEPS}"
    assert (checkpoint / COMPLETE_MARKER).is_file()
    saved, final = reload(checkpoint), reload(output)
    # The engine's own record of the trained weights: the fp32 masters in its ZeRO-3 checkpoint files.
    masters = deepspeed_zero.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    masters = {name[len("llava."):]: value for name, value in masters.items() if name.startswith("llava.")}
    assert masters.keys() == saved.keys()
    start = reload(llava15_checkpoint)
    moved = []
    for name, value in saved.items():
        assert value.dtype == torch.bfloat16  # the recipe trains in bf16: the saved weights are the bf16 copies
        assert torch.equal(value, masters[name].to(torch.bfloat16)), name
        assert torch.equal(final[name], value), name
        # bf16 training starts its fp32 masters from the bf16 copies of the starting weights.
        if not torch.equal(masters[name], start[name].to(torch.bfloat16).float()):
            moved.append(name)
    assert moved and not any(name.startswith("model.vision_tower") for name in moved)  # the tower stays frozen

    resumed = deepspeed_train([*recipe, "--max_steps", str(STEPS + 1), "--resume", "true"])
    state = json.loads((output / "trainer_state.json").read_text())
    assert f"resuming from {checkpoint}" in resumed and state["global_step"] == STEPS + 1
    assert all(torch.isfinite(v.float()).all() for v in reload(output).values())


def lora_recipe(name: str, checkpoint: Path, data: Path, output: Path) -> list[str]:
    return [
        "--config", str(CONFIGS / name),
        # Paths: the llava-1.5-shaped checkpoint and this test's data and folder instead of the README's.
        "--model_name_or_path", str(checkpoint), "--train_file", str(data), "--output_dir", str(output),
        # What a CPU cannot do: there is no GPU (bf16 autocast runs on the CPU). Everything else (LoRA r=64 with the
        # projector trained, bf16 weights, activation checkpointing, the token budget, precomputed reference) is
        # the recipe's own.
        "--use_cpu", "true",
        # Steps: two optimizer steps, with a checkpoint at step 2.
        "--save_strategy", "steps", "--save_steps", str(STEPS),
    ]


def check_lora_run(checkpoint: Path, output: Path, base: Path) -> None:
    """The run's folders are adapter folders; merged into the base they load as a plain LLaVA whose projections and
    projector moved and whose vision tower did not."""
    for folder in (output / f"checkpoint-{STEPS}", output):
        assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
    merged = output.parent / "merged"
    assert dama(["export", str(output), "--merge", "--output", str(merged)]) == 0
    after, before = reload(merged), reload(base)
    moved = {name for name, value in after.items() if not torch.equal(value, before[name])}
    assert any("language_model" in name and "proj" in name for name in moved)
    assert any("multi_modal_projector" in name for name in moved)
    assert not any(name.startswith("model.vision_tower") for name in moved)


def test_llava15_7b_lora_24gb_recipe_on_a_llava15_shaped_checkpoint(llava15_checkpoint, llava15_data, tmp_path):
    output = tmp_path / "run"
    recipe = lora_recipe("llava15_7b_dama_lora_24gb.yaml", llava15_checkpoint, llava15_data, output)
    plan, trainer = prepare_training(parse_training_arguments([*recipe, "--max_steps", str(STEPS)]))
    assert trainer.adapters is not None and trainer.ref_policy is None
    run_training(trainer, plan)
    check_lora_run(output / f"checkpoint-{STEPS}", output, llava15_checkpoint)

    plan, resumed = prepare_training(parse_training_arguments([*recipe, "--max_steps", str(STEPS + 1), "--resume",
                                                               "true"]))
    assert plan.checkpoint == output / f"checkpoint-{STEPS}"
    run_training(resumed, plan)
    assert resumed.state.global_step == STEPS + 1


def test_llava15_7b_lora_16gb_recipe_with_offloaded_weights(llava15_checkpoint, llava15_data, tmp_path):
    pytest.importorskip("deepspeed")
    output = tmp_path / "run"
    recipe = lora_recipe("llava15_7b_dama_lora_16gb.yaml", llava15_checkpoint, llava15_data, output)
    deepspeed_train([*recipe, "--max_steps", str(STEPS)])  # ZeRO-3, weights on the CPU (the recipe's JSON)
    check_lora_run(output / f"checkpoint-{STEPS}", output, llava15_checkpoint)
    resumed = deepspeed_train([*recipe, "--max_steps", str(STEPS + 1), "--resume", "true"])
    state = json.loads((output / "trainer_state.json").read_text())
    assert f"resuming from {output / f'checkpoint-{STEPS}'}" in resumed and state["global_step"] == STEPS + 1


def test_tiny_demo_recipe(tmp_path):
    build_tiny_llava(demo_corpus(), tmp_path / "model", seed=0)
    clip = build_tiny_clip(tmp_path / "clip", seed=0)
    raw = make_demo_data(tmp_path / "data", num_train=12, num_eval=4, image_size=32)
    ready = {}
    for split, path in raw.items():
        scored, ready[split] = path.with_name(f"{split}.scored.parquet"), path.with_name(f"{split}.ref.parquet")
        assert dama(["hardness", "--input", str(path), "--clip", str(clip), "--output", str(scored)]) == 0
        assert dama(["precompute-ref", "--input", str(scored), "--model", str(tmp_path / "model"), "--output",
                     str(ready[split]), "--cache-dir", str(tmp_path / "cache")]) == 0
    output = tmp_path / "run"
    argv = [
        "--config", str(CONFIGS / "tiny_demo.yaml"),
        # Paths: this test's model, data and folder instead of those `make demo` writes under outputs/demo.
        "--model_name_or_path", str(tmp_path / "model"), "--train_file", str(ready["train"]),
        "--eval_file", str(ready["eval"]), "--output_dir", str(output),
        # Steps: two instead of four epochs, with a checkpoint at step 2. The YAML already runs on the CPU.
        "--save_steps", str(STEPS),
    ]
    plan, trainer = prepare_training(parse_training_arguments([*argv, "--max_steps", str(STEPS)]))
    run_training(trainer, plan)
    saved = reload(output / f"checkpoint-{STEPS}")
    start = reload(tmp_path / "model")
    trained = trainer.model.llava.state_dict()
    assert trained.keys() == saved.keys()
    for name, value in trained.items():
        assert torch.equal(saved[name], value), name
    assert any(not torch.equal(saved[name], start[name]) for name in saved)

    # A finished run given one more step goes on from its checkpoint at step 2 (its DamaLoss state too) to step 3.
    plan, resumed = prepare_training(parse_training_arguments([*argv, "--max_steps", str(STEPS + 1), "--resume",
                                                               "true"]))
    assert plan.action == "resume" and plan.checkpoint == output / f"checkpoint-{STEPS}"
    training_forwards = []
    resumed.model.register_forward_hook(lambda module, *_: training_forwards.append(module.training))
    run_training(resumed, plan)
    # One training forward: the run went on from the checkpoint at step 2 (its DamaLoss state too) to step 3.
    assert resumed.state.global_step == STEPS + 1 and training_forwards.count(True) == 1
    assert int(resumed.dama_loss.num_steps) == STEPS + 1

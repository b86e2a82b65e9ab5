"""bench/gpu_check.sh without a GPU: its arguments, its plan for a GPU, and a dry run that writes its records.

Run: .venv/bin/python -m pytest bench/test_gpu_check.py. The GPU steps themselves run only on a GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.gpu_check import BUDGET_S, gpu_slug, main, parse_args, plan
from bench.trl_provider import trl_missing_reason

from .environment import REPO_ROOT


def test_arguments_and_names() -> None:
    args = parse_args([])
    assert (args.steps, args.budget_s, args.dry_run) == (4, BUDGET_S, False)
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100" and gpu_slug("NVIDIA H200") == "h200"
    assert gpu_slug("Tesla T4") == "t4" and gpu_slug("") == "gpu"


def test_gpu_plan_fits_the_budget_at_llava_7b_width(tmp_path) -> None:
    steps = plan(parse_args(["--output-dir", str(tmp_path)]), "h200")
    assert [s.name for s in steps] == ["selftest", "attention_tests", "loss_head", "loss_head_peaked", "kept_products",
                                       "end_to_end"]
    assert sum(s.timeout_s for s in steps) <= BUDGET_S == 585
    end_to_end = " ".join(steps[-1].command)
    for flags in ("--device cuda --dtype bf16 --hidden-size 4096 --head-dim 128 --vocab-size 32064 --layers 8",
                  "--pairs 4", f"--output {tmp_path / 'end_to_end_h200.json'}"):
        assert flags in end_to_end
    assert "--shapes 4096" in " ".join(steps[2].command)
    assert "--logits" not in steps[2].command and steps[2].records == tmp_path / "loss_head_h200.json"
    assert "tests/test_attention_kernels.py" in steps[1].command and "tests/test_step_syncs.py" in steps[1].command


def test_gpu_plan_runs_the_loss_head_again_on_peaked_logits(tmp_path) -> None:
    steps = {s.name: s for s in plan(parse_args(["--output-dir", str(tmp_path)]), "h200")}
    flat, peaked = steps["loss_head"], steps["loss_head_peaked"]
    records = tmp_path / "loss_head_peaked_h200.json"
    assert " ".join(peaked.command).endswith(f"-m bench.loss_head --shapes 4096 --logits peaked --providers naive "
                                             f"dama dama_exact --output {records}")
    assert peaked.records == records != flat.records


def test_gpu_plan_times_the_kept_tile_products_within_their_share(tmp_path) -> None:
    steps = {s.name: s for s in plan(parse_args(["--output-dir", str(tmp_path)]), "h200")}
    kept = steps["kept_products"]
    records = tmp_path / "kept_products_h200.json"
    assert " ".join(kept.command).endswith(f"-m bench.kept_products --time-limit-s 20 --output {records}")
    assert kept.records == records and kept.timeout_s >= 35


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_run_without_a_gpu(tmp_path, capsys) -> None:
    assert main(["--output-dir", str(tmp_path)]) == 1
    assert "no CUDA device is visible" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_dry_run_writes_records_and_names_what_it_skipped(tmp_path) -> None:
    environment = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--output-dir", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "gpu_check_cpu-dry-run.json").read_text())
    assert summary["dry_run"] is True
    assert {s["name"]: s["status"] for s in summary["steps"]} == {
        "selftest": "skipped", "attention_tests": "skipped", "loss_head": "skipped", "loss_head_peaked": "skipped",
        "kept_products": "skipped", "end_to_end": "ok"}
    records = {r["provider"]: r for r in json.loads((tmp_path / "end_to_end_cpu-dry-run.json").read_text())}
    assert records["dama_prefix_shared"]["status"] == "ok" and records["dama_prefix_shared"]["tokens_per_s"] > 0
    if trl_missing_reason() is None:
        assert records["trl_dpo"]["status"] == "ok"
        assert records["dama_prefix_shared"]["ratios"]["pairs_per_s_vs_trl"] > 0
    else:
        assert records["trl_dpo"]["reason"] == f"trl_dpo skipped: {trl_missing_reason()}"
        assert f"- end_to_end trl_dpo: trl_dpo skipped: {trl_missing_reason()}" in done.stdout
    assert "- selftest: dry run: the kernels' GPU checks need CUDA" in done.stdout
    assert "| end_to_end | ok |" in done.stdout and "| dama_prefix_shared | prefix_shared" in done.stdout
    assert (tmp_path / "gpu_check_cpu-dry-run.log").stat().st_size > 0

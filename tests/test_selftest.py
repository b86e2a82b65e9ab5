"""`dama selftest`: the table, the JSON, and exit status 1 naming the failed case (small cases only, on the CPU)."""

from __future__ import annotations

import json

import pytest
import torch

import dama_kernels.selftest as selftest
from dama.cli import COMMANDS
from dama_kernels.checks import Comparison

QUICK = ["--cases", "single_token,one_pair", "--no-timing", "--seed", "7"]


def test_registered_as_a_dama_command():
    assert COMMANDS["selftest"][0] == "dama_kernels.selftest"


def test_passes_and_prints_the_table(capsys):
    assert selftest.main(QUICK) == 0
    out = capsys.readouterr().out
    assert "token_logps" in out and "sequence_logps" in out and "dama_sigmoid_loss" in out
    assert "single_token (1x16x33)" in out and "one_pair (P=1)" in out
    checks_run = 3 * 3 * len(selftest.device_impls(torch.device("cpu")))  # ops x precisions x implementations
    assert f"{checks_run} of {checks_run} checks passed" in out


def test_json_lists_every_check(capsys):
    assert selftest.main([*QUICK, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seed"] == 7 and report["failures"] == []
    ops = {(check["op"], check["precision"]) for check in report["checks"]}
    assert ops == {(op, p) for op in ("token_logps", "sequence_logps", "dama_sigmoid_loss")
                   for p in ("fp32", "bf16", "fp16")}
    assert all(check["ok"] and check["comparisons"] for check in report["checks"])


def test_timing_line_against_full_logits(capsys):
    assert selftest.main(["--cases", "single_token", "--seed", "1"]) == 0
    assert "full logits" in capsys.readouterr().out


def test_failure_exits_1_and_names_the_case(monkeypatch, capsys):
    def wrong(case, dtype, impl, device, **kwargs):
        return [Comparison("token_logps d_weight", error=1.0, allowed=0.5)]

    monkeypatch.setattr(selftest.checks, "check_token_logps", wrong)
    assert selftest.main(QUICK) == 1
    out = capsys.readouterr().out
    assert "FAILED cpu torch token_logps single_token (1x16x33) fp32: token_logps d_weight: max error" in out


def test_a_crashing_check_is_a_failure_not_a_crash(monkeypatch, capsys):
    def crash(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(selftest.checks, "check_dama_sigmoid_loss", crash)
    assert selftest.main([*QUICK, "--json"]) == 1
    failures = json.loads(capsys.readouterr().out)["failures"]
    assert failures and all("RuntimeError: out of resources" in f and "one_pair" in f for f in failures)


def test_a_failed_timing_is_reported_and_fails_the_run(monkeypatch, capsys):
    def crash(device, case):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(selftest, "timing_record", crash)
    assert selftest.main(["--cases", "single_token", "--seed", "3"]) == 1
    out = capsys.readouterr().out
    assert "single_token (1x16x33)             failed: RuntimeError: launch failed" in out
    assert "FAILED cpu timing single_token (1x16x33): RuntimeError: launch failed" in out


@pytest.mark.parametrize("argv, message", [(["--arch", "sm_70"], "unknown --arch"),
                                           (["--cases", "nope"], "unknown --cases")])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        selftest.main(argv)
    assert message in capsys.readouterr().err

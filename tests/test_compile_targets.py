"""Every Triton kernel we ship, compiled ahead of time for sm_80, sm_86, sm_89 and sm_90 (no GPU needed).

Per kernel, target, precision (fp16, bf16, fp32, and fp32 as TF32) and variant (with and without bias; the backward's
d_logits kernel also with gradient filtering, and the filtered backward's products over kept tiles): it compiles at the
blocks linear_logprob_blocks (kept_product_blocks for the products) picks for that target, needs no more shared memory
than the target has, fits the register file, and 16-bit / TF32 log-prob kernels use tensor cores (mma; wgmma on
sm_90). All compiles run once, in
`dama selftest --compile-only --json` (which leaves the Triton interpreter behind when the test run uses it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dama_kernels.aot_compile import (
    KEPT_PRODUCT_KERNELS,
    PRECISIONS,
    TARGETS,
    all_specs,
    compile_targets,
    kept_blocks,
    logprob_blocks,
)
from dama_kernels.launch_config import linear_logprob_candidates, running_in_interpreter

SPECS = all_specs(list(TARGETS))


@pytest.fixture(scope="module")
def compiled() -> dict:
    command = [sys.executable, "-m", "dama_kernels.selftest", "--compile-only", "--arch", ",".join(TARGETS), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.stdout.strip(), f"no output (exit status {done.returncode}): {done.stderr[-2000:]}"
    records = json.loads(done.stdout)["records"]
    return {(r["kernel"], r["target"], r["precision"], r["variant"]): r for r in records}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kernel}-{s.target}-{s.precision}-{s.variant}")
def test_compiles_within_the_targets_limits(spec, compiled):
    record = compiled[(spec.kernel, spec.target, spec.precision, spec.variant)]
    if record["status"] == "skipped":
        pytest.skip(record["reason"])
    assert record["status"] == "ok", record["reason"]
    assert record["shared_bytes"] <= record["shared_limit_bytes"]
    if record["registers"] is not None:
        assert record["registers"] * record["threads"] <= 64 * 1024
    dtype = PRECISIONS[spec.precision][0]
    if spec.kernel.startswith("linear_logprob"):
        if dtype != torch.float32 or spec.precision == "tf32x3":
            assert record["tensor_cores"] == ("wgmma" if spec.target == "sm_90" else "mma")
        else:
            assert record["tensor_cores"] == "none", "IEEE fp32 products cannot use tensor cores"
    if spec.kernel in KEPT_PRODUCT_KERNELS:
        blocks = kept_blocks(spec)
        assert record["blocks"] == (f"{blocks.block_out}x{blocks.block_hidden}x{blocks.block_k} "
                                    f"w{blocks.num_warps} s{blocks.num_stages}")
    elif spec.kernel.startswith("linear_logprob"):
        blocks = logprob_blocks(spec)
        assert record["blocks"] == (f"{blocks.block_n}x{blocks.block_v}x{blocks.block_h} w{blocks.num_warps} "
                                    f"s{blocks.num_stages}")
        kind = "forward" if spec.kernel == "linear_logprob_fwd" else "backward"
        recorded = dict(linear_logprob_candidates(kind, TARGETS[spec.target], dtype))[blocks]
        assert record["shared_bytes"] <= recorded, "launch_config's recorded need is below what Triton allocates"


def test_every_shipped_kernel_is_in_the_matrix():
    assert {spec.kernel for spec in SPECS} == {"linear_logprob_fwd", "linear_logprob_d_logits",
                                               "linear_logprob_d_hidden_kept", "linear_logprob_d_weight_kept",
                                               "dama_loss_fwd", "dama_loss_bwd"}
    assert {spec.precision for spec in SPECS} >= {"fp16", "bf16", "fp32"}
    assert {spec.variant for spec in SPECS if spec.kernel == "linear_logprob_fwd"} == {"bias", "no bias"}
    assert {spec.variant for spec in SPECS if spec.kernel == "linear_logprob_d_logits"} == {"bias", "no bias",
                                                                                          "no bias, filtered"}


@pytest.mark.skipif(not running_in_interpreter(), reason="only the interpreter's stand-in kernels cannot compile")
def test_compiling_interpreted_kernels_is_refused_with_advice():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        compile_targets(["sm_90"])

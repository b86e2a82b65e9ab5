"""bench.tune_blocks on the CPU: its sweep always holds the launchers' own picks for the device, marked."""

from __future__ import annotations

import pytest
import torch

from bench import tune_blocks
from dama_kernels.launch_config import linear_logprob_blocks


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sweep_holds_the_launchers_picks(capability, dtype, monkeypatch):
    monkeypatch.setattr(tune_blocks.torch.cuda, "get_device_capability", lambda *args: capability)
    candidates = tune_blocks.candidates_for(dtype)
    marked = {kind: blocks for blocks, kinds in candidates for kind in kinds}
    assert marked == {kind: linear_logprob_blocks(kind, capability, dtype) for kind in ("forward", "backward")}
    swept = [blocks for blocks, _ in candidates]
    assert len(swept) == len(set(swept)), "each configuration is timed once"
    assert set(tune_blocks.CANDIDATES) <= set(swept)


def test_table_names_the_launchers_pick():
    record = {"provider": "triton", "dtype": "bf16", "N": 1200, "error": "OutOfResources: shared memory",
              "blocks": {"block_n": 128, "block_v": 128, "block_h": 64, "num_warps": 8, "num_stages": 3},
              "launcher_picks": ["forward", "backward"]}
    assert "128x128x64 w8 s3 <- forward+backward" in tune_blocks.format_table([record])

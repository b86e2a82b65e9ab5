"""bench.tune_blocks on the CPU: its sweeps always hold the launchers' own picks for the device, marked."""

from __future__ import annotations

import pytest
import torch

from bench import tune_blocks
from dama_kernels.launch_config import linear_logprob_blocks


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind, candidates", [("forward", tune_blocks.FORWARD_CANDIDATES),
                                               ("backward", tune_blocks.BACKWARD_CANDIDATES)])
def test_sweep_holds_the_launchers_pick(capability, dtype, kind, candidates, monkeypatch):
    monkeypatch.setattr(tune_blocks.torch.cuda, "get_device_capability", lambda *args: capability)
    swept = tune_blocks.candidates_for(kind, candidates, dtype, torch.device("cuda"))
    assert [blocks for blocks, picked in swept if picked] == [linear_logprob_blocks(kind, capability, dtype)]
    assert len(swept) == len({blocks for blocks, _ in swept}), "each configuration is timed once"
    assert set(candidates) <= {blocks for blocks, _ in swept}


def test_table_names_the_launchers_pick():
    record = {"provider": "triton_forward", "dtype": "bf16", "N": 1200, "error": "OutOfResources: shared memory",
              "blocks": {"block_n": 128, "block_v": 128, "block_h": 64, "num_warps": 8, "num_stages": 3},
              "launcher_pick": True}
    assert "triton_forward 128x128x64 w8 s3 <- launcher" in tune_blocks.format_table([record])

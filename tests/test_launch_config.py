"""Blocks per GPU target and dtype: every choice fits the target, and the launchers ask with the device's capability."""

from __future__ import annotations

import pytest
import torch

import dama_kernels.launch_config as launch_config
from dama_kernels.launch_config import (
    DEFAULT_LIMITS,
    INTERPRETER_BLOCKS,
    KIB,
    KINDS,
    LINEAR_LOGPROB_CANDIDATES,
    MEASURED_CANDIDATES,
    TARGET_LIMITS,
    LinearLogprobBlocks,
    device_blocks,
    linear_logprob_blocks,
    linear_logprob_candidates,
    target_limits,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def recorded_need(kind: str, capability, dtype: torch.dtype, blocks) -> int:
    return dict(linear_logprob_candidates(kind, capability, dtype))[blocks]


@pytest.mark.parametrize("capability", [*TARGET_LIMITS, (7, 5), (12, 0)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_choice_fits_the_target(capability, kind, dtype):
    blocks = linear_logprob_blocks(kind, capability, dtype)
    assert recorded_need(kind, capability, dtype, blocks) <= target_limits(capability).shared_memory_bytes
    # 8 warps x 32 threads x 255 registers stays inside the 64K register file whatever ptxas allocates.
    assert blocks.num_warps * 32 * 255 <= target_limits(capability).registers_per_block


def test_first_candidate_that_fits_the_target_is_chosen(monkeypatch):
    large, medium, small = (LinearLogprobBlocks(128, block_v, 64, num_warps=8) for block_v in (256, 128, 64))
    candidates = ((large, 200 * KIB), (medium, 150 * KIB), (small, 90 * KIB))
    monkeypatch.setitem(LINEAR_LOGPROB_CANDIDATES, ("backward", 2), candidates)
    monkeypatch.setattr("dama_kernels.launch_config.MEASURED_CANDIDATES", {})
    assert linear_logprob_blocks("backward", (9, 0), torch.bfloat16) == large  # 227 KiB
    assert linear_logprob_blocks("backward", (8, 0), torch.bfloat16) == medium  # 163 KiB
    assert linear_logprob_blocks("backward", (8, 9), torch.bfloat16) == small  # 99 KiB
    assert linear_logprob_blocks("backward", (12, 0), torch.float16) == small  # unknown: the smallest limit


def test_every_list_ends_with_a_candidate_for_the_smallest_target():
    smallest = min(limits.shared_memory_bytes for limits in (*TARGET_LIMITS.values(), DEFAULT_LIMITS))
    for candidates in LINEAR_LOGPROB_CANDIDATES.values():
        assert candidates[-1][1] <= smallest
        needs = [need for _, need in candidates]
        assert needs == sorted(needs, reverse=True), "candidates go from the largest to the smallest"


@pytest.mark.parametrize(
    "kind, dtype, message",
    [("sideways", torch.float32, "kind must be one of"), ("forward", torch.float64, "take float16, bfloat16")],
)
def test_bad_arguments_raise(kind, dtype, message):
    with pytest.raises(ValueError, match=message):
        linear_logprob_blocks(kind, (9, 0), dtype)


@pytest.mark.parametrize("capability", [(8, 6), (9, 0)])
def test_launchers_ask_with_the_devices_capability(capability, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    asked = []
    monkeypatch.setattr(launch_config.torch.cuda, "get_device_capability", lambda device: asked.append(device)
                        or capability)
    cuda = torch.device("cuda", 1)
    for kind in KINDS:
        assert device_blocks(kind, cuda, torch.float32) == linear_logprob_blocks(kind, capability, torch.float32)
    assert asked == [cuda, cuda]


def test_interpreter_and_cpu_use_the_interpreter_blocks(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert device_blocks("forward", torch.device("cuda", 0), torch.bfloat16) == INTERPRETER_BLOCKS
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert device_blocks("backward", torch.device("cpu"), torch.bfloat16) == INTERPRETER_BLOCKS


def test_measured_candidates_apply_only_to_their_generation():
    wide = MEASURED_CANDIDATES[((9, 0), "forward", 2)][0][0]
    assert linear_logprob_blocks("forward", (9, 0), torch.bfloat16) == wide
    assert linear_logprob_blocks("backward", (9, 0), torch.float16) == wide
    for capability in ((8, 0), (8, 6), (8, 9)):
        assert linear_logprob_blocks("forward", capability, torch.bfloat16) != wide
    assert linear_logprob_blocks("forward", (9, 0), torch.float32) != wide  # measured for 16-bit tiles only

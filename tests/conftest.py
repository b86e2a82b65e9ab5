"""Test set-up: without a GPU, Triton kernels run in the interpreter, which must be chosen before triton is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test tensors are tiny: one intra-op thread avoids OpenMP hand-offs that cost more than the maths (a tiny LLaVA
# step measured 0.04 s with one thread against 1-3 s with two on a loaded 2-core machine).
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def llava15_checkpoint(tmp_path_factory):
    """A saved checkpoint shaped like llava-hf/llava-1.5-7b-hf, tiny in width and depth (tests/llava15_shaped.py)."""
    from tests.llava15_shaped import build_llava15_shaped

    return build_llava15_shaped(tmp_path_factory.mktemp("llava15") / "model")

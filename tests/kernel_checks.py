"""Shared helpers of the kernel tests: the tolerance table, the gold-standard comparison, poisoned allocations."""

from __future__ import annotations

import contextlib

import torch

# Error allowed on top of the baseline's, relative to the largest gold value (at least 1): the only tolerance table.
# Kernels compute in fp32 whatever the input dtype, so 16-bit rows differ only in how gradients are rounded on output.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
# Direct check of fp32 results against float64 (relative to the largest gold value, at least 1).
FP32_DIRECT = 2e-5


def assert_matches_gold(actual: torch.Tensor, gold: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype,
                        what: str, direct: bool = True) -> None:
    """Three-way criterion: |actual - gold| <= 2 |baseline - gold| + tol * scale, element-wise maxima.

    gold is float64; baseline is what a careful same-precision implementation gets (fp32 maths, outputs in `dtype`).
    `direct` adds a fixed fp32 bound; ill-conditioned inputs (near-tied logits in the hundreds, where fp32 rounding of
    the logits alone moves the softmax) are held to the baseline term only.
    """
    assert actual.shape == gold.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(gold.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an element left unwritten?)"
    scale = gold.abs().max().clamp(min=1).item()
    err = (actual.double() - gold).abs().max().item()
    base = (baseline.double() - gold).abs().max().item()
    allowed = 2 * base + TOLERANCES[dtype] * scale
    assert err <= allowed, f"{what}: max error {err:.3e} > allowed {allowed:.3e} (baseline {base:.3e})"
    if direct and actual.dtype == torch.float32 and dtype == torch.float32:
        assert err <= FP32_DIRECT * scale, f"{what}: fp32 error {err:.3e} > {FP32_DIRECT * scale:.3e}"


@contextlib.contextmanager
def poisoned_allocations():
    """Within the block, torch.empty / torch.empty_like return NaN-filled float tensors (-1 for ints).

    Outputs the code under test allocates this way and then forgets to write show up as NaN.
    """
    original_empty, original_empty_like = torch.empty, torch.empty_like

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.fill_(float("nan") if tensor.dtype.is_floating_point else -1)

    def empty(*args, **kwargs):
        return poison(original_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(original_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = original_empty, original_empty_like

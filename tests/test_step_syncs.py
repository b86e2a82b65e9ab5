"""No host sync between the collated batch and the optimizer step (CUDA only; skipped elsewhere).

Each layer's attention on a GPU must not wait for the device: the collator checks the bounds once per batch on the
CPU and hands the model Python ints and device tensors. `torch.cuda.set_sync_debug_mode("error")` turns every
synchronising call into an error, so these tests name the first one that is left.

transformers' LLaVA checks, once per forward, that the image tokens match the image features (a sync); the
collators guarantee it, and TRANSFORMERS_DISABLE_TORCH_CHECK=1 switches that check off.
"""

from __future__ import annotations

import pytest
import torch

from dama.data.collator import PackedCollator, PrefixSharedCollator
from dama.data.dataset import PreferenceDataset
from dama.demo.data import demo_corpus, make_demo_data
from dama.demo.tiny_llava import build_tiny_llava
from dama.method.config import DamaMethodConfig
from dama.method.loss import DamaLoss
from dama.model.policy import DamaPolicy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

COLLATORS = {"prefix_shared": PrefixSharedCollator(), "packed": PackedCollator()}


@pytest.fixture(scope="module")
def tiny_on_cuda(tmp_path_factory):
    folder = tmp_path_factory.mktemp("syncs")
    paths = make_demo_data(folder / "data", num_train=4, num_eval=0, image_size=32)
    model, processor = build_tiny_llava(demo_corpus(), seed=3)
    dataset = PreferenceDataset.from_path(paths["train"], processor, cache_dir=folder / "cache", max_length=512)
    return model.to(device="cuda", dtype=torch.bfloat16), [dataset[i] for i in range(len(dataset))]


def _warm_batch(policy: DamaPolicy, layout: str, examples):
    """The collated batch on the GPU, after one unchecked step (first calls load kernels and may sync)."""
    batch = COLLATORS[layout](examples).to("cuda")
    policy(batch).sum().backward()
    torch.cuda.synchronize()
    return batch


@pytest.mark.parametrize("layout", COLLATORS)
def test_policy_forward_and_backward_do_not_sync(tiny_on_cuda, layout, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    model, examples = tiny_on_cuda
    policy = DamaPolicy(model, head="fused")
    batch = _warm_batch(policy, layout, examples)
    torch.cuda.set_sync_debug_mode("error")
    try:
        logps = policy(batch)
        logps.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logps).all()


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="DamaLoss reads device values per step: its finite-margin check, the injected-mask checks, "
                          "the outlier filter's draw on the CPU and the missing-hardness count")
@pytest.mark.parametrize("layout", COLLATORS)
def test_training_step_does_not_sync(tiny_on_cuda, layout, monkeypatch):
    """The whole step: policy forward, the DAMA loss (as DPO here: no hardness, no filter), backward."""
    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    model, examples = tiny_on_cuda
    policy = DamaPolicy(model, head="fused")
    loss_fn = DamaLoss(DamaMethodConfig(beta=0.1, data_aware=False, model_aware=False)).cuda()
    batch = _warm_batch(policy, layout, examples)
    reference = torch.full((batch.num_pairs,), -50.0, device="cuda")  # the demo data has no reference log-probs
    torch.cuda.set_sync_debug_mode("error")
    try:
        chosen, rejected = batch.split_chosen_rejected(policy(batch))
        result = loss_fn(chosen, rejected, reference, reference, batch.hardness)
        result.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

"""DamaLoss under data parallelism on the CPU (gloo, 2 processes) and under gradient accumulation.

Two ranks each holding part of a fixed global batch must reproduce one process holding all of it: the sum of the
ranks' losses is the global loss, each rank's gradients are the global gradients of its pairs, the masks, betas,
metrics and running state are the same. With DDP, which averages gradients over ranks, backward on loss_for_ddp
gives the single-process gradient of a shared parameter.

Gradient accumulation (micro-batches of one process) is another matter: alpha_M and the filter draw are statistics
of the micro-batch (docs/method.md section 4), so beta_C, the mask and the loss follow the split. What does match
with ema_update="optimizer_step" is shown at the end of this file.
"""

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dama.method.config import DamaMethodConfig
from dama.method.distributed import all_reduce_sum, get_rank, get_world_size
from dama.method.loss import DamaLoss

GLOBAL_PAIRS = 10
STEPS = 3
FEATURES = 4
# Rows of the global batch held by rank 0 and rank 1.
SPLITS = {"even": (5, 5), "uneven": (7, 3)}
HARDNESS_MEAN = 0.05
STATE_NAMES = ("running_margin", "running_margin_std", "running_loss_mean", "running_loss_std")


def _config(**overrides) -> DamaMethodConfig:
    return DamaMethodConfig(**{"loss_impl": "torch", **overrides})


def _global_batches(num_pairs: int = GLOBAL_PAIRS, steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    """Fixed float64 global batches; margins of a few units so that the filter has outliers to drop."""
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(steps):
        batch = {name: -20 + 2 * torch.randn(num_pairs, generator=generator, dtype=torch.float64)
                 for name in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")}
        batch["hardness"] = 0.3 * torch.randn(num_pairs, generator=generator, dtype=torch.float64)
        batch["hardness"][3] = float("nan")
        batch["features"] = torch.randn(2, num_pairs, FEATURES, generator=generator, dtype=torch.float64)
        batches.append(batch)
    return batches


def _run_steps(loss_module: DamaLoss, batches: list[dict[str, torch.Tensor]], part: slice) -> dict:
    """Forward and backward on the rows `part` of every batch; records what must match across layouts."""
    records = {key: [] for key in ("loss", "global_loss", "grad_chosen", "grad_rejected", "mask", "beta",
                                   "alpha_model", "metrics")}
    for batch in batches:
        policy_chosen = batch["policy_chosen"][part].clone().requires_grad_()
        policy_rejected = batch["policy_rejected"][part].clone().requires_grad_()
        output = loss_module(policy_chosen, policy_rejected, batch["ref_chosen"][part], batch["ref_rejected"][part],
                             batch["hardness"][part])
        output.loss.backward()
        records["loss"].append(output.loss.detach())
        records["global_loss"].append(all_reduce_sum(output.loss))
        records["grad_chosen"].append(policy_chosen.grad)
        records["grad_rejected"].append(policy_rejected.grad)
        records["mask"].append(output.mask)
        records["beta"].append(output.beta)
        records["alpha_model"].append(output.alpha_model)
        records["metrics"].append(output.metrics)
    records["state"] = dict(loss_module.state_dict())
    return records


def _linear_model() -> nn.Linear:
    model = nn.Linear(FEATURES, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0, 0.25]], dtype=torch.float64))
    return model


def _shared_parameter_grad(
    model: nn.Module, batch: dict[str, torch.Tensor], part: slice, world_size: int
) -> torch.Tensor:
    """One step where the policy log-probs come from a shared parameter: returns its gradient after backward."""
    features = batch["features"][:, part]  # (2, p, FEATURES)
    # One forward for chosen and rejected: DDP expects one forward per backward.
    logps = model(features.reshape(-1, FEATURES)).squeeze(-1).view(2, -1) + batch["ref_chosen"][part]  # (2, p)
    loss_module = DamaLoss(_config(), hardness_mean=HARDNESS_MEAN)
    output = loss_module(logps[0], logps[1], batch["ref_chosen"][part], batch["ref_rejected"][part],
                         batch["hardness"][part])
    (output.loss_for_ddp if world_size > 1 else output.loss).backward()
    parameters = model.module.weight if isinstance(model, DistributedDataParallel) else model.weight
    return parameters.grad.detach().clone()


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        batches = _global_batches()
        results = {"rank": get_rank(), "world_size": get_world_size()}
        for name, sizes in SPLITS.items():
            start = sum(sizes[:rank])
            loss_module = DamaLoss(_config(), hardness_mean=HARDNESS_MEAN)
            results[name] = _run_steps(loss_module, batches, slice(start, start + sizes[rank]))
        ddp_model = DistributedDataParallel(_linear_model())
        start = sum(SPLITS["uneven"][:rank])
        results["ddp_grad"] = _shared_parameter_grad(
            ddp_model, batches[0], slice(start, start + SPLITS["uneven"][rank]), world_size
        )
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    batches = _global_batches()

    for split in SPLITS:
        single = _run_steps(DamaLoss(_config(), hardness_mean=HARDNESS_MEAN), batches, slice(0, GLOBAL_PAIRS))
        parts = [r[split] for r in ranks]
        for step in range(STEPS):
            # The SUM over ranks of the per-rank losses is the global loss; all_reduce_sum gives it on every rank.
            rank_sum = parts[0]["loss"][step] + parts[1]["loss"][step]
            torch.testing.assert_close(rank_sum, single["loss"][step], rtol=1e-13, atol=0)
            for part in parts:
                torch.testing.assert_close(part["global_loss"][step], single["loss"][step], rtol=1e-13, atol=0)
            # Each rank's gradients are the global gradients of its own pairs; the masks and betas are the
            # global ones sliced by global rank.
            for key in ("grad_chosen", "grad_rejected", "mask", "beta"):
                joined = torch.cat([part[key][step] for part in parts])
                torch.testing.assert_close(joined, single[key][step], rtol=1e-14, atol=0)
            assert int(single["mask"][step].sum()) == 8  # floor(0.8 * 10), the same draw everywhere
            for part in parts:
                assert torch.equal(part["alpha_model"][step], single["alpha_model"][step])
                for name, value in single["metrics"][step].items():
                    assert torch.equal(part["metrics"][step][name], value), (split, step, name)
        for part in parts:
            for name, value in single["state"].items():
                assert torch.equal(part["state"][name], value), (split, name)
        assert single["state"]["num_updates"].item() == STEPS

    # The filter did drop pairs, and not the same ones at every step.
    masks = single["mask"]
    assert not torch.equal(masks[0], masks[1]) or not torch.equal(masks[1], masks[2])

    # DDP averages the ranks' gradients: with loss_for_ddp (loss * world_size) that average is the global gradient.
    expected = _shared_parameter_grad(_linear_model(), batches[0], slice(0, GLOBAL_PAIRS), world_size=1)
    for rank in ranks:
        torch.testing.assert_close(rank["ddp_grad"], expected, rtol=1e-12, atol=1e-15)


# Gradient accumulation: one process, the global batch as two micro-batches, ema_update="optimizer_step"


def _micro_batch_outputs(config: DamaMethodConfig, batch: dict, parts: list[slice], selected: torch.Tensor | None):
    loss_module = DamaLoss(config, hardness_mean=HARDNESS_MEAN)
    outputs, grads = [], []
    for part in parts:
        policy_chosen = batch["policy_chosen"][part].clone().requires_grad_()
        output = loss_module(policy_chosen, batch["policy_rejected"][part], batch["ref_chosen"][part],
                             batch["ref_rejected"][part], batch["hardness"][part],
                             None if selected is None else selected[part])
        output.loss.backward()
        outputs.append(output)
        grads.append(policy_chosen.grad)
    loss_module.end_optimizer_step()
    return loss_module, outputs, grads


WHOLE = [slice(0, GLOBAL_PAIRS)]
HALVES = [slice(0, 5), slice(5, GLOBAL_PAIRS)]


def test_micro_batches_move_the_running_state_like_the_whole_batch():
    """Matches: the R each micro-batch uses (the previous optimizer step's), and after end_optimizer_step the
    running statistics (release: every pair of the step counts, whatever the draws) and the counters, except
    num_steps, which counts forwards (one draw each). Differs: the draws, alpha_M, beta_C and the loss."""
    config = _config(ema_update="optimizer_step")
    batches = _global_batches(steps=2)
    whole = DamaLoss(config, hardness_mean=HARDNESS_MEAN)
    micro = DamaLoss(config, hardness_mean=HARDNESS_MEAN)
    for batch in batches:
        used = []
        for loss_module, parts in ((whole, WHOLE), (micro, HALVES)):
            for part in parts:
                output = loss_module(batch["policy_chosen"][part], batch["policy_rejected"][part],
                                     batch["ref_chosen"][part], batch["ref_rejected"][part], batch["hardness"][part])
                used.append(output.metrics["dama/running_margin"])
            loss_module.end_optimizer_step()
        assert used[0] == used[1] == used[2]
        for name in STATE_NAMES:
            torch.testing.assert_close(getattr(micro, name), getattr(whole, name), rtol=1e-12, atol=1e-15)
    assert whole.running_margin.item() != 0
    for name in ("num_updates", "missing_hardness", "beta_clamped", "filter_fallbacks"):
        assert getattr(micro, name).item() == getattr(whole, name).item(), name
    assert (whole.num_steps.item(), micro.num_steps.item()) == (2, 4)


def test_micro_batches_in_the_paper_variant_match_for_the_same_selected_pairs():
    # The paper's EMA target is the mean over the selected pairs: the same pairs give the same R.
    config = _config(variant="paper", ema_update="optimizer_step")
    batch = _global_batches(steps=1)[0]
    selected = torch.tensor([True, False, True, True, True, True, True, False, True, True])
    whole, _, _ = _micro_batch_outputs(config, batch, WHOLE, selected)
    micro, _, _ = _micro_batch_outputs(config, batch, HALVES, selected)
    torch.testing.assert_close(micro.running_margin, whole.running_margin, rtol=1e-12, atol=0)


def test_micro_batch_losses_weighted_by_their_selected_counts_give_the_whole_loss():
    """Without the model-aware factor beta_C is per pair, so the loss splits exactly: the whole-batch loss is
    sum_m loss_m * K_m / sum_m K_m, and so are its gradients. With equal K_m this is the plain mean over
    micro-batches that gradient accumulation takes (loss / accumulation steps)."""
    config = _config(model_aware=False, ema_update="optimizer_step")
    batch = _global_batches(steps=1)[0]
    for selected in (
        torch.tensor([True, True, False, True, True, True, False, True, True, True]),  # K = 4 and 4
        torch.tensor([True, False, False, True, False, True, True, True, True, True]),  # K = 2 and 5
    ):
        _, [whole], [whole_grad] = _micro_batch_outputs(config, batch, WHOLE, selected)
        _, outputs, grads = _micro_batch_outputs(config, batch, HALVES, selected)
        counts = [output.num_selected for output in outputs]
        total = sum(counts)
        weighted = sum(output.loss * count for output, count in zip(outputs, counts, strict=True)) / total
        torch.testing.assert_close(weighted, whole.loss, rtol=1e-13, atol=0)
        weighted_grad = torch.cat([grad * count / total for grad, count in zip(grads, counts, strict=True)])
        torch.testing.assert_close(weighted_grad, whole_grad, rtol=1e-13, atol=1e-16)
    torch.testing.assert_close((outputs[0].beta, outputs[1].beta), (whole.beta[:5], whole.beta[5:]))

"""Small torch.distributed helpers over the default process group; each is a no-op without an initialised group.

Ranks are GLOBAL ranks: with several nodes, the local rank would repeat across nodes and pick the wrong slice of a
gathered batch (a defect of the authors' released code, docs/method.md section 10).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process; 0 without torch.distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the default group; 1 without torch.distributed."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_cat(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenates every rank's tensor along dim 0, in global rank order; ranks may hold different lengths.

    The input is detached: nothing is differentiated through the gather. The rows of rank r are
    gathered[sum(sizes[:r]) : sum(sizes[:r + 1])].

    Shapes: tensor (n_r, *rest) on the group's device (CPU for gloo, CUDA for nccl), same rest and dtype on every
    rank. Returns (gathered (sum_r n_r, *rest), sizes [n_0, ..., n_{W-1}]).
    """
    tensor = tensor.detach()
    if not is_distributed():
        return tensor, [tensor.shape[0]]
    world_size = dist.get_world_size()
    # all_gather needs equal shapes: exchange the lengths first, then pad every tensor to the longest.
    local_size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    size_list = [torch.empty_like(local_size) for _ in range(world_size)]
    dist.all_gather(size_list, local_size)
    sizes = [int(size.item()) for size in size_list]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)]), sizes


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all ranks, as a new detached tensor (the input is left unchanged)."""
    total = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total

"""Memory readings for the benchmarks: the peak of tensor bytes allocated inside a region, and the process RSS.

Tensor bytes are counted at the allocator, so they are deterministic and include the temporaries that kernels allocate
internally, which a hook on op outputs would miss. Tensors that exist when the region begins (the inputs) are outside
the count by construction.
- CPU: the profiler with profile_memory=True records every allocation and free (address, signed size). Replayed in time
  order, their running sum is the live bytes at each moment; its maximum is the peak. Storages the region hands back
  (the gradients of a backward pass) can be left out of the sum from the moment they are allocated, so the working
  memory is exact even when those outputs are allocated after the peak.
- CUDA: torch.cuda.max_memory_allocated minus the bytes allocated when the region begins; the outputs are subtracted
  from that peak, which undercounts when they are allocated after it.
RSS comes from the kernel: it also counts the allocator's free lists, the libraries and the interpreter, so it is
reported beside the tensor peak, never instead of it.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import psutil
import torch
from torch._C._profiler import _EventType
from torch.autograd.profiler import profile


class PeakReading:
    """Filled in when the tracked region exits; working_bytes() then gives the peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # CPU: (time_ns, address, signed bytes) per allocation or free, in time order. CUDA: the peak over the baseline.
        self.allocations: list[tuple[int, int, int]] = []
        self.cuda_peak_bytes = 0

    def working_bytes(self, outputs: Iterable[torch.Tensor] = ()) -> int:
        """Most bytes live at once inside the region, not counting the storages of `outputs`.

        outputs: tensors the region produced and that are still alive, such as the .grad of the inputs.
        """
        outputs = list(outputs)
        if self.device.type == "cuda":
            return max(self.cuda_peak_bytes - sum(t.untyped_storage().nbytes() for t in outputs), 0)
        output_addresses = {t.untyped_storage().data_ptr() for t in outputs}
        # A live output is held by the last allocation made at its address.
        last_at_address = {}
        for index, (_, address, size) in enumerate(self.allocations):
            if size > 0 and address in output_addresses:
                last_at_address[address] = index
        left_out = set(last_at_address.values())
        live = peak = 0
        for index, (_, _, size) in enumerate(self.allocations):
            if index not in left_out:
                live += size
                peak = max(peak, live)
        return peak


def _allocation_events(roots) -> list[tuple[int, int, int]]:
    events, stack = [], list(roots)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
        stack.extend(node.children)
    # The tree is kept per thread; sorting by time replays allocations and frees as they happened.
    return sorted(events, key=lambda event: event[0])


@contextmanager
def track_peak(device: torch.device) -> Iterator[PeakReading]:
    """Records the tensor allocations on `device` inside the `with` block.

    On the CPU the block runs under the profiler, which slows it down a little: do not time the same block.
    """
    reading = PeakReading(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        yield reading
        torch.cuda.synchronize(device)
        reading.cuda_peak_bytes = torch.cuda.max_memory_allocated(device) - baseline
        return
    # The autograd profiler rather than torch.profiler.profile, whose start imports torch._inductor: seconds of
    # start-up and some 150 MB of resident memory in a process whose RSS is being measured.
    with profile(use_cpu=True, use_kineto=True, profile_memory=True) as prof:
        yield reading
    reading.allocations = _allocation_events(prof.kineto_results.experimental_event_tree())


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Largest resident set size this process has had since it started (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

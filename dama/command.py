"""How every `dama <command>` ends: its summary on stdout and exit 0, or one error line on stderr and exit 1.

Bad input the project checked (a missing file, a wrong option, a bad row: `dama.errors.DamaError`) is reported as
`dama <command>: error: <what to do>`, never as a traceback; anything else is a bug, or a failure of the machine,
and keeps its traceback (see dama.errors). A resumable stop (dama.exit_status: a signal, a full disk) is one line
too, with its own exit status.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from dama.errors import DamaError
from dama.exit_status import ResumableStop


def run_command(name: str, action: Callable[[], str | None]) -> int:
    """Runs `action` (which returns the summary to print, or None) as the command `dama <name>`."""
    try:
        summary = action()
    except ResumableStop as stop:
        print(f"dama {name}: {stop.label}: {stop}", file=sys.stderr)
        return stop.exit_status
    except DamaError as error:
        print(f"dama {name}: error: {error}", file=sys.stderr)
        return 1
    if summary:
        print(summary)
    return 0


def check_device_argument(device: str) -> None:
    """DamaError unless `--device` names a torch device this machine has (cpu, cuda, cuda:N)."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise DamaError(f"--device {device!r} is not a torch device ({error}); give cpu, cuda or cuda:N") from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise DamaError(f"--device {device} asks for CUDA but no CUDA GPU is available here; use --device cpu")

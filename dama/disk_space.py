"""Disk space before a save, and a failed write told as one line: what it needed, what was free, what is intact.

`check_room` compares the free space of the filesystem a save goes to with the bytes it will need and raises
WriteFailed (exit status 74, dama.exit_status) before anything is written when it cannot fit. `write_failure`
turns an error raised while writing (OSError ENOSPC, EDQUOT or EIO; the same errors as torch's and safetensors'
serializers word them) into the same kind of line; any other error is left as it is.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from dama.exit_status import WriteFailed

WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)
# How torch's zip writer and safetensors report a write the disk refused (they raise RuntimeError or their own type,
# with the operating system's text inside).
WRITE_ERROR_TEXTS = ("No space left on device", "Disk quota exceeded", "Input/output error", "file write failed",
                     "unexpected pos", "os error 28", "os error 122", "os error 5")


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'; binary units, as `df -h` prints them."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while power < len(units) - 1 and abs(count) >= 1024 ** (power + 1):
        power += 1
    return f"{count} B" if power == 0 else f"{count / 1024 ** power:.1f} {units[power]}"


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem of `path` (its nearest existing folder)."""
    existing = Path(path).resolve()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def tree_bytes(path: str | Path) -> int:
    """Total size of the files under `path` (a file: its size)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file() and not file.is_symlink())


def check_room(where: str | Path, needed: int, what: str, intact: str) -> None:
    """WriteFailed unless `needed` bytes fit on the filesystem of `where`; `what` names the save, `intact` what a
    rerun continues from (e.g. "the last complete checkpoint is .../checkpoint-20")."""
    free = free_bytes(where)
    if free < needed:
        raise WriteFailed(f"not enough disk space for {what}: it needs about {format_bytes(needed)}, "
                          f"{format_bytes(free)} free on {_mount_of(where)}; {intact}. Free space, then "
                          "rerun with the same command (dama train: --resume true)")


def is_write_error(error: BaseException) -> bool:
    """True for an error that says the disk refused a write (full, over quota, I/O error)."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        return True
    return not isinstance(error, OSError) and any(text in str(error) for text in WRITE_ERROR_TEXTS)


def write_failure(error: BaseException, where: str | Path, needed: int | None, what: str, intact: str) -> WriteFailed:
    """The one line for a write error (`is_write_error`) raised while writing `what` under `where`."""
    reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else " ".join(str(error).split())
    need = f"it needs about {format_bytes(needed)}, " if needed else ""
    return WriteFailed(f"writing {what} failed ({reason}): {need}{format_bytes(free_bytes(where))} free on "
                       f"{_mount_of(where)}; {intact}. Free space, then rerun with the same command "
                       "(dama train: --resume true)")


def _mount_of(path: str | Path) -> str:
    """The mount point of `path`'s filesystem: where `df` would show the space."""
    current = Path(path).resolve()
    while not current.exists():
        current = current.parent
    while not os.path.ismount(current):
        current = current.parent
    return str(current)

"""One writer per output: `dama train` and every pass hold an exclusive lock on their output while they run.

The lock is a file beside the output, `<output>.lock` (beside the folder for `dama train`, so that nothing is
written inside output_dir before the start-up checks pass), held with `fcntl.flock`. The kernel releases a flock
when its holder dies, however it dies, so a crashed run never blocks the next one; the file's text (host, pid, start
time) only serves to name the holder in the refusal and to say whose lock is taken over. A lock file left by a holder
on another host is not taken over: flock may not reach across hosts on a network filesystem, and whether that
process is still running cannot be checked from here.

The file is removed while the lock is still held, and a taker checks after locking that the path still names the file
it locked, so a launch that races with the removal retries instead of locking a file no one else can see.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from dama.errors import DamaError

logger = logging.getLogger(__name__)
LOCK_SUFFIX = ".lock"
# A holder writes its record right after it locks; a reader that finds the file still empty waits this long for it.
RECORD_WAIT_S = 2.0


class OutputLockedError(DamaError):
    """Another process is writing the output (raised by `OutputLock.acquire`, reported as one line)."""


def lock_path(output: str | Path) -> Path:
    """Where the lock of `output` (a file, or `dama train`'s output_dir) lives: `<output>.lock` beside it."""
    resolved = Path(output).resolve()
    return resolved.with_name(resolved.name + LOCK_SUFFIX)


def _read_record(handle) -> dict | None:
    handle.seek(0)
    text = handle.read()
    try:
        record = json.loads(text) if text.strip() else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _describe(record: dict | None) -> str:
    if record is None:
        return "a process that has not recorded itself yet"
    return (f"`dama {record.get('command', '?')}` on host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
            f"started {record.get('started', '?')}")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user holds the pid
    return True


class OutputLock:
    """The exclusive lock on one output; `with OutputLock(output, "train"):` holds it for the block.

    acquire() raises OutputLockedError naming the holder when another live process has it, at once (no waiting).
    """

    def __init__(self, output: str | Path, command: str) -> None:
        self.output = Path(output)
        self.command = command
        self.path = lock_path(output)
        self._handle = None

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    handle.close()
                    raise
                holder = self._wait_for_record(handle)
                handle.close()
                raise OutputLockedError(
                    f"{self.output} is being written by {_describe(holder)} (lock {self.path}): wait for that run "
                    "to end, stop it, or write to another output"
                ) from None
            try:
                same_file = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            handle.close()  # the holder removed the file between our open and our lock: take the new one
        previous = _read_record(handle)
        if previous is not None:
            self._take_over(handle, previous)
        record = {"command": self.command, "host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "output": str(self.output)}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle
        return self

    def _wait_for_record(self, handle) -> dict | None:
        deadline = time.monotonic() + RECORD_WAIT_S
        record = _read_record(handle)
        while record is None and time.monotonic() < deadline:
            time.sleep(0.1)
            record = _read_record(handle)
        return record

    def _take_over(self, handle, previous: dict) -> None:
        """The file names a holder that no longer holds the lock: it ended without removing the file."""
        if previous.get("host") != socket.gethostname():
            handle.close()
            raise OutputLockedError(
                f"{self.output} is locked by {_describe(previous)} (lock {self.path}), which cannot be checked from "
                f"this host: if that run has ended, delete {self.path} and launch again"
            )
        pid = previous.get("pid")
        state = "no longer running" if isinstance(pid, int) and not _pid_running(pid) else "not holding the lock"
        message = f"taking over the stale lock {self.path} of {_describe(previous)} ({state})"
        logger.warning(message)
        print(f"dama {self.command}: warning: {message}", file=sys.stderr)

    def release(self) -> None:
        if self._handle is None:
            return
        # Removed while still locked (see the module docstring), then unlocked by closing.
        self.path.unlink(missing_ok=True)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

"""The exit statuses of `dama <command>` that a scheduler or a wrapper script acts on, and the stops that give them.

    0   done (or already complete)
    1   bad input or a start-up check failed: one line says what to change
    2   a command-line usage error (argparse)
    74  EXIT_WRITE_FAILED: the disk has no room for the next save, or a write failed (ENOSPC, EDQUOT, EIO); the last
        complete checkpoint (or a pass's partial results) is intact: free space, then rerun with --resume true (the
        passes: the same command)
    75  EXIT_REQUEUE: stopped by a signal (save_on_signal) after saving a complete checkpoint; requeue the job with
        --resume true. 75 is sysexits' EX_TEMPFAIL, "try again later".

A signal that arrives a second time while the first is being handled ends the process at once, as the signal's own
default action does (exit status 128 + the signal's number in a shell: 143 for SIGTERM).
"""

from __future__ import annotations

EXIT_WRITE_FAILED = 74
EXIT_REQUEUE = 75


class ResumableStop(Exception):
    """A run stopped on purpose with its last complete state on disk; `dama <command>` prints one line,
    `dama <command>: <label>: <message>`, and exits with `exit_status`."""

    exit_status = 1
    label = "error"


class Preempted(ResumableStop):
    """Stopped by a signal after a complete checkpoint was written: requeue with --resume true."""

    exit_status = EXIT_REQUEUE
    label = "stopped"


class WriteFailed(ResumableStop):
    """No room for a save, or a write failed; what was saved before is intact."""

    exit_status = EXIT_WRITE_FAILED

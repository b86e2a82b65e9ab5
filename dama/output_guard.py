"""What every pass (`dama hardness`, `dama precompute-ref`, `dama generate`) does around its work on one output:
the output's lock (dama.output_lock), taken before its start-up checks; the disk space the output will need,
checked before any row is scored; a write the disk refuses told as one line (dama.disk_space), with the finished
rows kept in `<output>.partial.jsonl` for the rerun.

    with OutputGuard("hardness", options.output, needed=lambda: input_bytes(options.input)):
        metadata = compute_hardness(options)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dama.disk_space import check_room, is_write_error, tree_bytes, write_failure
from dama.offline.passes import partial_path
from dama.output_lock import OutputLock

KEPT = "the rows finished so far are kept in {partial} and a rerun with the same arguments skips them"


def input_bytes(path: str | Path) -> int:
    """The size of a pass's input, what its output (the input plus a few columns) needs; 0 when it is missing (the
    pass's own check then says so)."""
    return tree_bytes(path) if Path(path).exists() else 0


class OutputGuard:
    """Context of one pass run on `output`: lock, space check, write failures as WriteFailed (exit status 74)."""

    def __init__(self, command: str, output: str | Path, needed: Callable[[], int]) -> None:
        self.output = Path(output)
        self.lock = OutputLock(output, command)
        self.needed = needed
        self.partial = partial_path(output)

    def __enter__(self) -> OutputGuard:
        self.lock.acquire()
        try:
            self.bytes_needed = self.needed()
            check_room(self.output.parent, self.bytes_needed, str(self.output), KEPT.format(partial=self.partial))
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.lock.release()
        if error is not None and is_write_error(error):
            raise write_failure(error, self.output.parent, self.bytes_needed, str(self.output),
                                KEPT.format(partial=self.partial)) from error

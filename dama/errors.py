"""The project's own error class: what `dama <command>` reports as one line instead of a traceback.

`DamaError` is raised by the project's checks of what a user gives it: options and configs, input files and folders,
dataset rows, output paths and run folders. Each message says what is wrong and what to do. It subclasses ValueError,
so callers that catch ValueError keep working.

Anything else is a bug, or a failure of the machine, and keeps its traceback through the CLI: a ValueError that torch,
transformers, pyarrow or json raise inside a forward or a write, an OSError such as a full disk, and the shape checks
of the tensor-level functions (the kernels, packed attention, the loss), whose callers are the project's own code.
"""

from __future__ import annotations


class DamaError(ValueError):
    """Bad input found by the project's own checks; the message says what to do about it."""

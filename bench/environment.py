"""The commit a benchmark ran at, stored in every record."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def git_state() -> dict:
    """{"git_commit": short hash or None, "git_dirty": bool or None}."""
    commit = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit.strip() if commit else None,
        # Uncommitted changes to tracked files mean the commit alone does not name the code that ran.
        "git_dirty": bool(status.strip()) if status is not None else None,
    }

"""Where a result came from: the git commit of the checkout it was produced in (stdlib only)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str:
    """HEAD of the checkout in use (the working folder, else the package's), "-dirty" if modified, or "unknown"."""
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=where)
            if head.returncode != 0:
                continue
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=5, cwd=where).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown"

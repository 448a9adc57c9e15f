"""The machine a benchmark ran on: CPU, cores, memory, GPUs, versions, and the process's memory use.

Nothing here loads a CUDA library: GPUs are listed by ``nvidia-smi``, versions read from package metadata.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _gpus() -> list[dict]:
    """GPUs as nvidia-smi lists them; empty without one."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if parts and parts[0]:
            gpus.append({"name": parts[0], "memory": parts[1] if len(parts) > 1 else "",
                         "driver": parts[2] if len(parts) > 2 else ""})
    return gpus


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict:
    """The machine: CPU model, cores (all and usable by this process), memory, GPUs, OS."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "memory_gib": _memory_gib(),
            "gpus": _gpus(), "platform": platform.platform()}


def slug(text: str) -> str:
    """``text`` as a file-name tag: lower case, runs of other characters as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(info: dict) -> str:
    """A short file-name tag for the machine: the GPU's name, else the CPU model and its cores."""
    if info["gpus"]:
        return slug(info["gpus"][0]["name"])
    return f"{slug(info['cpu'])}-{info['cores']}c"


def machine_line(info: dict) -> str:
    """``CPU, N cores, GPU`` (or ``(no GPU)``) for plot titles and summaries."""
    gpu = f", {info['gpus'][0]['name']}" if info["gpus"] else " (no GPU)"
    return f"{info['cpu']}, {info['cores']} cores{gpu}"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Versions of what the numbers depend on (read from package metadata: nothing optional is imported)."""
    import onnxruntime

    v = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
         "onnxruntime_providers": onnxruntime.get_available_providers()}
    for dist in ("certinfer", "onnxruntime-gpu", "torch", "tensorrt"):
        if (found := _version(dist)) is not None:
            v[dist] = found
    return v


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (a high-water mark: it never goes down), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def rss_mib() -> float:
    """Resident set size now (Linux /proc), else the peak so far, in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()

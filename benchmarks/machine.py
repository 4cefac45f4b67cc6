"""The machine a benchmark ran on, recorded in every result JSON (CPU model, cores, memory, GPU, versions)."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else :func:`platform.processor`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def memory_gib() -> float | None:
    """Total memory in GiB (``MemTotal`` of ``/proc/meminfo``), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers of a benchmark depend on: CPU model, the cores this process may use, memory,
    torch threads and version, the GPU's name when ``device`` is CUDA, the command line and the time."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_cores": usable,
        "cpu_cores_total": os.cpu_count(),
        "memory_gib": memory_gib(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    load = load_average()
    if load is not None:
        info["load_average_start"] = load
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work on the machine slows a benchmark), None where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None

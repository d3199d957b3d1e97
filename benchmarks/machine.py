"""The processor a benchmark ran on, for the figures it records (imported by the scripts here)."""

from __future__ import annotations

import platform
from pathlib import Path


def processor() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"

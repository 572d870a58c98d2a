"""What a measurement ran on: library versions and the machine header of every benchmark.

    versions(("compressor", "torch"))  # {"python": "3.11.7", "compressor": "0.1.0", "torch": "2.13.0"}
    machine_info(threads=2)            # cpu, L3, cores, threads, torch and its CPU capability,
                                       # compressor's kernel backend, versions, date

`release_memory()` hands the heap pages freed by a finished phase (a pass, the teacher) back to
the OS, so they do not stay in the resident set under the next phase's allocations.

One collector serves `compress-bench`, the developer benchmarks in ``benchmarks/`` and the
``versions`` of ``compression.json``, so a table and a checkpoint describe a machine the same way.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import importlib.metadata as md
import platform
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["versions", "machine_info", "cpu_model", "l3_cache", "release_memory"]

DEFAULT_PACKAGES = ("compressor", "torch", "transformers")


def versions(packages: Sequence[str] = DEFAULT_PACKAGES) -> dict[str, str]:
    """``{"python": ..., package: version, ...}`` for the installed distributions; missing ones are skipped."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    """The first "model name" of /proc/cpuinfo (Linux), else `platform.processor()`, else "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def l3_cache() -> str:
    """CPU 0's level-3 cache size as sysfs writes it ("36608K"), or "unknown"."""
    # The index of a cache level differs between CPUs, so read each index's level.
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                return (index / "size").read_text().strip()
        except OSError:
            continue
    return "unknown"


def machine_info(threads: int | None = None, packages: Sequence[str] = DEFAULT_PACKAGES) -> dict:
    """The header of a benchmark. `threads`: the torch threads it ran with (default: this process's)."""
    import psutil
    import torch

    from compressor import kernels
    return {
        "cpu": cpu_model(),
        "l3": l3_cache(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernels": kernels.backend(),
        "versions": versions(packages),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim)."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; nothing elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):         # not glibc (musl): nothing to trim
            pass

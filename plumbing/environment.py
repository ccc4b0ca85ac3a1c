"""What a run ran on: the hardware and the library versions, recorded in results.json. Greedy
decoding is exact only per machine: slightly different floating-point results (another CPU,
another BLAS, another torch) can flip a few answers, so two machines may give different HS for
the same command; this record says which machine a number comes from."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

PACKAGES = ("torch", "transformers", "peft", "lightning", "tokenizers", "gguf", "numpy")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def describe(device: torch.device) -> dict[str, str | int | None]:
    """Machine, CPU, threads, the GPU when `device` is one, Python and the key packages."""
    info: dict[str, str | int | None] = {
        "machine": platform.machine(),
        "system": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
    }
    info.update({package: _version(package) for package in PACKAGES})
    return info


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a SLURM or container limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parallel_jobs(n_jobs: int | None, cores: int) -> int:
    """How many points joblib runs at once for its `n_jobs` (joblib's rule: None is 1, -1 all
    cores, -2 all but one, ...)."""
    if n_jobs is None or n_jobs == 0:
        return 1
    return max(1, n_jobs if n_jobs > 0 else cores + 1 + n_jobs)


def share_cores(n_jobs: int | None) -> tuple[int, int]:
    """Give this grid point its share of the cores when `k` points run side by side (torch would
    otherwise start one thread per core in every point, k times too many): cores // k threads,
    at least 1. Returns (threads, cores)."""
    cores = usable_cores()
    threads = max(1, cores // parallel_jobs(n_jobs, cores))
    torch.set_num_threads(threads)
    return threads, cores

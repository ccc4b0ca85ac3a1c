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

"""What this machine is: versions, CPU instruction sets, GPUs and the backends a run's process group will use."""
from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from bigexp.run.distributed import process_group_backend


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest x86 vector extension the kernel reports, and the ATen kernels torch dispatches to."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    widest = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), "unknown")
    aten = torch.backends.cpu.get_cpu_capability()
    forced = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if os.environ.get(k)]
    return f"{widest} (ATen kernels: {aten}{'; ' + ', '.join(forced) if forced else ''})"


def gpus() -> str:
    if not torch.cuda.is_available():
        return "none visible"
    names = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
             for i in range(torch.cuda.device_count())]
    return f"{len(names)}: " + ", ".join(names)


def nccl() -> str:
    if not torch.cuda.is_available():
        return "n/a (no GPU)"
    try:
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as e:  # a CPU-only build
        return f"unavailable ({type(e).__name__})"


def environment_rows(device: str = "auto") -> list[tuple[str, str]]:
    """(name, value) rows, cheap: no process group, no kernel runs."""
    cuda_build = torch.version.cuda or "none (CPU build)"
    dev = "cuda" if (device == "cuda" or (device == "auto" and torch.cuda.is_available())) else "cpu"
    return [
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA build {cuda_build}, oneDNN "
                  f"{'on' if torch.backends.mkldnn.is_available() else 'off'})"),
        ("torchvision", _version("torchvision")),
        ("deepspeed", _version("deepspeed")),
        ("ffcv", _version("ffcv")),
        ("numba", _version("numba")),
        ("numpy", _version("numpy")),
        ("CUDA runtime", torch.version.cuda or "n/a"),
        ("NCCL", nccl()),
        ("CPU", f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"),
        ("CPU ISA", cpu_isa()),
        ("GPUs", gpus()),
        ("run device", dev),
        ("process group", process_group_backend(dev)),
    ]

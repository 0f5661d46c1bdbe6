"""What this host offers: CPU, RAM (psutil), NVIDIA GPUs (NVML), hence which backends can run."""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import asdict, dataclass

import psutil

from rbees_pool.errors import BackendUnavailable, InvalidArgument

BACKENDS = ("cpu", "cuda")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    vram_total_bytes: int
    vram_free_bytes: int


def gpus() -> list[Gpu]:
    """GPUs seen by NVML; none when the library or the driver is missing (nvmlInit fails)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = name.decode() if isinstance(name, bytes) else name
            found.append(Gpu(index, name, memory.total, memory.free))
        return found
    finally:
        pynvml.nvmlShutdown()


def host_info() -> dict[str, object]:
    """Host, CPU and RAM facts for `status`."""
    memory = psutil.virtual_memory()
    return {
        "hostname": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": {
            "model": _cpu_model(),
            "cores_logical": os.cpu_count(),
            "cores_physical": psutil.cpu_count(logical=False),
        },
        "ram": {"total_bytes": memory.total, "available_bytes": memory.available},
        "gpus": [asdict(gpu) for gpu in gpus()],
    }


def backends(found: list[Gpu]) -> list[dict[str, object]]:
    """Each backend, whether this host can run it and on which devices."""
    return [
        {"name": "cpu", "available": True, "devices": ["cpu"]},
        {"name": "cuda", "available": bool(found), "devices": [f"cuda:{g.index} {g.name}" for g in found]},
    ]


def require_backend(backend: str, gpu: int | None) -> None:
    """Refuse, before spawning, a backend or GPU index this host lacks."""
    if backend not in BACKENDS:
        raise InvalidArgument(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "cpu":
        if gpu is not None:
            raise InvalidArgument("--gpu applies to the cuda backend only")
        return
    found = gpus()
    if not found:
        raise BackendUnavailable("backend cuda needs an NVIDIA GPU, and NVML finds none on this host")
    if gpu is not None and not 0 <= gpu < len(found):
        raise BackendUnavailable(f"no GPU {gpu}: this host has {len(found)} (0..{len(found) - 1})")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

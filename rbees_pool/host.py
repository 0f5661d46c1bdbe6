"""What this host offers: CPU, RAM (psutil), NVIDIA GPUs (NVML), hence which backends can run."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
from dataclasses import asdict, dataclass
from types import ModuleType

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
    """GPUs seen by NVML; none when the library or the driver is missing (nvmlInit fails) or NVML cannot count
    them. A device NVML fails to describe (e.g. NVML_ERROR_GPU_IS_LOST) is left out; the others keep their index.
    """
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError:
            return []
        return [gpu for index in range(count) if (gpu := _describe(pynvml, index)) is not None]
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _describe(pynvml: ModuleType, index: int) -> Gpu | None:
    """One device's name and memory, or None when NVML fails on it."""
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    except pynvml.NVMLError:
        return None
    name = name.decode() if isinstance(name, bytes) else name
    return Gpu(index, name, memory.total, memory.free)


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
    """Each backend, whether this host can run it and on which devices. cuda needs more than NVML's GPUs:
    the worker's own test (numba-cuda imports and a device answers); its `reason` says why it is unavailable."""
    from rbees_workerd.kernels.cuda.probe import cuda_unavailable_reason

    reason = cuda_unavailable_reason() if found else "NVML finds no NVIDIA GPU on this host"
    devices = [f"cuda:{g.index} {g.name}" for g in found]
    return [
        {"name": "cpu", "available": True, "devices": ["cpu"]},
        {"name": "cuda", "available": reason is None, "devices": devices, "reason": reason},
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
    cuda = {b["name"]: b for b in backends(found)}["cuda"]
    if not cuda["available"]:
        raise BackendUnavailable(f"backend cuda is unavailable on this host: {cuda['reason']}")
    if gpu is not None and gpu not in (indices := [g.index for g in found]):
        raise BackendUnavailable(f"no usable GPU {gpu} (GPUs NVML sees here: {', '.join(map(str, indices))})")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

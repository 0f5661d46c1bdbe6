"""rbees_pool.host against NVML faults that no host here can produce on demand: pynvml calls are patched to
raise pynvml.NVMLError (the real exception class), everything else is the real code path."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from rbees_pool import host
from rbees_pool.errors import BackendUnavailable
from rbees_pool.host import Gpu
from rbees_workerd.kernels.cuda import probe


def _nvml_error() -> pynvml.NVMLError:
    return pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """NVML that initialises and reports two devices; device 1 has fallen off the bus."""
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: index)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda handle: b"Test GPU")

    def memory(handle: int) -> SimpleNamespace:
        if handle == 1:
            raise _nvml_error()
        return SimpleNamespace(total=80 << 30, free=70 << 30)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", memory)
    return monkeypatch


def test_a_device_nvml_cannot_describe_is_left_out(nvml: pytest.MonkeyPatch) -> None:
    nvml.setattr(probe, "cuda_unavailable_reason", lambda: None)  # numba-cuda answers too (no GPU here)
    assert host.gpus() == [Gpu(0, "Test GPU", 80 << 30, 70 << 30)]
    assert host.host_info()["gpus"] == [{"index": 0, "name": "Test GPU", "vram_total_bytes": 80 << 30,
                                         "vram_free_bytes": 70 << 30}]  # fmt: skip
    host.require_backend("cuda", 0)
    with pytest.raises(BackendUnavailable, match="no usable GPU 1"):
        host.require_backend("cuda", 1)


@pytest.mark.parametrize("call", ["nvmlDeviceGetCount", "nvmlDeviceGetName", "nvmlDeviceGetHandleByIndex"])
def test_nvml_failures_never_raise(nvml: pytest.MonkeyPatch, call: str) -> None:
    def fail(*_args: object) -> None:
        raise _nvml_error()

    nvml.setattr(pynvml, call, fail)
    assert host.gpus() == []
    assert host.host_info()["gpus"] == []
    with pytest.raises(BackendUnavailable, match="NVIDIA GPU"):
        host.require_backend("cuda", None)


def test_a_failing_shutdown_is_ignored(nvml: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise _nvml_error()

    nvml.setattr(pynvml, "nvmlShutdown", fail)
    assert [gpu.index for gpu in host.gpus()] == [0]

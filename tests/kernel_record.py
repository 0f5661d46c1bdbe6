"""A pytest plugin for the simulator's run of the CUDA kernel tests (sim_run.py): which kernels ran, and on what.

The simulator runs a kernel's Python as Python: it never types it as Numba's CUDA target does, so a kernel that
passes every simulated test may still fail to compile on a GPU. This plugin notes each launch's kernel (the module
and the factory with its arguments, or the module's kernel) and its arguments' Numba types, and writes them to
`$RBEES_KERNEL_RECORD/<pid>.pkl` at the end; kernel_ptx.py compiles each for a GPU without one.
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
from collections.abc import Callable
from typing import Any

import numba
import pytest

MODULES = ("dense", "gemm", "gemv", "hmma", "mma", "ops", "repack", "rows", "sample")
Spec = tuple[str, str, tuple[Any, ...] | None, tuple[tuple[str, Any], ...]]  # module, name, factory args, kwargs

_specs: dict[int, Spec] = {}  # id(kernel) -> where it came from
_launched: dict[tuple[Spec, tuple[Any, ...]], None] = {}  # (spec, argument types), in launch order


def _factory(module: str, name: str, make: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(make)
    def noted(*args: Any, **kwargs: Any) -> Any:
        kernel = make(*args, **kwargs)
        _specs[id(kernel)] = (module, name, args, tuple(sorted(kwargs.items())))
        return kernel

    return noted


def _host(arg: Any) -> Any:
    """The argument as Numba types it on a GPU: a simulated device array as the NumPy array it holds."""
    ary = getattr(arg, "_ary", None)
    if ary is not None:
        return ary
    return tuple(_host(a) for a in arg) if isinstance(arg, tuple) else arg


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("RBEES_KERNEL_RECORD"):
        return
    from numba.cuda.simulator import kernel as sim

    for m in MODULES:
        module = importlib.import_module(f"rbees_workerd.kernels.cuda.{m}")
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(obj, "cache_info"):  # a functools.cache'd factory
                setattr(module, name, _factory(module.__name__, name, obj))
            elif isinstance(obj, sim.FakeCUDAKernel) and not obj._device:
                _specs[id(obj)] = (module.__name__, name, None, ())
    run = sim.FakeCUDAKernel.__call__

    def launch(self: Any, *args: Any) -> Any:
        spec = None if self._device or sim._kernel_context else _specs.get(id(self))
        if spec is not None:
            _launched.setdefault((spec, tuple(numba.typeof(_host(a)) for a in args)), None)
        return run(self, *args)

    sim.FakeCUDAKernel.__call__ = launch


def pytest_unconfigure(config: pytest.Config) -> None:
    where = os.environ.get("RBEES_KERNEL_RECORD")
    if where and _launched:
        with open(os.path.join(where, f"{os.getpid()}.pkl"), "wb") as f:
            pickle.dump(list(_launched), f)

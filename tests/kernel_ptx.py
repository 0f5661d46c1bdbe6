"""Compile every kernel the simulator ran (kernel_record.py's notes) to PTX for sm_90, as numba-cuda compiles it
for an H100, on a machine without a GPU:

    python tests/kernel_ptx.py RECORD_DIR

Prints how many it compiled; exits 1 naming each kernel that failed and why. numba-cuda asks the current device
for its compute capability when it compiles the device functions a kernel calls: without a GPU that question is
answered with sm_90's. Needs libNVVM (the nvidia-cuda-nvcc wheel of the dev extras, or a CUDA toolkit).
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

CC = (9, 0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's kernels, as the simulator ran them


def _as_sm90() -> None:
    import numba.cuda.dispatcher

    numba.cuda.dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=CC)


def _compile(item: tuple[tuple[str, str, Any, Any], tuple[Any, ...]]) -> str | None:
    (module, name, args, kwargs), sig = item
    from numba import cuda

    try:
        kernel = getattr(importlib.import_module(module), name)
        if args is not None:
            kernel = kernel(*args, **dict(kwargs))
        cuda.compile_ptx(kernel.py_func, sig, cc=CC, fastmath=kernel.targetoptions.get("fastmath", False))
    except Exception as e:  # noqa: BLE001 - every failure is reported, with its kernel
        return f"{module}.{name}{'' if args is None else args} {sig}:\n  {type(e).__name__}: {str(e)[:3000]}"
    return None


def main() -> None:
    items: dict[Any, None] = {}
    for path in sorted(Path(sys.argv[1]).glob("*.pkl")):
        with open(path, "rb") as f:
            items.update(dict.fromkeys(pickle.load(f)))
    if not items:
        raise SystemExit(f"no kernel launches were recorded in {sys.argv[1]}")
    with ProcessPoolExecutor(os.cpu_count(), initializer=_as_sm90) as pool:
        failed = [f for f in pool.map(_compile, items, chunksize=4) if f is not None]
    for f in failed:
        print(f"FAILED {f}")
    kernels = len({spec for spec, _ in items})
    print(f"{len(items) - len(failed)} of {len(items)} kernel specializations ({kernels} kernels) compiled for sm_90")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""The CUDA kernel tests pass under Numba's CUDA simulator (see sim_run.py: conftest starts that run early), and
every kernel they ran compiles for a GPU."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from sim_run import ROOT, SIM_RUN, SimulatorRun

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed"),
]


def _run(request: pytest.FixtureRequest) -> SimulatorRun:
    """The run conftest started when it collected these tests (or one started here, for both of them)."""
    run = request.config.stash.get(SIM_RUN, None)
    if run is None:
        run = request.config.stash[SIM_RUN] = SimulatorRun()
    return run


def test_cuda_kernels_pass_under_the_simulator(request: pytest.FixtureRequest) -> None:
    code, output = _run(request).result(timeout=1800)
    tail = output[-5000:]
    assert code == 0, tail
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 30, tail  # the kernel tests ran; only GPU-sized cases skip there


def test_every_kernel_the_simulator_ran_compiles_for_sm_90(request: pytest.FixtureRequest) -> None:
    """The simulator runs a kernel's Python as Python and never types it as Numba's CUDA target does, so a kernel
    that passes there may not compile on a GPU. Each kernel and argument types the run launched (kernel_record.py)
    is compiled to PTX for an H100's sm_90 (kernel_ptx.py), so such a kernel fails here rather than in a device call."""
    run = _run(request)
    run.result(timeout=1800)
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "kernel_ptx.py"), run.records], capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
    compiled = re.search(r"(\d+) of (\d+) kernel specializations \((\d+) kernels\) compiled", done.stdout)
    assert compiled and compiled.group(1) == compiled.group(2) and int(compiled.group(3)) >= 20, done.stdout[-2000:]

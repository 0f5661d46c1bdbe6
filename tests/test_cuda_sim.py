"""The CUDA kernel tests pass under Numba's CUDA simulator (see sim_run.py: conftest starts that run early)."""

from __future__ import annotations

import importlib.util
import re

import pytest
from sim_run import SIM_RUN, SimulatorRun

pytestmark = pytest.mark.cuda


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed")
def test_cuda_kernels_pass_under_the_simulator(request: pytest.FixtureRequest) -> None:
    run = request.config.stash.get(SIM_RUN, None) or SimulatorRun()  # started by conftest when collected
    code, output = run.result(timeout=1800)
    tail = output[-5000:]
    assert code == 0, tail
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 30, tail  # the kernel tests ran; only GPU-sized cases skip there


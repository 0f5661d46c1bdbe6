"""The CUDA kernel tests under Numba's CUDA simulator, in a process of their own, started early.

The simulator must be switched on before numba.cuda is first imported and would then replace it for the whole
process, so it runs in a subprocess. It keeps one core busy for many minutes, so conftest starts it as soon as
the suite is collected, beside the rest of the suite, and test_cuda_sim.py collects its result last.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the tests that read this run's result (test_cuda_sim.py), put last
TEST_NAMES = ("test_cuda_kernels_pass_under_the_simulator", "test_every_kernel_the_simulator_ran_compiles_for_sm_90")


class SimulatorRun:
    """`pytest tests/test_cuda_kernels.py` with NUMBA_ENABLE_CUDASIM=1, its output in a file (never a pipe
    that nobody reads while it runs), each kernel it launched noted in `records` (kernel_record.py)."""

    def __init__(self) -> None:
        self._records = tempfile.TemporaryDirectory()
        self.records = self._records.name
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
                   RBEES_KERNEL_RECORD=self.records)  # fmt: skip
        env.pop("REQUIRE_REAL_GPU", None)
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 (read and closed by result)
        self._result: tuple[int, str] | None = None
        # in two processes (pytest-xdist): the simulator runs each GPU thread in Python, a core each
        tests = ["-n", "2", str(ROOT / "tests" / "test_cuda_kernels.py")]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "kernel_record", *tests]
        self._proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._output, stderr=subprocess.STDOUT)

    def result(self, timeout: float) -> tuple[int, str]:
        """Its exit status and output, once it has ended (killed after `timeout` seconds more)."""
        if self._result is not None:
            return self._result
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        with self._output:
            self._output.seek(0)
            self._result = code, self._output.read().decode(errors="replace")
        return self._result

    def stop(self) -> None:
        """Kill it if it still runs (a session that ended before its tests), and remove its records."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._records.cleanup()


SIM_RUN = pytest.StashKey[SimulatorRun]()

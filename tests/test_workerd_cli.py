"""A new user's first commands: help, versions, mistakes and a missing GPU, each answered in one line.

Every CLI is run as the user runs it, its console script in a subprocess.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest
from worker_harness import MODEL, daemon_env, free_port

from rbees_pool import host
from rbees_pool.errors import BackendUnavailable
from rbees_workerd.kernels.cuda.probe import cuda_unavailable_reason

BIN = Path(sys.executable).parent
CLIS = ("rbees-workerd", "rbees-orcd", "rbees-pool", "rbees")
BACKEND_UNAVAILABLE_EXIT = 9  # rbees-pool's table, shared by the worker
NO_CUDA = cuda_unavailable_reason()


def _run(cli: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / cli), *args], capture_output=True, text=True, env=daemon_env(), timeout=120)


def _one_error_line(done: subprocess.CompletedProcess[str], code: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {code}: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    return lines[0]


@pytest.mark.parametrize("cli", CLIS)
def test_every_cli_has_short_help_and_a_version(cli: str) -> None:
    helped = _run(cli, "-h")
    assert helped.returncode == 0 and "Usage:" in helped.stdout, helped.stderr
    assert _run(cli, "--help").stdout == helped.stdout
    shown = _run(cli, "--version")
    assert (shown.returncode, shown.stdout) == (0, f"{cli} {version('rbees')}\n"), shown.stderr


@pytest.mark.parametrize("command", ["serve", "generate", "bench"])
def test_each_worker_command_has_short_help(command: str) -> None:
    done = _run("rbees-workerd", command, "-h")
    assert done.returncode == 0 and f"rbees-workerd {command}" in done.stdout and "--threads" in done.stdout


def test_serve_help_names_the_environment_variables() -> None:
    text = " ".join(_run("rbees-workerd", "serve", "-h").stdout.split())
    for name in ("WORKER_API_TOKEN_FILE", "WORKER_BIND_ADDR", "WORKER_GPU_DEVICE", "WORKER_LOG_LEVEL"):
        assert name in text


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["generate", "--model", str(MODEL), "--prompt", "hi", "--temperature", "5"], "'--temperature'"),
        (["generate", "--model", str(MODEL)], "'--prompt'"),
        (["--bogus"], "--bogus"),
        (["bench", "--model", str(MODEL), "--batch", "zero"], "'--batch'"),
        (["serve"], "--worker-id is required"),
        (["frobnicate"], "frobnicate"),
    ],
    ids=["out of range", "missing option", "unknown option", "not a number", "serve without id", "unknown command"],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], named: str) -> None:
    done = _run("rbees-workerd", *args)
    assert done.returncode == 2
    assert named in _one_error_line(done, "INVALID_ARGUMENT")


def test_no_arguments_shows_the_help_and_exits_2() -> None:
    done = _run("rbees-workerd")
    assert done.returncode == 2 and "serve" in done.stdout and "generate" in done.stdout and not done.stderr


@pytest.mark.parametrize(
    ("cli", "args", "named"),
    [
        ("rbees-orcd", ["--bogus"], "--bogus"),
        ("rbees-pool", ["--bogus"], "--bogus"),
        ("rbees-pool", ["models", "download"], "model_id"),
        ("rbees-pool", ["worker", "spawn", "cpu", "--model", "m", "--slots", "x"], "'--slots'"),
        ("rbees", ["infer", "--worker", "http://127.0.0.1:1", "--max-tokens", "-3", "hi"], "'--max-tokens'"),
        ("rbees", ["hosts", "list", "--bogus"], "--bogus"),
    ],
    ids=["orcd unknown option", "pool unknown option", "pool missing argument", "pool not a number",
         "rbees out of range", "rbees unknown option"],
)  # fmt: skip
def test_the_other_clis_usage_errors_are_one_line_and_exit_2(cli: str, args: list[str], named: str) -> None:
    done = _run(cli, *args)
    assert done.returncode == 2 and named in _one_error_line(done, "INVALID_ARGUMENT")


@pytest.mark.parametrize("args", [["rbees-pool"], ["rbees-pool", "models"], ["rbees"], ["rbees", "hosts"]])
def test_a_group_without_its_command_shows_its_help_and_exits_2(args: list[str]) -> None:
    done = _run(*args)
    assert done.returncode == 2 and "Usage:" in done.stdout and "Commands" in done.stdout and not done.stderr


# ---- the cuda backend on a host that cannot run it ---------------------------------------------------
needs_no_cuda = pytest.mark.skipif(NO_CUDA is None, reason="this host can run the cuda backend")


@needs_no_cuda
@pytest.mark.parametrize("command", ["serve", "generate", "bench"])
def test_cuda_without_a_device_fails_at_once(command: str) -> None:
    args = {
        "serve": ["serve", "--worker-id", "w1", "--port", str(free_port())],
        "generate": ["generate", "--prompt", "hi"],
        "bench": ["bench"],
    }[command]
    done = _run("rbees-workerd", *args, "--model", str(MODEL), "--backend", "cuda")
    assert done.returncode == BACKEND_UNAVAILABLE_EXIT
    assert "backend cuda is unavailable" in _one_error_line(done, "BACKEND_UNAVAILABLE")


@needs_no_cuda
def test_cuda_without_numba_cuda_is_backend_unavailable_not_an_import_error() -> None:
    """The CPU-only install: numba-cuda cannot be imported (a None entry in sys.modules makes it so)."""
    code = (
        "import sys; sys.modules['numba.cuda'] = None; sys.modules['cuda'] = None\n"
        "from rbees_workerd.cli import main\n"
        f"main(['generate', '--model', {str(MODEL)!r}, '--prompt', 'hi', '--backend', 'cuda'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=daemon_env(), timeout=120)
    assert done.returncode == BACKEND_UNAVAILABLE_EXIT
    assert "numba-cuda is not installed" in _one_error_line(done, "BACKEND_UNAVAILABLE")


@needs_no_cuda
def test_pool_backends_need_a_device_numba_cuda_answers_not_just_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML reports a GPU (patched: no such host here), numba-cuda (real) finds none: cuda is unavailable."""
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: index)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda handle: b"Test GPU")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda handle: SimpleNamespace(total=8 << 30, free=8 << 30))
    cuda = {b["name"]: b for b in host.backends(host.gpus())}["cuda"]
    assert cuda == {"name": "cuda", "available": False, "devices": ["cuda:0 Test GPU"], "reason": NO_CUDA}
    with pytest.raises(BackendUnavailable, match=f"backend cuda is unavailable on this host: {re.escape(NO_CUDA)}"):
        host.require_backend("cuda", None)  # spawn refuses it before starting a worker, by the same test


def test_numba_caches_in_the_users_cache_folder_by_default(tmp_path: Path) -> None:
    """Outside `make` (no NUMBA_CACHE_DIR), compiled kernels go to the user's cache folder, not into the
    installed package; a NUMBA_CACHE_DIR that is set wins."""
    code = "import rbees_workerd.kernels.cpu.backend; from numba.core import config; print(config.CACHE_DIR)"
    env = {k: v for k, v in daemon_env().items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert shown.stdout.strip() == str(tmp_path / "cache" / "rbees" / "numba"), shown.stderr
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert shown.stdout.strip() == str(tmp_path / "mine"), shown.stderr

"""`rbees pool setup` and `rbees pool git pull|status|build` through a real sshd, on real git repositories,
with a real venv and pip. The project installed is a tiny one whose PEP 517/660 backend sits in its tree:
installing rbees itself would download its dependencies, and these tests must not need the network."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd_harness import Client, Sshd, make_client, run_sshd

from rbees.exitcodes import ExitCode

BACKEND = '''"""A PEP 517/660 build backend small enough to need nothing but the standard library."""
import os
import zipfile

NAME, VERSION = "tinypkg", "0.1.0"


def _wheel(directory, files):
    info = f"{NAME}-{VERSION}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\\nName: {NAME}\\nVersion: {VERSION}\\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\\nGenerator: tiny\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\\n" for name in files) + f"{info}/RECORD,,\\n"
    name = f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(directory, name), "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open("tinypkg/__init__.py") as source:
        return _wheel(wheel_directory, {"tinypkg/__init__.py": source.read()})


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory, {"tinypkg.pth": os.path.abspath(".") + "\\n"})
'''
PYPROJECT = '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare repository holding the tiny project on `main`."""
    work = tmp_path_factory.mktemp("git") / "work"
    work.mkdir()
    _git(work, "init", "-q", "-b", "main")
    _git(work, "config", "user.email", "t@example.invalid")
    _git(work, "config", "user.name", "rbees tests")
    (work / "tinypkg").mkdir()
    (work / "tinypkg" / "__init__.py").write_text('GREETING = "first"\n')
    (work / "backend.py").write_text(BACKEND)
    (work / "pyproject.toml").write_text(PYPROJECT)
    _git(work, "add", ".")
    _git(work, "commit", "-q", "-m", "first")
    bare = work.parent / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True, timeout=60)
    _git(work, "remote", "add", "origin", str(bare))
    return bare


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, origin: Path) -> Iterator[Client]:
    with run_sshd(tmp_path_factory.mktemp("sshd")) as sshd:
        yield _client(sshd, tmp_path_factory.mktemp("operator"))


def _client(sshd: Sshd, home: Path) -> Client:
    hosts = f'[hosts.src]\nssh = "a"\nrepo = "{home / "checkout"}"\n\n[hosts.norepo]\nssh = "a"\n'
    return make_client(home, sshd, hosts)


def test_setup_clones_makes_a_venv_and_installs(client: Client, origin: Path) -> None:
    checkout = client.home / "checkout"
    missing = client.run("pool", "setup", "--host", "src", "--python", sys.executable)
    assert missing.returncode == 1 and "is not a directory" in missing.stderr and "--clone" in missing.stderr
    unset = client.run("pool", "setup", "--host", "norepo")
    assert unset.returncode == ExitCode.USAGE and "set `repo`" in unset.stderr
    no_venv = client.run("pool", "git", "build", "--host", "src")
    assert no_venv.returncode == 1, no_venv.stderr

    done = client.run("pool", "setup", "--host", "src", "--python", sys.executable, "--clone", str(origin))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Successfully installed tinypkg-0.1.0" in done.stdout
    greeting = [str(checkout / ".venv" / "bin" / "python"), "-c", "import tinypkg; print(tinypkg.GREETING)"]
    assert subprocess.run(greeting, capture_output=True, text=True, check=True).stdout == "first\n"
    listed = {h["name"]: h for h in client.run_json("hosts", "list")["hosts"]}
    assert listed["src"]["rbees_pool"] == f"{checkout}/.venv/bin/rbees-pool"  # the checkout's venv by default

    status = client.run("pool", "git", "status", "--host", "src")
    assert status.returncode == 0 and "## main...origin/main" in status.stdout and "first" in status.stdout

    work = origin.parent / "work"
    (work / "tinypkg" / "__init__.py").write_text('GREETING = "second"\n')
    _git(work, "commit", "-q", "-am", "second")
    _git(work, "push", "-q", "origin", "main")
    pulled = client.run("pool", "git", "pull", "--host", "src")
    assert pulled.returncode == 0, pulled.stderr
    assert subprocess.run(greeting, capture_output=True, text=True, check=True).stdout == "second\n"  # editable
    rebuilt = client.run("pool", "git", "build", "--host", "src")
    assert rebuilt.returncode == 0 and "Successfully installed tinypkg-0.1.0" in rebuilt.stdout, rebuilt.stderr

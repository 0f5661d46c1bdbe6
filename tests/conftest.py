"""Shared fixtures: the real SmolLM2 test model (fetched by `make model`), and llama.cpp's requantizations of it."""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sim_run import SIM_RUN, TEST_NAMES, SimulatorRun

if TYPE_CHECKING:
    from rbees_workerd.engine.tokenizer import Tokenizer


ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba-cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The simulator run of the CUDA kernel tests keeps a core busy for many minutes: when a test of it is
    selected, start it now, beside the rest of the suite, and put its tests last, where they collect the result.
    Not in pytest-xdist's workers: each collects every test, and only the one that is given them would use the
    run (their first starts one then)."""
    sim = [item for item in items if item.name in TEST_NAMES]
    if sim and importlib.util.find_spec("numba_cuda") is not None and not hasattr(config, "workerinput"):
        items[:] = [item for item in items if item.name not in TEST_NAMES] + sim
        config.stash[SIM_RUN] = SimulatorRun()


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(SIM_RUN, None)
    if run is not None:
        run.stop()


def _model_path() -> Path:
    return Path(os.environ.get("RBEES_TEST_MODEL", ROOT / "models-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = _model_path()
    if not path.is_file():
        pytest.fail(f"test model missing at {path}: run `make model`")
    return path


@pytest.fixture(scope="session")
def requantized(model_path, tmp_path_factory) -> Callable[[str], Path]:
    """The real model requantized by llama.cpp into a mix ("q4_k_m", "q5_k_m", "q6_k", "q8_0"), once a session."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the dev-only reference (make dev)")
    out = tmp_path_factory.mktemp("requantized")
    files: dict[str, Path] = {}

    def get(mix: str) -> Path:
        if mix not in files:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix.upper()}")
            params.allow_requantize = True
            path = out / f"{model_path.stem}.{mix}.gguf"
            if llama_cpp.llama_model_quantize(str(model_path).encode(), str(path).encode(), ctypes.byref(params)):
                pytest.fail(f"llama.cpp could not requantize {model_path.name} to {mix}")
            files[mix] = path
        return files[mix]

    return get


@pytest.fixture(scope="session")
def tokenizer(model_path: Path) -> Tokenizer:
    """The real model's tokenizer."""
    from rbees_workerd.engine.tokenizer import Tokenizer  # (after NUMBA_CACHE_DIR above: the package reads it)

    return Tokenizer.from_file(model_path)

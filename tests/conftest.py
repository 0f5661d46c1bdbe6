"""Shared fixtures: the real SmolLM2 test model (fetched by `make model`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba-cache"))


def _model_path() -> Path:
    return Path(os.environ.get("RBEES_TEST_MODEL", ROOT / "models-cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = _model_path()
    if not path.is_file():
        pytest.fail(f"test model missing at {path}: run `make model`")
    return path

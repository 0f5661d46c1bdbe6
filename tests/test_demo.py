"""`make demo`'s script, run as a user runs it: the whole flow on this host, and nothing left running after."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from test_pool_support import assert_nothing_left_running

ROOT = Path(__file__).resolve().parent.parent


def test_demo_streams_an_answer_through_the_orchestrator_and_stops_everything(model_path: Path,
                                                                               tmp_path: Path) -> None:  # fmt: skip
    env = dict(os.environ, VENV_BIN=str(Path(sys.executable).parent), MODEL_FILE=str(model_path), TMPDIR=str(tmp_path))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    answer = done.stdout.split('--model smollm2-local "The capital of France is"\n', 1)[1]
    assert answer.strip(), done.stdout  # some text streamed through the orchestrator
    assert re.search(r"^32 tokens, [\d.]+ tokens/s, [\d.]+ s \(MAX_TOKENS\)$", done.stderr, re.M), done.stderr
    assert list(tmp_path.iterdir()) == []  # its temporary root is gone
    assert_nothing_left_running(str(tmp_path))  # orchestrator and worker were stopped, not left behind

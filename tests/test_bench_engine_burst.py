"""bench/engine_burst.py: bursts through the worker's Scheduler and Engine alone, on the real model (CPU), counted
as bench/worker_http.py counts them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_stream_of_each_level_is_counted(model_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "engine_burst.py"), str(model_path), "--levels", "1,3", "--slots", "3",
           "--max-tokens", "5", "--rounds", "2", "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["backend"] == "cpu" and report["rounds"] == 2 and report["step_tokens"] == 256
    assert report["prompt_tokens"] == 21  # worker_http's prompt in SmolLM2's vocabulary
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["tokens"] == 5 * level["concurrency"]
        assert level["aggregate_tokens_per_sec"] > 0 and level["decode_aggregate_tokens_per_sec"] > 0
        assert 0 < level["ttft_ms_p50"] <= level["ttft_ms_max"]


def test_a_level_larger_than_the_slots_is_refused(model_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "engine_burst.py"), str(model_path), "--levels", "4", "--slots", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "needs --slots 4 or more" in done.stderr

"""`rbees-workerd generate` / `bench` as a user runs them, on the real model."""

from __future__ import annotations

import json
import subprocess
import sys

from rbees_workerd.engine.engine import DEFAULT_CONTEXT
from rbees_workerd.engine.model import kv_cache_bytes

CLI = [sys.executable, "-m", "rbees_workerd.cli"]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, check=check, timeout=600)


def test_generate_json_greedy_paris(model_path):
    out = _run("generate", "--model", str(model_path), "--prompt", "The capital of France is",
               "--max-tokens", "6", "--temperature", "0", "--json")  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report) >= {"text", "token_ids", "prompt_tokens", "stop_reason", "prefill_tokens_per_sec",
                           "decode_tokens_per_sec"}  # fmt: skip
    assert report["text"].startswith(" Paris")
    assert report["prompt_tokens"] == 5
    assert len(report["token_ids"]) == 6 and report["stop_reason"] == "MAX_TOKENS"
    assert report["decode_tokens_per_sec"] > 0 and report["prefill_tokens_per_sec"] > 0


def test_generate_streams_plain_text(model_path):
    out = _run("generate", "--model", str(model_path), "--prompt", "The capital of France is",
               "--max-tokens", "3", "--temperature", "0")  # fmt: skip
    assert out.stdout.startswith(" Paris")


def test_generate_seed_reproduces_and_chat_template(model_path):
    args = ["generate", "--model", str(model_path), "--prompt", "Name a fruit.", "--chat",
            "--max-tokens", "8", "--temperature", "1.0", "--top-p", "0.9", "--seed", "42", "--json"]  # fmt: skip
    a = json.loads(_run(*args).stdout.splitlines()[-1])
    b = json.loads(_run(*args).stdout.splitlines()[-1])
    assert a["token_ids"] == b["token_ids"]
    assert a["prompt_tokens"] > 10  # the chat template wrapped the prompt


def test_stop_string_ends_generation(model_path):
    out = _run("generate", "--model", str(model_path), "--prompt", "The capital of France is",
               "--max-tokens", "20", "--temperature", "0", "--stop", "Paris", "--json")  # fmt: skip
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["stop_reason"] == "STOP_SEQUENCE" and report["stop_sequence"] == "Paris"
    assert "Paris" not in report["text"]


def test_bad_model_file_is_reported(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    out = _run("generate", "--model", str(bad), "--prompt", "x", check=False)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line, no traceback
    assert out.stderr.startswith("error: MODEL_LOAD_FAILED: ")


def test_missing_model_file_is_reported(tmp_path):
    out = _run("generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "x", check=False)
    assert out.returncode != 0 and "MODEL_LOAD_FAILED" in out.stderr


def test_bench_json(model_path):
    out = _run("bench", "--model", str(model_path), "--prompt-tokens", "16", "--gen-tokens", "4",
               "--repeats", "1", "--json")  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["prefill_tokens_per_sec"] > 0 and report["decode_tokens_per_sec"] > 0


def test_resident_memory_within_budget(model_path):
    """Peak RSS stays under the file size + the KV cache + 150 MB (weights stay quantized)."""
    from rbees_workerd.engine.config import ModelConfig
    from rbees_workerd.engine.gguf import load_gguf

    f = load_gguf(model_path)
    cfg = ModelConfig.from_gguf(f)
    f.close()
    # the peak of this process image: VmHWM starts afresh at exec, where ru_maxrss keeps the peak of the
    # process that forked it (this test runner, large after other tests)
    code = (
        "import re, sys; sys.argv=['rbees-workerd', 'generate', '--model', "
        f"{str(model_path)!r}, '--prompt', 'Hello there',"
        "'--max-tokens','8','--temperature','0']; from rbees_workerd.cli import main\n"
        "try:\n    main()\nfinally:\n"
        "    print('VMHWM', re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "VMHWM" in out.stdout, out.stderr
    peak = int(out.stdout.split("VMHWM")[-1]) * 1024
    budget = model_path.stat().st_size + kv_cache_bytes(cfg, 1, DEFAULT_CONTEXT) + 150 * 2**20
    assert peak < budget, f"peak RSS {peak / 2**20:.0f} MiB over budget {budget / 2**20:.0f} MiB"

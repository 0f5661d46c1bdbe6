"""`rbees-workerd serve` configuration: command line over environment over config file over defaults."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from worker_harness import MODEL

from rbees_workerd import cli_serve
from rbees_workerd.settings import Settings, SettingsError

BASE = ["--worker-id", "w1", "--model", str(MODEL), "--port", "8100"]


@pytest.fixture(autouse=True)
def _no_worker_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Each test sets the WORKER_* variables it means; none leak in from the shell."""
    for name in [n for n in os.environ if n.startswith("WORKER_")]:
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def parse_settings(_no_worker_environment: pytest.MonkeyPatch):  # noqa: ANN201
    """`serve`'s settings for a command line and an environment (the real typer parse, env vars and all)."""

    def parse(argv: list[str], env: dict[str, str]) -> Settings:
        with _no_worker_environment.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            return cli_serve.parse_settings(argv)

    return parse


def test_defaults(parse_settings) -> None:
    s = parse_settings(BASE, env={})
    assert (s.worker_id, s.model, s.model_ref, s.host, s.port) == ("w1", MODEL, MODEL.stem, "127.0.0.1", 8100)
    assert (s.backend, s.gpu, s.slots, s.context_length, s.callback_url, s.api_token) == (
        "cpu",
        0,
        4,
        None,
        None,
        None,
    )
    assert (s.log_level, s.drain_timeout_s, s.url) == ("INFO", 30.0, "http://127.0.0.1:8100")
    assert s.step_tokens is None  # (the engine's step_tokens of the slots)


def test_command_line_beats_environment_beats_config_file(parse_settings, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  tok-123\n")
    config = tmp_path / "worker.json"
    config.write_text(
        json.dumps(
            {
                "slots": 3,
                "gpu": 5,
                "log_level": "debug",
                "bind": "10.0.0.1",
                "model_ref": "from-file",
                "drain_timeout": 2,
                "step_tokens": 1024,
            }
        )
    )
    env = {"WORKER_GPU_DEVICE": "2", "WORKER_BIND_ADDR": "0.0.0.0:9000", "WORKER_API_TOKEN_FILE": str(token)}
    s = parse_settings([*BASE, "--config", str(config), "--slots", "8", "--model-ref", "smollm2-135m"], env=env)
    assert s.slots == 8 and s.model_ref == "smollm2-135m"  # command line
    assert s.gpu == 2 and s.host == "0.0.0.0" and s.api_token == "tok-123"  # environment
    assert s.port == 8100  # --port beats the port in WORKER_BIND_ADDR
    assert s.log_level == "DEBUG" and s.drain_timeout_s == 2.0 and s.step_tokens == 1024  # config file
    assert parse_settings([*BASE, "--step-tokens", "4096"], env={}).step_tokens == 4096
    assert s.url.startswith("http://") and s.url.endswith(":8100") and "0.0.0.0" not in s.url


def test_port_of_the_bind_address_applies_without_a_more_specific_port(parse_settings) -> None:
    no_port = ["--worker-id", "w1", "--model", str(MODEL)]
    s = parse_settings(no_port, env={"WORKER_BIND_ADDR": "0.0.0.0:9000"})
    assert (s.host, s.port) == ("0.0.0.0", 9000)
    s = parse_settings([*no_port, "--bind", "127.0.0.1:9001"], env={"WORKER_BIND_ADDR": "0.0.0.0:9000"})
    assert (s.host, s.port) == ("127.0.0.1", 9001)


@pytest.mark.parametrize(
    ("bind", "host", "port"),
    [
        ("0.0.0.0", "0.0.0.0", 8100),
        ("192.168.1.5:8200", "192.168.1.5", 8200),
        ("[::1]:8300", "::1", 8300),
        ("::1", "::1", 8100),
        ("localhost", "localhost", 8100),
    ],
)
def test_bind_address_forms(parse_settings, bind: str, host: str, port: int) -> None:
    s = parse_settings([*BASE, "--bind", bind], env={})
    assert (s.host, s.port) == (host, port)


def test_bind_with_port_needs_no_port_option(parse_settings) -> None:
    s = parse_settings(["--worker-id", "w1", "--model", str(MODEL), "--bind", "127.0.0.1:8555"], env={})
    assert s.port == 8555


def _bad(tmp: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    cfg = tmp / "c.json"
    return {
        "missing model file": (
            ["--worker-id", "w1", "--model", str(tmp / "no.gguf"), "--port", "1"],
            {},
            "does not exist",
        ),
        "no worker id": (BASE[2:], {}, "--worker-id is required"),
        "worker id with spaces": (["--worker-id", "a b", *BASE[2:]], {}, "invalid worker id"),
        "no port": (BASE[:4], {}, "--port is required"),
        "port out of range": ([*BASE[:5], "99999"], {}, "port must be between"),
        "port not a number": ([*BASE[:5], "eighty"], {}, "'--port': Input should be a valid integer"),
        "bad backend": ([*BASE, "--backend", "tpu"], {}, "--backend must be cpu or cuda"),
        "zero slots": ([*BASE, "--slots", "0"], {}, "--slots must be between"),
        "tiny context": ([*BASE, "--context-length", "2"], {}, "--context-length must be between"),
        "tiny step": ([*BASE, "--step-tokens", "8"], {}, "--step-tokens must be between 16 and 65536"),
        "step under slots": ([*BASE, "--slots", "64", "--step-tokens", "32"], {}, "--step-tokens must be between 64"),
        "bad bind": ([*BASE, "--bind", "a:b:c d"], {}, "invalid bind address"),
        "token file missing": ([*BASE, "--api-token-file", str(tmp / "none")], {}, "cannot read API token file"),
        "token file from env missing": (BASE, {"WORKER_API_TOKEN_FILE": str(tmp / "none")}, "cannot read API"),
        "empty token file": ([*BASE, "--api-token-file", str(cfg)], {}, "is empty"),
        "bad log level env": (BASE, {"WORKER_LOG_LEVEL": "LOUD"}, "log level must be one of"),
        "bad gpu env": (BASE, {"WORKER_GPU_DEVICE": "first"}, "'WORKER_GPU_DEVICE'): Input should be a valid"),
        "config not json": ([*BASE, "--config", str(tmp / "bad.json")], {}, "is not valid JSON"),
        "config unknown key": ([*BASE, "--config", str(tmp / "unknown.json")], {}, "unknown key 'slotz'"),
        "config wrong type": ([*BASE, "--config", str(tmp / "typed.json")], {}, "slots has the wrong type"),
        "config missing": ([*BASE, "--config", str(tmp / "absent.json")], {}, "cannot read config file"),
        "unknown option": ([*BASE, "--frobnicate"], {}, "No such option: --frobnicate"),
        "bad callback url": ([*BASE, "--callback-url", "ftp://x"], {}, "--callback-url must be an http"),
        "negative drain": ([*BASE, "--drain-timeout", "-1"], {}, "--drain-timeout must be between"),
    }


BAD_CASES = list(_bad(Path("/x")))


@pytest.mark.parametrize("case", BAD_CASES)
def test_invalid_configuration_is_one_clear_line(parse_settings, tmp_path: Path, case: str) -> None:
    (tmp_path / "c.json").write_text("")
    (tmp_path / "bad.json").write_text("{slots: 2")
    (tmp_path / "unknown.json").write_text('{"slotz": 2}')
    (tmp_path / "typed.json").write_text('{"slots": "2"}')
    argv, env, expected = _bad(tmp_path)[case]
    with pytest.raises(SettingsError) as info:
        parse_settings(argv, env=env)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_threads_like_generate_and_bench(parse_settings, tmp_path: Path) -> None:
    assert parse_settings(BASE, env={}).threads is None  # all cores
    assert parse_settings([*BASE, "--threads", "2"], env={}).threads == 2
    config = tmp_path / "worker.json"
    config.write_text(json.dumps({"threads": 3}))
    assert parse_settings([*BASE, "--config", str(config)], env={}).threads == 3
    with pytest.raises(SettingsError, match="--threads must be between 1 and"):
        parse_settings([*BASE, "--threads", "0"], env={})


def test_the_engine_takes_the_step_budget_of_the_settings(parse_settings, tmp_path: Path) -> None:
    """--step-tokens reaches the engine the worker loads; without it the engine's default for the slots."""
    from ggufgen import write_tiny_model

    from rbees_workerd.engine_process import _load_engine

    tiny = str(write_tiny_model(tmp_path / "tiny.gguf"))
    argv = ["--worker-id", "w1", "--model", tiny, "--port", "8100", "--slots", "64"]
    engine = _load_engine(parse_settings([*argv, "--step-tokens", "96"], env={}), lambda phase, done: None)
    assert engine.model.max_step_tokens == 96
    assert _load_engine(parse_settings(argv, env={}), lambda phase, done: None).model.max_step_tokens == 512

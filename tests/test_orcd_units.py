"""The orchestrator's parts that need no worker: configuration, token files, the registry file, the CLI's
refusals, the task event log's readers, and the OpenAI chunks' encoding."""

from __future__ import annotations

import asyncio
import gc
import socket
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from orcd_harness import ORCD

from rbees_orcd.openai_api import _Shape
from rbees_orcd.registry import Registry, Worker
from rbees_orcd.settings import SettingsError, read_api_token, read_worker_tokens, split_bind
from rbees_orcd.tasks import Task, event, sse_frames, token_event


@pytest.mark.parametrize(
    ("bind", "expected"),
    [("0.0.0.0:8080", ("0.0.0.0", 8080)), ("127.0.0.1:1", ("127.0.0.1", 1)), ("[::1]:9000", ("::1", 9000)),
     ("orcd.lan:80", ("orcd.lan", 80))],
)  # fmt: skip
def test_bind_addresses(bind: str, expected: tuple[str, int]) -> None:
    assert split_bind(bind) == expected


@pytest.mark.parametrize("bind", ["8080", "host", "host:0", "host:70000", ":8080", "a b:80", "[::1]"])
def test_bad_bind_addresses(bind: str) -> None:
    with pytest.raises(SettingsError, match="--bind"):
        split_bind(bind)


def test_worker_token_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# tokens for the workers\nshared-token\n\nw-gpu-1  gpu-token  # its own\n")
    tokens = read_worker_tokens(path)
    assert tokens.for_worker("w-gpu-1") == "gpu-token" and tokens.for_worker("w-cpu") == "shared-token"
    assert tokens.headers("w-gpu-1") == {"Authorization": "Bearer gpu-token"}
    path.write_text("w-a a-token\n")
    assert read_worker_tokens(path).headers("w-b") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "holds no token"), ("# only a comment\n", "holds no token"), ("one\ntwo\n", "line 2"),
     ("w-a t1\nw-a t2\n", "line 2"), ("w-a t1 extra\n", "line 1"), ("bad/id token\n", "line 1")],
)  # fmt: skip
def test_bad_worker_token_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(SettingsError, match=message):
        read_worker_tokens(path)


def test_api_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  s3cret \n")
    assert read_api_token(path) == "s3cret"
    for bad in ("", "two words"):
        path.write_text(bad)
        with pytest.raises(SettingsError, match="one token"):
            read_api_token(path)
    with pytest.raises(SettingsError, match="cannot read"):
        read_api_token(tmp_path / "missing")


def test_the_registry_survives_a_reopen(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "registry.sqlite"
    registry = Registry(db)
    a = registry.register(Worker("w-a", "http://127.0.0.1:8001", "smol", "cpu", "cpu", 0, 4))
    registry.register(Worker("w-b", "http://127.0.0.1:8002", "qwen", "cuda", "H100", 123, 8))
    a.state, a.failing_since, a.active = "unhealthy", 1.5, 3
    registry.save(a)
    registry.remove("w-b")
    registry.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = Registry(db)
    try:
        assert [w.worker_id for w in again.all()] == ["w-a"]
        w = again.get("w-a")
        assert w is not None and (w.url, w.model, w.slots_total, w.state, w.failing_since) == (
            "http://127.0.0.1:8001", "smol", 4, "unhealthy", 1.5
        )  # fmt: skip
        assert w.active == 0  # load is this process's, never stored
        assert again.knows("qwen") and again.knows("smol") and not again.knows("other")
        assert again.models() == set()  # no healthy worker
    finally:
        again.close()


def _orcd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ORCD), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--bind", "nowhere"], "invalid --bind"), (["--api-token-file", "/nonexistent/token"], "cannot read"),
     (["--log-level", "LOUD"], "--log-level"), (["--max-queue", "-1"], "--max-queue")],
)  # fmt: skip
def test_bad_options_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    done = _orcd("--db", str(tmp_path / "db.sqlite"), *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "db.sqlite").exists()


def test_a_taken_port_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _orcd("--bind", f"127.0.0.1:{port}", "--db", str(tmp_path / "db.sqlite"))
    assert done.returncode == 1 and "cannot listen" in done.stderr


def test_a_reader_that_goes_away_does_not_stop_the_others() -> None:
    """Readers of one task wait independently: cancelling one (its client hung up) leaves the rest waiting."""

    async def scenario() -> list[bytes]:
        task = Task("smol", {"prompt": "x", "max_tokens": 1})
        task.publish(event("queued", {"type": "queued"}))
        readers = [asyncio.create_task(task.wait_beyond(0)) for _ in range(3)]
        await asyncio.sleep(0)
        readers[0].cancel()
        await asyncio.sleep(0)
        task.publish(token_event(b'{"type":"token","t":"a","i":0}', "a"))
        await asyncio.wait_for(asyncio.gather(*readers[1:]), 5)
        task.finish("completed", event("end", {"type": "end"}))
        await asyncio.wait_for(task.wait_beyond(99), 5)  # an ended task never makes a reader wait
        return [sse_frames(task, 0), sse_frames(task, 2)]

    everything, resumed = asyncio.run(scenario())
    assert everything.split(b"\n\n")[1] == b'id: 1\ndata: {"type":"token","t":"a","i":0}'
    assert resumed == b'id: 2\ndata: {"type":"end"}\n\n'


def test_the_tokens_of_a_log_leave_the_garbage_collectors_sight() -> None:
    """A task's tokens are kept as long as the task is: a full collection must not walk each of them."""
    task = Task("smol", {"prompt": "x", "max_tokens": 2})
    task.publish(event("queued", {"type": "queued"}))
    task.publish(token_event(b'{"type":"token","t":"a","i":0}', "a"))
    gc.collect()
    assert [gc.is_tracked(entry) for entry in task.events] == [True, False]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("usage", [None, False])
def test_a_token_chunk_is_the_encoded_chunk_document(chat: bool, usage: Any) -> None:
    """The stream's token chunks are cut from one encoded document: each must be that document, encoded."""
    shape = _Shape(chat, "chatcmpl-1\x00", 'smol\x00"model', 1700000000)  # the cut-out mark in the id and model too
    head, tail = shape.token_chunk(usage)
    for text in ["", " Paris", 'a "quote" \\ back\nslash', "\x00", "\u2028é😀", "\ud7ff"]:
        document = shape.document([shape.choice(text, None, chunk=True)], chunk=True, usage=usage)
        assert head + orjson.dumps(text) + tail == b"data: " + orjson.dumps(document) + b"\n\n"

"""The ready callback against real HTTP servers on loopback: retries on 5xx and refused connections."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from worker_harness import CallbackServer, free_port

from rbees_workerd.callback import CallbackFailed, send_ready

PAYLOAD = {
    "worker_id": "w1",
    "url": "http://127.0.0.1:1",
    "model_ref": "m",
    "backend": "cpu",
    "device": "cpu",
    "vram_bytes": 0,
    "slots_total": 1,
}


def test_retries_5xx_until_accepted() -> None:
    with CallbackServer([503, 500, 502]) as server:
        attempts = asyncio.run(send_ready(server.url, PAYLOAD, first_delay_s=0.01))
    assert attempts == 4
    assert server.received == [PAYLOAD] * 4


def test_4xx_is_final() -> None:
    with CallbackServer([409]) as server, pytest.raises(CallbackFailed, match="refused with HTTP 409"):
        asyncio.run(send_ready(server.url, PAYLOAD, first_delay_s=0.01))
    assert len(server.received) == 1


def test_retries_while_the_receiver_is_not_listening_yet() -> None:
    """Connection refused at first: the orchestrator starts after the worker."""
    port = free_port()
    holder: dict[str, CallbackServer] = {}

    def start_later() -> None:
        time.sleep(0.3)
        holder["server"] = CallbackServer([], port=port).__enter__()

    starter = threading.Thread(target=start_later)
    starter.start()
    try:
        attempts = asyncio.run(send_ready(f"http://127.0.0.1:{port}/ready", PAYLOAD, first_delay_s=0.05))
    finally:
        starter.join()
        holder["server"].__exit__()
    assert attempts > 1
    assert holder["server"].received == [PAYLOAD]


def test_gives_up_after_the_deadline() -> None:
    with pytest.raises(CallbackFailed, match="did not get through"):
        asyncio.run(send_ready(f"http://127.0.0.1:{free_port()}/r", PAYLOAD, deadline_s=0.2, first_delay_s=0.05))

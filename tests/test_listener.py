"""The daemons' listener (rbees_workerd/listener.py): every pending connection accepted at once, on uvloop too."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
import uvicorn
import uvloop

from rbees_workerd.listener import Server, bind_socket

N = 48


async def _app(scope: dict, receive: object, send: object) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _iterations_to_accept(server_class: type[uvicorn.Server]) -> tuple[int, str]:
    """Connect N clients while the loop has work ready at every iteration (a task yielding with sleep(0)), and
    count the iterations until the server has taken them all; then one request on a fresh connection."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = server_class(uvicorn.Config(_app, log_config=None, lifespan="off", access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(N)]  # (the kernel completes them)
    try:
        iterations = 0
        while len(server.server_state.connections) < N and iterations < 4 * N:
            await asyncio.sleep(0)
            iterations += 1
        async with httpx.AsyncClient() as client:
            body = (await client.get(f"http://127.0.0.1:{port}/")).text
    finally:
        for c in clients:
            c.close()
        server.should_exit = True
        await serving
    return iterations, body


@pytest.mark.parametrize("loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"])
def test_every_pending_connection_is_accepted_at_once(loop_factory) -> None:  # noqa: ANN001
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        iterations, body = runner.run(_iterations_to_accept(Server))
    assert iterations <= 4 and body == "ok"


def test_uvloop_alone_takes_one_connection_an_iteration() -> None:
    """What Server is for: uvicorn's own listener on uvloop takes a busy loop's connections one at a time."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        iterations, body = runner.run(_iterations_to_accept(uvicorn.Server))
    assert iterations >= N // 2 and body == "ok"

"""One task on one host (output passed straight through) or on several at once: every host in its own thread,
each output line prefixed with its host, one unreachable host never stopping the others, and a summary."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from fabric import Connection

from rbees import remote, ssh
from rbees.errors import RbeesError
from rbees.exitcodes import ExitCode
from rbees.hosts import Host
from rbees_pool.output import emit_json, table


@dataclass(frozen=True)
class Stream:
    """How a task's remote commands run: where their output goes, through a terminal or not, which
    environment variables they get, and the event that stops them."""

    label: str
    sink: remote.Sink
    pty: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)

    def run(self, connection: Connection, command: str) -> int:
        return remote.run(
            connection, command, self.sink, pty=self.pty, env=self.env, cancel=self.cancel, label=self.label
        )

    def captured(self) -> tuple[Stream, remote.Capture]:
        """The same stream, but capturing the output (for a command whose answer the task parses)."""
        capture = remote.Capture()
        return replace(self, sink=capture, pty=False, env={}), capture


Task = Callable[[Host, Connection, Stream], int]


@dataclass
class Outcome:
    """How one host of a multi-host run ended."""

    host: str
    exit_code: int
    error: str | None  # "CODE: message" when rbees itself failed (connection, host key, lost session)
    seconds: float
    stdout: bytes = b""  # with collect_stdout only


def run_one(host: Host, known: ssh.KnownHosts, task: Task, stream: Stream) -> int:
    """Connect and run `task`; its exit code, or the RbeesError of the connection."""
    with ssh.connect(host, known) as connection:
        return task(host, connection, stream)


def run_single(host: Host, known: ssh.KnownHosts, task: Task, *, pty: bool, env: Mapping[str, str]) -> int:
    """One host: its output passes through untouched (through a terminal when `pty`)."""
    return run_one(host, known, task, Stream(host.name, remote.Passthrough(), pty=pty, env=env))


def run_many(
    hosts: Sequence[Host], known: ssh.KnownHosts, task: Task, *, env: Mapping[str, str], collect_stdout: bool
) -> list[Outcome]:
    """Every host in parallel, lines prefixed `host | `; with `collect_stdout` stdout is kept (for one JSON
    document) and only stderr is printed. Ctrl-C stops every host's command."""
    width = max(len(host.name) for host in hosts)
    lock = threading.Lock()
    cancel = threading.Event()
    sinks = {host.name: _Prefixed(host.name.ljust(width), lock, collect_stdout) for host in hosts}

    def attempt(host: Host) -> Outcome:
        sink = sinks[host.name]
        started = time.monotonic()
        try:
            code, error = run_one(host, known, task, Stream(host.name, sink, env=env, cancel=cancel)), None
        except RbeesError as exc:
            code, error = int(exc.exit_code), str(exc)
        except Exception as exc:  # a bug on one host's path must not hide the others' results
            code, error = int(ExitCode.FAILURE), f"FAILURE: {type(exc).__name__}: {exc}"
        sink.finish(error)
        return Outcome(host.name, code, error, time.monotonic() - started, bytes(sink.kept))

    with ThreadPoolExecutor(max_workers=min(len(hosts), 32), thread_name_prefix="rbees-host") as pool:
        futures = [pool.submit(attempt, host) for host in hosts]
        try:
            return [future.result() for future in futures]
        except KeyboardInterrupt:
            cancel.set()
            raise


def exit_code(outcomes: Sequence[Outcome]) -> int:
    """0 when every host succeeded, else HOSTS_FAILED (each host's own code is in the summary)."""
    return int(ExitCode.OK if all(o.exit_code == 0 for o in outcomes) else ExitCode.HOSTS_FAILED)


def print_summary(outcomes: Sequence[Outcome]) -> None:
    """The table people read after the prefixed output."""
    table("Summary", ["host", "result", "exit", "seconds"], [
        [o.host, "ok" if o.exit_code == 0 else (o.error or "failed").split(":")[0], str(o.exit_code),
         f"{o.seconds:.1f}"]
        for o in outcomes
    ])  # fmt: skip


def emit_outcomes(outcomes: Sequence[Outcome]) -> None:
    """One JSON document for scripts: each host's exit code, rbees' error and its parsed `--json` output."""
    emit_json([
        {"host": o.host, "exit_code": o.exit_code, "error": o.error, "seconds": round(o.seconds, 3),
         "output": _parsed(o.stdout)}
        for o in outcomes
    ])  # fmt: skip


def _parsed(stdout: bytes) -> object:
    """A host's --json document, or its text when it printed none (e.g. it failed before)."""
    text = stdout.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text or None


class _Prefixed:
    """A host's output as whole lines, each written `host | line` at once (lines of hosts never interleave)."""

    def __init__(self, prefix: str, lock: threading.Lock, keep_stdout: bool) -> None:
        self._prefix = f"{prefix} | ".encode()
        self._lock = lock
        self._keep_stdout = keep_stdout
        self.kept = bytearray()
        self._partial = {"out": bytearray(), "err": bytearray()}

    def stdout(self, data: bytes) -> None:
        if self._keep_stdout:
            self.kept += data
        else:
            self._lines("out", data)

    def stderr(self, data: bytes) -> None:
        self._lines("err", data)

    def finish(self, error: str | None) -> None:
        """Write what is left of unterminated lines, then rbees' own error for this host."""
        for name, partial in self._partial.items():
            if partial:
                self._lines(name, b"\n")
        if error:
            self._lines("err", f"error: {error}\n".encode())

    def _lines(self, name: str, data: bytes) -> None:
        partial = self._partial[name]
        partial += data
        *lines, rest = partial.split(b"\n")
        if not lines:
            return
        partial[:] = rest
        out = sys.stdout.buffer if name == "out" else sys.stderr.buffer
        with self._lock:
            out.write(b"".join(self._prefix + line.rstrip(b"\r") + b"\n" for line in lines))
            out.flush()

"""Remote commands: POSIX-shell quoting, live streaming of a command's output, and its exit status.

sshd hands every command to the login shell as one string, so each argument is quoted here and reaches the
remote program as exactly the word the operator typed. Forwarded environment values (tokens) travel inside
the channel on the command's stdin, never on a command line, so no process list shows them.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import paramiko
from fabric import Connection

from rbees.errors import Interrupted, InvalidArgument, RemoteLost

_TILDE = re.compile(r"^~[A-Za-z0-9._-]*(?=/|$)")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_READY = b"rbees-env-ready"
_CHUNK = 1 << 16
_POLL_S = 0.2


def word(arg: str) -> str:
    """One argument, quoted for a POSIX shell: it arrives as this exact string, whatever it holds."""
    return shlex.quote(arg)


def path_word(path: str) -> str:
    """A path from the operator's configuration: quoted like `word`, except that a leading `~` or `~user`
    stays bare, so the remote shell expands it to that host's home."""
    tilde = _TILDE.match(path)
    if tilde is None:
        return word(path)
    rest = path[tilde.end() + 1 :]  # after the slash, which must stay bare too for the shell to expand
    if tilde.end() == len(path):
        return tilde.group()
    return f"{tilde.group()}/{word(rest) if rest else ''}"


def program_words(command: str) -> str:
    """The operator's `rbees_pool` setting (e.g. `~/.venvs/rbees/bin/rbees-pool`), word by word."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise InvalidArgument(f"cannot split the remote command {command!r}: {exc}") from None
    if not words:
        raise InvalidArgument("the remote rbees-pool command is empty")
    return " ".join(path_word(w) for w in words)


def check_env(names: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The local values of the variables to forward; each must be set and be one line of printable text."""
    values = {}
    for name in names:
        if not _ENV_NAME.match(name):
            raise InvalidArgument(f"--env {name!r} is not a variable name")
        value = environ.get(name)
        if value is None:
            raise InvalidArgument(f"--env {name}: it is not set here")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise InvalidArgument(f"--env {name}: its value holds a control character or a newline")
        values[name] = value
    return values


class Sink(Protocol):
    """Where a remote command's output goes as it arrives."""

    def stdout(self, data: bytes) -> None: ...

    def stderr(self, data: bytes) -> None: ...


class Passthrough:
    """Bytes straight to our own stdout and stderr, flushed at once: `--json` documents arrive untouched."""

    def stdout(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    def stderr(self, data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()


class Capture:
    """Keeps stdout (to be parsed) and stderr (to be reported)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()

    def stdout(self, data: bytes) -> None:
        self.out += data

    def stderr(self, data: bytes) -> None:
        self.err += data


def run(
    connection: Connection,
    command: str,
    sink: Sink,
    *,
    pty: bool = False,
    env: Mapping[str, str] | None = None,
    cancel: threading.Event | None = None,
    label: str = "",
) -> int:
    """Run `command` on the host, stream its output into `sink` as it arrives and return its exit status.

    With `pty` the remote side gets a terminal of our size (progress bars draw, Ctrl-C reaches it as ^C);
    without, its stdout and stderr stay apart and byte-exact. No exit status (the connection dropped, or the
    command was killed by a signal) raises RemoteLost. `cancel` (set by another thread) closes the channel.
    """
    channel = connection.create_session()
    try:
        if pty:
            columns, rows = shutil.get_terminal_size()
            channel.get_pty(term=os.environ.get("TERM", "xterm"), width=columns, height=rows)
        if env:
            _run_with_env(channel, command, env, sink)
        else:
            channel.exec_command(command)
        if not pty:
            channel.shutdown_write()  # the remote command needs no input: it sees EOF, never waits for it
        with _resizing(channel) if pty else contextlib.nullcontext():
            _pump(channel, sink, pty, cancel or threading.Event())
        status = channel.recv_exit_status()
    finally:
        channel.close()
    if cancel is not None and cancel.is_set():
        raise Interrupted(f"{label or connection.host}: stopped (Ctrl-C)")
    if status < 0:
        raise RemoteLost(
            f"{label or connection.host}: no exit status came back: the connection dropped or the command was killed"
        )
    return status


def _run_with_env(channel: paramiko.Channel, command: str, env: Mapping[str, str], sink: Sink) -> None:
    """Start `command` behind a preamble that reads each variable from stdin and exports it. On a terminal
    the preamble turns echo off first and says so before we send anything, so the values are never echoed."""
    reads = " && ".join(f"IFS= read -r {name} && export {name}" for name in env)
    channel.exec_command(f"stty -echo 2>/dev/null; echo {_ENV_READY.decode()} && {reads} && {command}")
    pending = b""
    while (marker := pending.find(_ENV_READY)) < 0 or b"\n" not in pending[marker:]:
        data = channel.recv(_CHUNK)
        if not data:  # the shell ended before the preamble ran: its output says why
            sink.stdout(pending)
            return
        pending += data
    sink.stdout(pending[:marker] + pending[marker:].split(b"\n", 1)[1])
    channel.sendall("".join(f"{value}\n" for value in env.values()).encode())


def _pump(channel: paramiko.Channel, sink: Sink, pty: bool, cancel: threading.Event) -> None:
    """Copy output until the command's exit status arrives (all output precedes it on the channel)."""
    interrupted = False
    while True:
        try:
            moved = _drain(channel, sink)
            if not moved:
                if channel.exit_status_ready():
                    _drain(channel, sink)
                    return
                if cancel.is_set():
                    channel.close()
                    return
                select.select([channel], [], [], _POLL_S)
        except KeyboardInterrupt:
            if not pty or interrupted:  # without a terminal, or at the second Ctrl-C: hang up
                channel.close()
                raise
            interrupted = True
            channel.send(b"\x03")  # the remote terminal turns it into SIGINT for the command


def _drain(channel: paramiko.Channel, sink: Sink) -> bool:
    moved = False
    while channel.recv_ready():
        sink.stdout(channel.recv(_CHUNK))
        moved = True
    while channel.recv_stderr_ready():
        sink.stderr(channel.recv_stderr(_CHUNK))
        moved = True
    return moved


@contextlib.contextmanager
def _resizing(channel: paramiko.Channel) -> Iterator[None]:
    """Keep the remote terminal as large as ours while the command runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGWINCH, lambda *_: channel.resize_pty(*shutil.get_terminal_size()))
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)

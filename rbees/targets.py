"""Choosing hosts on the command line (`--host a,b`, `--all`) and running a task on them with the right output:
one host passes its output through (a terminal for it when ours is one), several get prefixes and a summary."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from rbees import fleet, remote, ssh
from rbees.errors import Interrupted, InvalidArgument
from rbees.hosts import Host, Inventory

HostOpt = Annotated[
    str | None,
    typer.Option("--host", "-H", help="Host(s), comma-separated: hosts.toml names, ssh aliases, user@host[:port]."),
]
AllOpt = Annotated[bool, typer.Option("--all", help="Every host of the hosts file.")]
AcceptOpt = Annotated[
    bool,
    typer.Option("--accept-new-host-key", help="Record an unknown host key in known_hosts (a changed one is refused)."),
]
EnvOpt = Annotated[
    list[str] | None,
    typer.Option("--env", help="Forward this local variable (e.g. HF_TOKEN) inside the SSH channel; repeatable."),
]


def select(host: str | None, all_hosts: bool) -> list[Host]:
    """The hosts named by --host (comma-separated, in order, once each) or --all."""
    inventory = Inventory()
    if host is not None and all_hosts:
        raise InvalidArgument("give --host or --all, not both")
    if all_hosts:
        names = inventory.names()
        if not names:
            raise InvalidArgument(f"the hosts file {inventory.hosts_path} lists no hosts")
    else:
        names = list(dict.fromkeys(name.strip() for name in (host or "").split(",") if name.strip()))
        if not names:
            raise InvalidArgument("say where: --host NAME (or a,b,c) or --all")
    return [inventory.resolve(name) for name in names]


def execute(hosts: list[Host], task: fleet.Task, *, accept_new: bool, env: list[str] | None, json_mode: bool) -> int:
    """Run `task` on `hosts`; the exit code to leave with."""
    known = ssh.KnownHosts(accept_new)
    values = remote.check_env(env or [], os.environ)
    with interrupts():
        if len(hosts) == 1:
            pty = not json_mode and sys.stdout.isatty() and sys.stderr.isatty()
            return fleet.run_single(hosts[0], known, task, pty=pty, env=values)
        outcomes = fleet.run_many(hosts, known, task, env=values, collect_stdout=json_mode)
    if json_mode:
        fleet.emit_outcomes(outcomes)
    else:
        fleet.print_summary(outcomes)
    return fleet.exit_code(outcomes)


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """Ctrl-C ends like every other failure: one `error: INTERRUPTED` line (exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted("stopped (Ctrl-C)") from None

"""`rbees hosts list|check`: the hosts rbees knows, and whether each answers with a working rbees-pool."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from fabric import Connection

from rbees import commands, fleet, ssh
from rbees.errors import RbeesError
from rbees.hosts import Host, Inventory
from rbees.targets import AcceptOpt, interrupts, select
from rbees_pool.output import emit_json, table

app = typer.Typer(no_args_is_help=True, help="Pool hosts: the hosts file and ssh-config aliases; check them.")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


@app.command("list")
def list_cmd(as_json: JsonOpt = False) -> None:
    """Hosts of the hosts file (what --all runs on) and ssh-config aliases, resolved; nothing is contacted."""
    inventory = Inventory()
    names = inventory.names()
    docs = [_describe(inventory, name) for name in names] + [
        _describe(inventory, alias) for alias in inventory.aliases() if alias not in names
    ]
    if as_json:
        paths = {"hosts_file": str(inventory.hosts_path), "ssh_config": str(inventory.ssh_config_path)}
        emit_json({**paths, "hosts": docs})
        return
    table(f"Hosts ({inventory.hosts_path}, {inventory.ssh_config_path})",
          ["name", "from", "ssh", "via", "rbees-pool", "home", "repo"], [
        [d["name"], d["source"], d["address"] or d["error"], ", ".join(d["jump"]) or "-", d["rbees_pool"] or "-",
         d["home"] or "(default)", d["repo"] or "-"]
        for d in docs
    ])  # fmt: skip


@app.command("check")
def check_cmd(
    hosts: Annotated[str | None, typer.Argument(help="Host(s), comma-separated (default: the hosts file's).")] = None,
    accept_new_host_key: AcceptOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Connect to each host; report its rbees-pool version, backends and GPUs."""
    targets = select(hosts, all_hosts=hosts is None)
    found: dict[str, dict[str, Any]] = {}

    def probe(host: Host, connection: Connection, stream: fleet.Stream) -> int:
        version_stream, version = stream.captured()
        code = version_stream.run(connection, commands.version(host))
        status_stream, status = stream.captured()
        code = code or status_stream.run(connection, commands.pool(host, ["status", "--json"]))
        found[host.name] = _facts(version.out, status.out, (version.err + status.err).decode(errors="replace"))
        return code

    with interrupts():
        outcomes = fleet.run_many(targets, ssh.KnownHosts(accept_new_host_key), probe, env={}, collect_stdout=True)
    docs = [{"host": o.host, "address": t.endpoint.address, "ok": o.exit_code == 0, "exit_code": o.exit_code,
             "error": o.error, "seconds": round(o.seconds, 3), **found.get(o.host, {})}
            for o, t in zip(outcomes, targets, strict=True)]  # fmt: skip
    if as_json:
        emit_json(docs)
    else:
        table("Hosts", ["host", "ssh", "result", "rbees-pool", "backends", "GPUs"], [
            [d["host"], d["address"], "ok" if d["ok"] else _failure(d),
             d.get("version") or "-", ", ".join(d.get("backends") or []) or "-",
             ", ".join(d.get("gpus") or []) or "none"]
            for d in docs
        ])  # fmt: skip
    failed = [o for o in outcomes if o.exit_code]
    raise typer.Exit(0 if not failed else failed[0].exit_code if len(outcomes) == 1 else fleet.exit_code(outcomes))


def _failure(doc: dict[str, Any]) -> str:
    """The table's short reason (the whole error line was printed on stderr): the code, or the remote's words."""
    if doc["error"]:
        return doc["error"].split(":")[0]
    return doc.get("stderr") or f"exit {doc['exit_code']}"


def _describe(inventory: Inventory, name: str) -> dict[str, Any]:
    """A name as `hosts list` shows it; one that cannot be resolved (e.g. a ProxyCommand alias) says why."""
    blank = {"name": name, "source": "hosts.toml" if name in inventory.names() else "ssh-config", "address": None,
             "jump": [], "rbees_pool": None, "home": None, "repo": None, "error": None}  # fmt: skip
    try:
        host = inventory.resolve(name)
    except RbeesError as exc:
        return {**blank, "error": str(exc)}
    return {
        **blank,
        "source": host.source,
        "address": host.endpoint.address,
        "jump": [hop.address for hop in host.endpoint.jump],
        "rbees_pool": host.rbees_pool,
        "home": host.home,
        "repo": host.repo,
    }


def _facts(version: bytes, status: bytes, stderr: str) -> dict[str, Any]:
    """What `rbees-pool --version` and `status --json` said (the last stderr line when they failed)."""
    facts: dict[str, Any] = {"version": version.decode(errors="replace").strip().removeprefix("rbees-pool ") or None}
    try:
        doc = json.loads(status)
    except ValueError:
        return {**facts, "stderr": stderr.strip().splitlines()[-1] if stderr.strip() else None}
    facts["backends"] = [b["name"] for b in doc.get("backends", []) if b.get("available")]
    facts["gpus"] = [f"{g['index']}: {g['name']}" for g in doc.get("host", {}).get("gpus", [])]
    facts["hostname"] = doc.get("host", {}).get("hostname")
    return facts

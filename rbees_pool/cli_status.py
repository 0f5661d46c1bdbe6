"""`rbees-pool status` and `rbees-pool backends list`: what this host has and runs."""

from __future__ import annotations

import typer

import catalog
from rbees_pool.context import JsonOpt, pool_paths
from rbees_pool.host import backends, gpus, host_info
from rbees_pool.output import console, emit_json, human_size, table
from rbees_pool.workers import records

backends_app = typer.Typer(no_args_is_help=True, help="Inference backends this host can run.")


@backends_app.command("list")
def backends_list(as_json: JsonOpt = False) -> None:
    """cpu and cuda, whether each is available here, and on which devices."""
    docs = backends(gpus())
    if as_json:
        emit_json(docs)
        return
    rows = [[d["name"], "yes" if d["available"] else "no", ", ".join(d["devices"]) or "-"] for d in docs]
    table("Backends", ["backend", "available", "devices"], rows)


def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Host, CPU, RAM, GPUs, backends, workers and downloaded models."""
    paths = pool_paths(ctx)
    host = host_info()
    live, _ = records.reconcile(paths)
    entries = list(catalog.load(paths.root))
    doc = {
        "root": str(paths.root),
        "host": host,
        "backends": backends(gpus()),
        "workers": [record.to_json() for record in live],
        "models": [{"id": e.id, "downloaded": paths.model_file(e).is_file()} for e in entries],
    }
    if as_json:
        emit_json(doc)
        return
    cpu, ram = host["cpu"], host["ram"]
    console.print(f"host  {host['hostname']} ({host['os']})   pool root {paths.root}")
    console.print(f"cpu   {cpu['model']}, {cpu['cores_logical']} threads")
    console.print(f"ram   {human_size(ram['available_bytes'])} free of {human_size(ram['total_bytes'])}")
    table("GPUs", ["index", "name", "VRAM free", "VRAM total"], [
        [str(g["index"]), g["name"], human_size(g["vram_free_bytes"]), human_size(g["vram_total_bytes"])]
        for g in host["gpus"]
    ])  # fmt: skip
    table(
        "Backends", ["backend", "available"], [[b["name"], "yes" if b["available"] else "no"] for b in doc["backends"]]
    )
    table("Workers", ["id", "model", "backend", "url"], [[r.worker_id, r.model_id, r.backend, r.url] for r in live])
    downloaded = [m["id"] for m in doc["models"] if m["downloaded"]]
    console.print(f"models {len(entries)} in catalog, downloaded: {', '.join(downloaded) or 'none'}")

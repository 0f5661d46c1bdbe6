"""What every command shares: the pool root from the global --root option, and the --json option."""

from __future__ import annotations

from typing import Annotated

import typer

from rbees_pool.paths import PoolPaths

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def pool_paths(ctx: typer.Context) -> PoolPaths:
    """The PoolPaths the root callback stored."""
    paths = ctx.find_root().obj
    assert isinstance(paths, PoolPaths)
    return paths

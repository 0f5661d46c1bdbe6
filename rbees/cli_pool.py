"""`rbees pool ... --host H`: rbees-pool's commands run on pool hosts, and the upkeep of their checkouts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from fabric import Connection

from rbees import commands, targets
from rbees.fleet import Stream, Task
from rbees.hosts import Host
from rbees.targets import AcceptOpt, AllOpt, EnvOpt, HostOpt

app = typer.Typer(
    no_args_is_help=True,
    help="Run rbees-pool on pool hosts over SSH (output streamed, exit code passed through), or keep their "
    "checkouts current. Append --host H, --host a,b or --all.",
)
git_app = typer.Typer(no_args_is_help=True, help="The host's checkout (`repo` in hosts.toml): pull, status, build.")
app.add_typer(git_app, name="git")

# rbees-pool's own options (and --help, with a host) pass through; ours are taken wherever they appear.
_FORWARD = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}
_POOL_COMMANDS = {
    "models": "rbees-pool models catalog|register|download|list|remove|unregister|prune ...",
    "worker": "rbees-pool worker spawn|list|stop|stop-all|logs ...",
    "status": "rbees-pool status: host, CPU, RAM, GPUs, backends, workers, models.",
    "backends": "rbees-pool backends list.",
}
_NOT_FOUND = 127  # what a POSIX shell returns for a command it cannot find


def _forwarder(name: str) -> Callable[..., None]:
    def forward(
        ctx: typer.Context,
        args: Annotated[list[str] | None, typer.Argument(help="rbees-pool's arguments.", show_default=False)] = None,
        host: HostOpt = None,
        all_hosts: AllOpt = False,
        accept_new_host_key: AcceptOpt = False,
        env: EnvOpt = None,
    ) -> None:
        words = [name, *(args or [])]
        if host is None and not all_hosts and ("--help" in words or "-h" in words):
            typer.echo(ctx.get_help() + "\n\nWith --host H, --help shows rbees-pool's own help for this command.")
            raise typer.Exit()

        def task(target: Host, connection: Connection, stream: Stream) -> int:
            code = stream.run(connection, commands.pool(target, words))
            if code == _NOT_FOUND:
                stream.sink.stderr(
                    f"hint: is rbees-pool installed on {target.name}? set `rbees_pool` (or `repo`) in its hosts.toml "
                    f"table, or run `rbees pool setup --host {target.name}`\n".encode()
                )
            return code

        hosts = targets.select(host, all_hosts)
        raise typer.Exit(
            targets.execute(hosts, task, accept_new=accept_new_host_key, env=env, json_mode="--json" in words)
        )

    forward.__doc__ = _POOL_COMMANDS[name]
    return forward


for _name in _POOL_COMMANDS:
    app.command(_name, context_settings=_FORWARD)(_forwarder(_name))


def _running(command_for: Callable[[Host], str]) -> Task:
    """A task that runs one command line, built for each host."""

    def task(target: Host, connection: Connection, stream: Stream) -> int:
        return stream.run(connection, command_for(target))

    return task


def _git(action: str) -> Callable[..., None]:
    def run_git(host: HostOpt = None, all_hosts: AllOpt = False, accept_new_host_key: AcceptOpt = False) -> None:
        hosts = targets.select(host, all_hosts)
        task = _running(lambda target: commands.git(target, action))
        raise typer.Exit(targets.execute(hosts, task, accept_new=accept_new_host_key, env=None, json_mode=False))

    return run_git


git_app.command("pull", help="git pull --ff-only in the host's checkout.")(_git("pull"))
git_app.command("status", help="Branch, local changes and last commit of the host's checkout.")(_git("status"))
git_app.command("build", help="Reinstall the checkout into its .venv (after a pull).")(_git("build"))


@app.command()
def setup(
    host: HostOpt = None,
    all_hosts: AllOpt = False,
    accept_new_host_key: AcceptOpt = False,
    python: Annotated[str, typer.Option("--python", help="The host's interpreter for the venv.")] = "python3",
    clone: Annotated[str | None, typer.Option("--clone", help="git URL to clone when `repo` is missing.")] = None,
) -> None:
    """Install rbees from the host's checkout into `<repo>/.venv` (venv + pip install -e .)."""
    hosts = targets.select(host, all_hosts)
    task = _running(lambda target: commands.setup(target, python, clone))
    raise typer.Exit(targets.execute(hosts, task, accept_new=accept_new_host_key, env=None, json_mode=False))

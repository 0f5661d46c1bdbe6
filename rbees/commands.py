"""The command lines `rbees` sends to a host: rbees-pool with the host's settings, and the checkout's upkeep.

Every word from the operator's command line goes through `remote.word`; paths from the hosts file through
`remote.path_word` (a leading `~` means that host's home).
"""

from __future__ import annotations

from collections.abc import Sequence

from rbees.errors import InvalidArgument
from rbees.hosts import Host
from rbees.remote import path_word, program_words, word

_PIP_INSTALL = ".venv/bin/python -m pip install --disable-pip-version-check -e ."


def pool(host: Host, args: Sequence[str]) -> str:
    """`rbees-pool [--root HOME] ARGS...` on `host`, exec'd so its exit status and signals are the session's."""
    root = f" --root {path_word(host.home)}" if host.home else ""
    return f"exec {program_words(host.rbees_pool)}{root} " + " ".join(word(arg) for arg in args)


def git(host: Host, action: str) -> str:
    """Keep a host's checkout current: `pull` (fast-forward only), `status`, `build` (reinstall into .venv)."""
    steps = {
        "pull": "git pull --ff-only",
        "status": "git status --short --branch && git log -1 --format='%h %cd %s' --date=short",
        "build": f"{_require_venv(host)} && {_PIP_INSTALL}",
    }
    return f"{_in_repo(host)} && {steps[action]}"


def setup(host: Host, python: str, clone: str | None) -> str:
    """Install rbees from the host's checkout into `<repo>/.venv` (cloning it first when `clone` is given)."""
    repo = _repo(host)
    fetch = (
        f"git clone -- {word(clone)} {path_word(repo)}"
        if clone
        else _fail(f"{repo} is not a directory; clone it there first or pass --clone URL")
    )
    venv = f"{{ [ -x .venv/bin/python ] || {program_words(python)} -m venv .venv; }}"
    return f"{{ [ -d {path_word(repo)} ] || {fetch}; }} && {_in_repo(host)} && {venv} && {_PIP_INSTALL}"


def version(host: Host) -> str:
    """`rbees-pool --version` (what `hosts check` reports)."""
    return f"exec {program_words(host.rbees_pool)} --version"


def _repo(host: Host) -> str:
    if host.repo is None:
        raise InvalidArgument(f"{host.name}: set `repo` in its [hosts.{host.name}] table of the hosts file first")
    return host.repo


def _in_repo(host: Host) -> str:
    return f"cd {path_word(_repo(host))}"


def _require_venv(host: Host) -> str:
    advice = f"{_repo(host)} has no .venv; run `rbees pool setup --host {host.name}`"
    return f"[ -x .venv/bin/python ] || {_fail(advice)}"


def _fail(message: str) -> str:
    """A shell fragment that prints `error: message` on stderr and exits 1."""
    return f"{{ echo {word('error: ' + message)} >&2; exit 1; }}"

"""How `rbees` resolves host names (hosts.toml, ssh config, user@host[:port]) and words for the remote shell,
and that its exit codes are documented; no connection is made here (test_remote_ssh.py makes them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rbees.errors import InvalidArgument, InvalidHostsFile
from rbees.exitcodes import ExitCode
from rbees.hosts import Inventory, parse_destination
from rbees.remote import path_word, program_words, word
from rbees_pool.exitcodes import ExitCode as PoolExitCode

REPO = Path(__file__).resolve().parents[1]
RBEES = Path(sys.executable).parent / "rbees"

SSH_CONFIG = """\
Host ws
  HostName workstation.example.net
  User alice
  Port 2222
  IdentityFile ~/keys/ws
  ProxyJump bastion,carol@inner:2200
  UserKnownHostsFile ~/kh/first ~/kh/second
  ConnectTimeout 3

Host bastion
  HostName bastion.example.net
  User jump
  IdentitiesOnly yes

Host loop
  ProxyJump loop2
Host loop2
  ProxyJump loop

Host viaproxy
  ProxyCommand nc %h %p
"""

HOSTS = """\
[hosts.gpu1]
ssh = "ws"
home = "~/pools/gpu1"

[hosts.laptop]
repo = "~/src/rbees"

[hosts.custom]
ssh = "bob@10.0.0.7:2022"
rbees_pool = "~/venvs/rbees/bin/rbees-pool"
"""


@pytest.fixture
def inventory(tmp_path: Path) -> Inventory:
    (tmp_path / "ssh_config").write_text(SSH_CONFIG)
    (tmp_path / "hosts.toml").write_text(HOSTS)
    return Inventory(tmp_path / "hosts.toml", tmp_path / "ssh_config")


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("ws", (None, "ws", None)),
        ("bob@ws", ("bob", "ws", None)),
        ("bob@10.0.0.7:2022", ("bob", "10.0.0.7", 2022)),
        ("ssh://bob@[fe80::1]:22", ("bob", "fe80::1", 22)),
        ("[::1]", (None, "::1", None)),
    ],
)
def test_destinations(destination: str, expected: tuple) -> None:
    assert parse_destination(destination) == expected


@pytest.mark.parametrize("destination", ["", "a b", "bob@", "@ws", "ws:", "ws:70000", "ws:0", "a/b", "ws;id"])
def test_malformed_destinations_are_usage_errors(destination: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_destination(destination)


def test_hosts_file_entries_go_through_the_ssh_config(inventory: Inventory) -> None:
    host = inventory.resolve("gpu1")
    endpoint = host.endpoint
    assert (host.source, host.home, host.rbees_pool, host.repo) == ("hosts.toml", "~/pools/gpu1", "rbees-pool", None)
    assert (endpoint.hostname, endpoint.user, endpoint.port) == ("workstation.example.net", "alice", 2222)
    assert endpoint.identity_files == (str(Path.home() / "keys" / "ws"),) and not endpoint.identities_only
    assert endpoint.known_hosts == (str(Path.home() / "kh/first"), str(Path.home() / "kh/second"))
    assert endpoint.connect_timeout == 3 and endpoint.known_hosts_name == "[workstation.example.net]:2222"
    bastion, inner = endpoint.jump
    assert (bastion.address, bastion.identities_only) == ("jump@bastion.example.net:22", True)
    assert inner.address.startswith("carol@inner:2200") and inner.known_hosts_name == "[inner]:2200"

    laptop = inventory.resolve("laptop")  # no `ssh`: the name itself; a repo's venv runs rbees-pool
    assert laptop.endpoint.hostname == "laptop" and laptop.rbees_pool == "~/src/rbees/.venv/bin/rbees-pool"
    custom = inventory.resolve("custom")
    assert custom.endpoint.address == "bob@10.0.0.7:2022" and custom.rbees_pool == "~/venvs/rbees/bin/rbees-pool"
    assert inventory.names() == ["gpu1", "laptop", "custom"]
    assert inventory.aliases() == ["bastion", "loop", "loop2", "viaproxy", "ws"]


def test_aliases_and_addresses_resolve_without_the_hosts_file(inventory: Inventory) -> None:
    alias = inventory.resolve("ws")
    assert alias.source == "ssh-config" and alias.rbees_pool == "rbees-pool" and alias.home is None
    overridden = inventory.resolve("root@ws:23")  # what the operator types wins over the config
    assert (overridden.source, overridden.endpoint.address) == ("address", "root@workstation.example.net:23")
    assert inventory.resolve("10.1.2.3").endpoint.port == 22


def test_unsupported_ssh_settings_are_refused(inventory: Inventory) -> None:
    with pytest.raises(InvalidArgument, match="ProxyCommand is not supported"):
        inventory.resolve("viaproxy")
    with pytest.raises(InvalidArgument, match="a loop"):
        inventory.resolve("loop")


def test_hosts_list_shows_every_name_and_why_one_cannot_be_used(inventory: Inventory, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "RBEES_HOSTS_FILE": str(inventory.hosts_path),
        "RBEES_SSH_CONFIG": str(inventory.ssh_config_path),
    }
    done = subprocess.run([str(RBEES), "hosts", "list", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    hosts = {h["name"]: h for h in doc["hosts"]}
    assert doc["hosts_file"] == str(inventory.hosts_path) and list(hosts)[:3] == ["gpu1", "laptop", "custom"]
    assert hosts["gpu1"]["address"] == "alice@workstation.example.net:2222" and len(hosts["gpu1"]["jump"]) == 2
    assert hosts["viaproxy"]["address"] is None and "ProxyCommand" in hosts["viaproxy"]["error"]
    people = subprocess.run([str(RBEES), "hosts", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert people.returncode == 0 and "gpu1" in people.stdout


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[hosts.a\n", "Expected ']'"),
        ("[hosts.a]\nport = 22\n", "may only set"),
        ('[hosts.a]\nssh = ""\n', "non-empty strings"),
        ("[hosts.a]\nssh = 1\n", "non-empty strings"),
        ('[hosts."a b"]\nssh = "x"\n', "host name 'a b'"),
        ('[other]\nx = "y"\n', "only [hosts.NAME]"),
    ],
)
def test_hosts_file_mistakes_name_the_file(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text(text)
    with pytest.raises(InvalidHostsFile, match=re.escape(complaint)) as caught:
        Inventory(path, tmp_path / "no-ssh-config")
    assert str(path) in str(caught.value)


def _shell(script: str, home: Path) -> str:
    """What a real POSIX shell makes of `script` (each printed word on its own line)."""
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env={"HOME": str(home)}, check=True)
    return done.stdout


def test_words_reach_the_shell_literally_and_paths_expand_home(tmp_path: Path) -> None:
    nasty = "a;b $(echo x) `echo y` 'q' \"dq\" \\ $HOME ~ *\nline2"
    assert _shell(f"printf '%s|' {word(nasty)} {word('')}", tmp_path) == nasty + "||"
    assert _shell(f"printf '%s|' {path_word('~/pools/a b')} {path_word('~')} {path_word('/x/~y')}", tmp_path) == (
        f"{tmp_path}/pools/a b|{tmp_path}|/x/~y|"
    )
    assert _shell(f"printf '%s|' {program_words('~/v/bin/rbees-pool --flag')}", tmp_path) == (
        f"{tmp_path}/v/bin/rbees-pool|--flag|"
    )
    with pytest.raises(InvalidArgument):
        program_words("'unbalanced")


def test_exit_codes_follow_rbees_pools_and_are_documented() -> None:
    pool_codes = {int(code) for code in PoolExitCode}
    shared = [code for code in ExitCode if int(code) in pool_codes]  # 0, 1, 2 and 130 mean the same in both
    assert {code.name for code in shared} == {"OK", "FAILURE", "USAGE", "INTERRUPTED"}
    assert all(PoolExitCode(int(code)).name == code.name for code in shared)
    ours = [code for code in ExitCode if int(code) not in pool_codes]
    block = sorted(int(code) for code in ours)
    assert block == list(range(block[0], block[-1] + 1))  # one block, 12-19
    assert block[0] - 1 in pool_codes  # right after rbees-pool's first codes (0-11)...
    assert not any(block[0] <= code <= block[-1] for code in pool_codes)  # ...whose later ones (20...) skip it
    guide = (REPO / "docs" / "fleet.md").read_text()
    for code in [*ours, ExitCode.INTERRUPTED]:
        assert re.search(rf"^\| {int(code)} \| `{code.name}` \|", guide, re.MULTILINE), code.name

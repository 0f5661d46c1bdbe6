"""GGUF validation: a valid tiny file loads; every kind of corrupt copy fails with a clear ModelLoadError."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from ggufgen import write_tiny_model

from rbees_workerd.engine.config import ModelConfig
from rbees_workerd.engine.gguf import GGUFFile, load_gguf
from rbees_workerd.errors import ModelLoadError

SMOLLM = Path(os.environ.get("RBEES_TEST_MODEL", "/work/main/models-cache/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf", qtype=GGMLQuantizationType.Q8_0)


@pytest.fixture
def copy(valid: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.gguf"
    shutil.copyfile(valid, dst)
    return dst


def _load_all(path: Path) -> tuple[GGUFFile, ModelConfig]:
    """What the engine does: structural load, then config, then tensor shapes."""
    f = load_gguf(path)
    cfg = ModelConfig.from_gguf(f)
    cfg.check_tensors(f)
    return f, cfg


def _fails(path: Path, *fragments: str) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        _load_all(path)
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    assert info.value.code == "MODEL_LOAD_FAILED"
    return info.value


def _patch(path: Path, pos: int, data: bytes) -> None:
    with path.open("r+b") as fh:
        fh.seek(pos)
        fh.write(data)


def _tensor_info_pos(path: Path, name: str) -> tuple[int, int]:
    """File positions of a tensor's type id (u32) and data offset (u64) in its info record."""
    r = GGUFReader(path)
    t = next(t for t in r.tensors if t.name == name)
    type_pos = t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape)
    return type_pos, type_pos + 4


def _value_pos(path: Path, key: str) -> int:
    """File position of a scalar metadata value (a string value's length prefix included)."""
    f = GGUFReader(path).fields[key]
    return f.offset + 8 + len(key.encode()) + 4


def test_valid_file_loads_with_zero_copy_views(valid: Path) -> None:
    f, cfg = _load_all(valid)
    assert (cfg.architecture, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads) == ("llama", 2, 64, 4, 2)
    q = f.tensors["blk.0.attn_q.weight"]
    assert q.qtype == GGMLQuantizationType.Q8_0
    assert q.shape == (64, 64) and q.raw.shape == (64, 68) and q.raw.dtype == np.uint8
    assert np.shares_memory(q.raw, f._reader.data)  # a view into the map, not a copy
    norm = f.tensors["output_norm.weight"]
    assert norm.as_float32().shape == (64,)
    f.close()
    assert f.tensors == {}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", sorted(GGMLQuantizationType[n] for n in ("F32", "F16", "Q4_0", "Q4_K", "Q6_K")))
def test_generated_models_load(tmp_path: Path, arch: str, qtype: GGMLQuantizationType) -> None:
    dim = 256 if qtype.name.endswith("_K") else 64
    f, cfg = _load_all(write_tiny_model(tmp_path / "m.gguf", arch=arch, qtype=qtype, dim=dim, ffn_dim=2 * dim))
    assert cfg.qkv_bias == (arch == "qwen2")
    assert f.tensors["blk.1.ffn_down.weight"].qtype == qtype
    assert f.tensors["blk.1.ffn_down.weight"].shape == (dim, 2 * dim)


def test_untied_output(tmp_path: Path) -> None:
    _, cfg = _load_all(write_tiny_model(tmp_path / "m.gguf", tied_embeddings=False))
    assert not cfg.tied_embeddings


def test_real_smollm_loads() -> None:
    if not SMOLLM.exists():
        pytest.skip(f"{SMOLLM} is not downloaded")
    f, cfg = _load_all(SMOLLM)
    assert len(f.tensors) == 272
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    embd = f.tensors["token_embd.weight"]
    assert embd.qtype == GGMLQuantizationType.Q8_0 and embd.shape == (49152, 576)
    assert f.tensors["blk.0.ffn_down.weight"].qtype == GGMLQuantizationType.Q4_1
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
    f.close()


def test_bad_magic(copy: Path) -> None:
    _patch(copy, 0, b"GGML")
    _fails(copy, "bad magic")


@pytest.mark.parametrize("version", [1, 4, 99])
def test_unsupported_version(copy: Path, version: int) -> None:
    _patch(copy, 4, struct.pack("<I", version))
    _fails(copy, f"unsupported GGUF version {version}")


def _cut_points(valid: Path) -> dict[str, int]:
    r = GGUFReader(valid)
    first = min(t.data_offset for t in r.tensors)
    return {
        "header": 13,
        "metadata": 200,
        "token-list": _value_pos(valid, "tokenizer.ggml.tokens") + 500,
        "tensor-info": r.tensors[-1].field.offset + 3,
        "data-start": first,
        "mid-tensor": first + 1000,
        "last-byte": valid.stat().st_size - 1,
    }


@pytest.mark.parametrize(
    "where", ["header", "metadata", "token-list", "tensor-info", "data-start", "mid-tensor", "last-byte"]
)
def test_truncated(valid: Path, copy: Path, where: str) -> None:
    with copy.open("r+b") as fh:
        fh.truncate(_cut_points(valid)[where])
    _fails(copy, "truncated")


def test_tensor_offset_beyond_end(copy: Path) -> None:
    _, off_pos = _tensor_info_pos(copy, "blk.1.ffn_up.weight")
    _patch(copy, off_pos, struct.pack("<Q", 1 << 40))
    _fails(copy, "blk.1.ffn_up.weight", "extends past the end")


def test_tensor_offset_misaligned(copy: Path) -> None:
    _, off_pos = _tensor_info_pos(copy, "blk.0.ffn_up.weight")
    (offset,) = struct.unpack_from("<Q", copy.read_bytes(), off_pos)
    _patch(copy, off_pos, struct.pack("<Q", offset + 4))
    _fails(copy, "blk.0.ffn_up.weight", "not aligned")


def test_overlapping_tensors(copy: Path) -> None:
    data = copy.read_bytes()
    _, src = _tensor_info_pos(copy, "blk.0.attn_k.weight")
    _, dst = _tensor_info_pos(copy, "blk.0.attn_v.weight")
    _patch(copy, dst, data[src : src + 8])
    _fails(copy, "overlap")


def test_unsupported_quant_type(copy: Path) -> None:
    type_pos, _ = _tensor_info_pos(copy, "blk.0.attn_q.weight")
    _patch(copy, type_pos, struct.pack("<I", GGMLQuantizationType.Q2_K))
    _fails(copy, "blk.0.attn_q.weight", "unsupported quant type Q2_K")


def test_unknown_type_id(copy: Path) -> None:
    type_pos, _ = _tensor_info_pos(copy, "blk.0.attn_q.weight")
    _patch(copy, type_pos, struct.pack("<I", 200))
    _fails(copy, "blk.0.attn_q.weight", "unknown type id 200")


def test_unknown_architecture(copy: Path) -> None:
    _patch(copy, _value_pos(copy, "general.architecture") + 8, b"gpt-j")
    _fails(copy, "unknown architecture 'gpt-j'")


def test_missing_architecture(copy: Path) -> None:
    pos = GGUFReader(copy).fields["general.architecture"].offset + 8
    _patch(copy, pos, b"xxxxxxx.architecture")  # same length, another key
    _fails(copy, "general.architecture is missing")


def test_metadata_disagrees_with_shapes(copy: Path) -> None:
    _patch(copy, _value_pos(copy, "llama.feed_forward_length"), struct.pack("<I", 128))
    _fails(copy, "ffn_gate.weight has shape (96, 64)", "(128, 64)")


def test_metadata_names_more_layers_than_the_file_has(copy: Path) -> None:
    _patch(copy, _value_pos(copy, "llama.block_count"), struct.pack("<I", 3))
    _fails(copy, "tensor blk.2.attn_norm.weight is missing")


def test_too_many_dimensions(copy: Path) -> None:
    r = GGUFReader(copy)
    t = next(t for t in r.tensors if t.name == "output_norm.weight")
    _patch(copy, t.field.offset + 8 + len(t.name), struct.pack("<I", 9))
    _fails(copy)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.gguf").write_bytes(b"")
    _fails(tmp_path / "e.gguf", "empty")


def test_missing_path(tmp_path: Path) -> None:
    _fails(tmp_path / "nope.gguf", "no such file")


def test_directory(tmp_path: Path) -> None:
    _fails(tmp_path, "is a directory")


def test_random_header_damage_never_escapes_as_another_exception(valid: Path, tmp_path: Path) -> None:
    """Whatever single byte of the header and metadata is damaged, loading either succeeds or
    raises ModelLoadError (never the gguf package's own exceptions)."""
    original = valid.read_bytes()
    rng = np.random.default_rng(7)
    header_end = GGUFReader(valid).data_offset
    rejected = 0
    for i, (pos, value) in enumerate(zip(rng.integers(0, header_end, 150), rng.integers(0, 256, 150), strict=True)):
        data = bytearray(original)
        data[pos] = value
        path = tmp_path / f"c{i}.gguf"
        path.write_bytes(bytes(data))
        try:
            _load_all(path)[0].close()
        except ModelLoadError:
            rejected += 1
    assert rejected > 0


def _mapped(path: Path) -> bool:
    """Whether the file is memory-mapped in this process (Linux)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_close_unmaps_once_the_last_view_is_gone(valid: Path) -> None:
    f = load_gguf(valid)
    assert _mapped(valid)
    f.close()
    assert not _mapped(valid)
    f = load_gguf(valid)
    kept = f.tensors["output_norm.weight"]
    expected = kept.as_float32()
    f.close()
    assert _mapped(valid)  # the caller's view keeps the mapping alive, and readable
    np.testing.assert_array_equal(kept.as_float32(), expected)
    del kept
    assert not _mapped(valid)


@pytest.mark.parametrize("tokenizer", ["gpt2", "llama"])
def test_metadata_equals_the_gguf_packages_reading(tmp_path: Path, tokenizer: str) -> None:
    """The bulk array reading gives what GGUFReader itself gives (strings, ints, floats)."""
    path = write_tiny_model(tmp_path / "m.gguf", tokenizer=tokenizer)
    reference = {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    f = load_gguf(path)
    assert f.metadata == reference
    assert isinstance(f.metadata["tokenizer.ggml.tokens"], list) and len(f.metadata["tokenizer.ggml.tokens"]) > 300
    f.close()

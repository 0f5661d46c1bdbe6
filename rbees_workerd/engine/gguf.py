"""GGUF files: memory-mapped reading (with the `gguf` package) and validation before use.

`load_gguf` rejects everything structural (magic, version, truncation, tensor bounds and
alignment, tensor types) with a ModelLoadError; the engine then calls
`ModelConfig.from_gguf(f)` (architecture, hyperparameters) and `cfg.check_tensors(f)`
(tensor names and shapes against the metadata).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from rbees_workerd.errors import ModelLoadError

SUPPORTED_QTYPES = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q5_1,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q5_K,
        GGMLQuantizationType.Q6_K,
    }
)
SUPPORTED_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_HEADER = struct.Struct("<IIQQ")  # magic, version, tensor count, metadata key count


@dataclass(frozen=True)
class Tensor:
    """One tensor of the file. `shape` is NumPy order (rows first): a matrix is `(N, K)`.

    `raw` is the tensor's bytes as `uint8[rows, row_bytes]`, a view into the
    memory map (no copy); for 1-D tensors rows is 1.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray

    def as_float32(self) -> np.ndarray:
        """A float32 copy; only for small dense tensors (norms, biases)."""
        if self.qtype == GGMLQuantizationType.F32:
            return self.raw.reshape(-1).view(np.float32).reshape(self.shape).copy()
        if self.qtype == GGMLQuantizationType.F16:
            return self.raw.reshape(-1).view(np.float16).astype(np.float32).reshape(self.shape)
        from gguf.quants import dequantize

        return dequantize(self.raw, self.qtype).astype(np.float32).reshape(self.shape)


class _Truncated(Exception):
    """A read ran past the end of the file."""

    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


class _CheckedReader(GGUFReader):
    """GGUFReader that never reads past the end of the map (the base class silently returns
    short arrays there) and checks every tensor's info before it builds the tensor views."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise _Truncated(end)
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[np.ndarray], list[int], list[GGUFValueType]]:
        """Arrays in bulk: the base class builds two NumPy views per element, which takes
        seconds for a 50k-token vocabulary. Gives the same `contents()`."""
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        itype = GGUFValueType(int(raw_itype[0]))
        n, offs = int(count[0]), orig_offs + 12
        types = [GGUFValueType.ARRAY] + ([itype] if n else [])
        if itype == GGUFValueType.STRING:
            parts: list[np.ndarray] = [raw_itype, count]
            buf, size = self.data.view(np.ndarray), len(self.data)  # plain views: memmap's are slow
            for _ in range(n):
                if offs + 8 > size:
                    raise _Truncated(offs + 8)
                (length,) = struct.unpack_from("<Q", buf, offs)
                if offs + 8 + length > size:
                    raise _Truncated(offs + 8 + length)
                parts.append(buf[offs + 8 : offs + 8 + length])
                offs += 8 + length
            return offs - orig_offs, parts, list(range(2, 2 + n)), types
        scalar = self.gguf_scalar_to_np.get(itype)
        if scalar is None:  # arrays of arrays: rare and small
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, scalar, n)
        return 12 + int(values.nbytes), [raw_itype, count, values], [2], types

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        if self.byte_order != "I":
            raise ModelLoadError("big-endian GGUF files are not supported")
        spans = [_check_tensor_info(f, start_offs, int(self.alignment), len(self.data)) for f in fields]
        spans.sort()
        for (_, a_end, a_name), (b_start, _, b_name) in zip(spans, spans[1:], strict=False):
            if b_start < a_end:
                raise ModelLoadError(f"tensors {a_name} and {b_name} overlap (corrupt tensor offsets)")
        super()._build_tensors(start_offs, fields)


def _check_tensor_info(field: ReaderField, data_start: int, alignment: int, size: int) -> tuple[int, int, str]:
    """Validate one tensor-info record; returns its (start, end, name) byte span in the file."""
    _, name_data, n_dims, dims, raw_type, offset = field.parts
    name = bytes(name_data).decode("utf-8", errors="replace")
    if not 1 <= int(n_dims[0]) <= _MAX_DIMS:
        raise ModelLoadError(f"tensor {name} has {int(n_dims[0])} dimensions (1 to {_MAX_DIMS} allowed)")
    ne = [int(d) for d in dims]
    if min(ne) <= 0:
        raise ModelLoadError(f"tensor {name} has an empty dimension {ne}")
    try:
        qtype = GGMLQuantizationType(int(raw_type[0]))
    except ValueError:
        raise ModelLoadError(f"tensor {name} has unknown type id {int(raw_type[0])}") from None
    if qtype not in SUPPORTED_QTYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_QTYPES))
        raise ModelLoadError(f"tensor {name} has unsupported quant type {qtype.name} (supported: {names})")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if ne[0] % block:
        raise ModelLoadError(f"tensor {name}: row length {ne[0]} is not a multiple of {qtype.name} blocks")
    n_bytes = int(np.prod(ne, dtype=object)) // block * type_size
    rel = int(offset[0])
    if rel % alignment:
        raise ModelLoadError(f"tensor {name}: data offset {rel} is not aligned to {alignment} bytes")
    start = data_start + rel
    if start + n_bytes > size:
        raise ModelLoadError(
            f"tensor {name}: data [{start}, {start + n_bytes}) extends past the end of the file "
            f"({size} bytes): the file is truncated or the tensor offset is corrupt"
        )
    return start, start + n_bytes, name


def _check_header(path: Path) -> None:
    """Magic and version first, so that the commonest wrong files get a precise message."""
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory, not a GGUF file")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(_HEADER.size)
    except FileNotFoundError:
        raise ModelLoadError(f"no such file: {path}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from e
    if size == 0:
        raise ModelLoadError(f"{path.name}: the file is empty")
    if len(head) < 4 or struct.unpack_from("<I", head)[0] != GGUF_MAGIC:
        raise ModelLoadError(f"{path.name}: bad magic {head[:4]!r}, not a GGUF file")
    if len(head) < _HEADER.size:
        raise ModelLoadError(f"{path.name}: the file is truncated inside its {_HEADER.size}-byte header")
    version = struct.unpack_from("<I", head, 4)[0]
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(f"{path.name}: unsupported GGUF version {version} (supported: 2, 3)")


class GGUFFile:
    """A validated, memory-mapped GGUF model file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _check_header(self.path)
        try:
            reader = _CheckedReader(self.path, "r")
            metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        except ModelLoadError:
            raise
        except _Truncated as e:
            raise ModelLoadError(
                f"{self.path.name}: the file is truncated: its header and metadata need at least "
                f"{e.end} bytes, the file has {self.file_size}"
            ) from None
        except Exception as e:  # the gguf package raises ValueError, KeyError, UnicodeDecodeError...
            raise ModelLoadError(f"{self.path.name}: corrupt GGUF header or metadata ({e})") from e
        self._reader: GGUFReader | None = reader
        self.metadata: dict[str, Any] = metadata
        if not isinstance(metadata.get("general.architecture"), str):
            raise ModelLoadError(f"{self.path.name}: metadata key general.architecture is missing")
        self.tensors: dict[str, Tensor] = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            raw = t.data.view(np.uint8).reshape(rows, -1)
            self.tensors[t.name] = Tensor(t.name, GGMLQuantizationType(t.tensor_type), shape, raw)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def release_pages(self) -> None:
        """Let the kernel drop the map's resident pages (the map stays valid: a later read faults
        them back in). Loading calls this as it goes, so the file's pages and the backend's
        prepared copy of the weights are not both resident at the peak."""
        mm = getattr(self._reader.data, "_mmap", None) if self._reader is not None else None
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Drop this object's references to the memory map, so that it is unmapped (its pages
        leave our RSS) as soon as the last `Tensor.raw` view the caller kept is gone. It is never
        unmapped by force: a live view would then crash the process on its next read."""
        self.tensors.clear()
        self._reader = None


def load_gguf(path: str | Path) -> GGUFFile:
    """Open and validate a GGUF file; raises ModelLoadError with the reason."""
    return GGUFFile(path)

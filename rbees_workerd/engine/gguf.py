"""GGUF files: memory-mapped reading (with the `gguf` package) and validation before use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

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


class GGUFFile:
    """A validated, memory-mapped GGUF model file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            reader = GGUFReader(self.path, "r")
        except FileNotFoundError as e:
            raise ModelLoadError(f"no such file: {self.path}") from e
        except Exception as e:  # the gguf package raises ValueError, struct errors, ...
            raise ModelLoadError(f"{self.path.name}: not a readable GGUF file ({e})") from e
        self._reader = reader
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self.metadata[key] = field.contents()
        self.tensors: dict[str, Tensor] = {}
        for t in reader.tensors:
            qtype = GGMLQuantizationType(t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            raw = t.data.view(np.uint8)
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            self.tensors[t.name] = Tensor(t.name, qtype, shape, raw.reshape(rows, -1))

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        """Drop the memory map so its pages leave the process once the weights are prepared."""
        self.tensors.clear()
        mm = getattr(self._reader, "data", None)
        self._reader = None  # type: ignore[assignment]
        if mm is not None and hasattr(mm, "_mmap") and mm._mmap is not None:
            try:
                mm._mmap.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes with it


def load_gguf(path: str | Path) -> GGUFFile:
    """Open and validate a GGUF file; raises ModelLoadError with the reason."""
    return GGUFFile(path)

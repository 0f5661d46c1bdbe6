"""What a model file is, from its GGUF header alone: checked at register and download time, so a file the
engine cannot run (not GGUF, an architecture it lacks) is refused at once instead of failing at spawn."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from rbees_pool.errors import ArchitectureMismatch, NotGguf, UnsupportedArchitecture

_ARCH_KEY = "general.architecture"
_MAX_STRING = 1 << 20  # a longer key or string value means a garbage header, not a model
_MAX_ARRAY = 1 << 31
_MAX_KEYS_READ = 4096  # general.architecture comes first in files llama.cpp and gguf-py write


def supported_architectures() -> tuple[str, ...]:
    """The architectures rbees-workerd's engine runs (its one list, in rbees_workerd/engine/config.py)."""
    from rbees_workerd.engine.config import ARCHITECTURES  # numpy & gguf: imported only when a file is checked

    return tuple(ARCHITECTURES)


def require_supported(architecture: str) -> None:
    """Refuse an architecture the engine does not run."""
    supported = supported_architectures()
    if architecture not in supported:
        raise UnsupportedArchitecture(
            f"architecture {architecture!r} is not one rbees-workerd runs (supported: {', '.join(supported)})"
        )


def gguf_architecture(path: Path) -> str:
    """`general.architecture` from a GGUF file's header (only the header is read); NotGguf otherwise."""
    from gguf import GGUF_MAGIC

    from rbees_workerd.engine.gguf import SUPPORTED_VERSIONS

    with path.open("rb") as reader:
        magic, version, _tensors, n_keys = _unpack(reader, "<IIQQ")
        if magic != GGUF_MAGIC:
            raise NotGguf(f"{path.name} is not a GGUF model file (it does not start with 'GGUF')")
        if version not in SUPPORTED_VERSIONS:
            raise NotGguf(f"{path.name}: GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        for _ in range(min(n_keys, _MAX_KEYS_READ)):
            key = _string(reader)
            (value_type,) = _unpack(reader, "<I")
            if key == _ARCH_KEY:
                if value_type != _STRING:
                    raise NotGguf(f"{path.name}: {_ARCH_KEY} is not a string")
                return _string(reader)
            _skip_value(reader, value_type)
    raise NotGguf(f"{path.name}: the GGUF header has no {_ARCH_KEY}")


def check_model_file(path: Path, expected: str | None) -> str:
    """The file's architecture, once it is known to be GGUF, one the engine runs, and `expected` (if given)."""
    found = gguf_architecture(path)
    if expected is not None and expected != found:
        raise ArchitectureMismatch(f"{path.name} is a {found!r} model, not {expected!r}")
    require_supported(found)
    return found


# GGUF value types (gguf.GGUFValueType): fixed-size scalars, STRING = 8, ARRAY = 9.
_STRING, _ARRAY = 8, 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _unpack(reader: BinaryIO, fmt: str) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    data = reader.read(size)
    if len(data) != size:
        raise _bad(reader, "the GGUF header is truncated")
    return struct.unpack(fmt, data)


def _string(reader: BinaryIO) -> str:
    (length,) = _unpack(reader, "<Q")
    if length > _MAX_STRING:
        raise _bad(reader, f"implausible GGUF header (a {length}-byte string)")
    data = reader.read(length)
    if len(data) != length:
        raise _bad(reader, "the GGUF header is truncated")
    return data.decode("utf-8", errors="replace")


def _skip_value(reader: BinaryIO, value_type: int) -> None:
    if value_type == _STRING:
        _string(reader)
    elif value_type == _ARRAY:
        item_type, count = _unpack(reader, "<IQ")
        if count > _MAX_ARRAY:
            raise _bad(reader, f"implausible GGUF header (a {count}-item array)")
        if item_type in _SCALAR_SIZES:
            reader.seek(_SCALAR_SIZES[item_type] * count, 1)
        else:
            for _ in range(count):
                _skip_value(reader, item_type)
    elif value_type in _SCALAR_SIZES:
        reader.seek(_SCALAR_SIZES[value_type], 1)
    else:
        raise _bad(reader, f"unknown GGUF value type {value_type}")


def _bad(reader: BinaryIO, why: str) -> NotGguf:
    return NotGguf(f"{Path(getattr(reader, 'name', '?')).name}: {why}")

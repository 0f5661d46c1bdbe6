"""llama.cpp file types (`llama-quantize`'s names, what a catalog entry's `quant` says) and the tensor types a
file of each type holds.

A file is not of one type throughout (llama.cpp's llama-quant.cpp): norms and biases stay F32; the output and
embedding matrices get Q6_K (Q8_0 for a type of 32-element blocks); the K mixes raise some attn_v/ffn_down
matrices to Q5_K/Q6_K; a matrix whose rows are not a multiple of 256 falls back to a 32-element block type
(Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and one not a multiple of 32 to F16.
"""

from __future__ import annotations

_FLOATS = frozenset({"F16", "F32"})
_BLOCK32 = _FLOATS | {"Q6_K", "Q8_0"}  # beside the file type: output/embeddings, their fallback
_K_MIX = _FLOATS | {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"}

TENSOR_TYPES: dict[str, frozenset[str]] = {
    "F32": frozenset({"F32"}),
    "F16": _FLOATS,
    "BF16": frozenset({"BF16", "F32"}),
    "Q8_0": _FLOATS | {"Q8_0"},
    "Q4_0": _BLOCK32 | {"Q4_0"},
    "Q4_1": _BLOCK32 | {"Q4_1"},
    "Q5_0": _BLOCK32 | {"Q5_0"},
    "Q5_1": _BLOCK32 | {"Q5_1"},
    "Q4_K_S": _K_MIX,
    "Q4_K_M": _K_MIX,
    "Q5_K_S": _FLOATS | {"Q5_K", "Q6_K", "Q5_1", "Q8_0"},
    "Q5_K_M": _FLOATS | {"Q5_K", "Q6_K", "Q5_1", "Q8_0"},
    "Q6_K": _FLOATS | {"Q6_K", "Q8_0"},
    # low-bit mixes: their Q2_K/Q3_K/IQ* matrices have no fast kernel here
    "Q2_K": _K_MIX | {"Q2_K", "Q3_K", "Q4_0"},
    "Q3_K_S": _K_MIX | {"Q3_K", "Q4_0"},
    "Q3_K_M": _K_MIX | {"Q3_K", "Q4_0"},
    "Q3_K_L": _K_MIX | {"Q3_K", "Q4_0"},
    "IQ4_XS": _K_MIX | {"IQ4_XS", "IQ4_NL"},
}


def tensor_types(quant: str) -> frozenset[str]:
    """The tensor types (ggml names) a file of type `quant` may hold; KeyError for a name not listed."""
    return TENSOR_TYPES[quant]

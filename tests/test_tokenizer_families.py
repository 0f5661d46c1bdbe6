"""Tokenizer families against llama.cpp: byte-level BPE vocabularies trained here with HF `tokenizers`
under each pre-tokenizer name (llama-bpe, qwen2, smollm, default) and SentencePiece-style ones (TinyLlama,
Mistral, Phi-3), written as vocab-only GGUF files; our ids must equal llama.cpp's on multilingual text,
code, numbers, emoji, whitespace runs and special tokens written in the text, and decode back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from gguf import GGUFWriter, TokenType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from rbees_workerd.engine.gguf import load_gguf
from rbees_workerd.engine.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp")

# Training text: several scripts, code, numbers, so merges form inside each of them.
TRAIN = """The quick brown fox jumps over the lazy dog. It's what we'll do, isn't it? I'd say they've gone.
Hello world! Hello there, how are you? The capital of France is Paris; the capital of Japan is Tokyo.
Café, naïve, résumé, über, São Paulo, façade, Ærøskøbing, Dvořák, Łódź, Ελληνικά γράμματα.
Привет, мир! Как дела? Москва — столица России. Съешь же ещё этих мягких французских булок.
مرحبا بالعالم. كيف حالك؟ اللغة العربية جميلة جدا. السلام عليكم ورحمة الله.
你好，世界！今天天气很好。我们一起去学习中文吧。日本語のテキストです。東京は日本の首都です。한국어 문장입니다.
def main(argv: list[str]) -> int:
    for i in range(10):
        if i % 2 == 0:
            print(f"even {i}", end="\\n")
    return 0
\tif (x != nullptr && y >= 0) { return x->value + y; }
    const total = items.reduce((a, b) => a + b, 0);  // sum
Numbers: 0 1 12 123 1234 12345 123456 3.14159 2.71828 1,000,000 2024-01-15 10:30:00 $99.99 50% 1e-5
"""
# The corpus we compare on: every script, code, digits, emoji, blank runs, special tokens in the text.
CORPUS = [
    "The capital of France is Paris.",
    "It's WE'LL they'Re I'M don'T you'd",
    "Café déjà vu, naïve façade; Ærøskøbing ŁÓDŹ Dvořák",
    "Привет, мир! Съешь же ещё этих булок.",
    "مرحبا بالعالم، كيف حالك؟ ١٢٣٤٥",
    "你好，世界！日本語のテキスト、東京。한국어 문장",
    "Ελληνικά: αβγ ΑΒΓ",
    "combining e\u0301 a\u0308 Ǆǅǆ ﬁ Ⅻ ½ ² ³",
    "def f(x):\n    if x:\n        return x  +  1\n\n\n\tpass\n",
    "if (a!=b&&c>=0){return a->b;} // §",
    "x = [1, 22, 333, 4444, 55555, 666666, 7777777]",
    "1234567890 0.5 -17 +3.14159 1,000,000 1e-10 ０１２３ ٣٤٥",
    "2024-01-15T10:30:00Z $99.99 50% #42 @user",
    "emoji 🙂👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷🇯🇵",
    "   lots   of  spaces  ",
    "\t\ttabs\t and \t\t\tmore",
    "\n\n\nnewlines\n \n  \n",
    "a\r\nb\r\n\r\n",
    " leading",
    "trailing ",
    " ",
    "  ",
    "",
    "\u00a0nbsp\u2003em\u3000ideo",
    "ctrl \x00\x01\x1b[0m \x7f",
    "‘quotes’ “dq” — dash… «guillemets»",
    "__init__ self._x = {'k': \"v\"}",
    "\u2581already▁metaspace",
    "llama tokenizer, Hola llamas 日本語 tokenizers",
]


@dataclass(frozen=True)
class Family:
    """One vocabulary kind as a converter writes it to GGUF."""

    pre: str | None  # tokenizer.ggml.pre (None: a SentencePiece "llama" vocabulary)
    control: tuple[str, ...]  # control tokens (<|im_start|>...): written in the text only with special=True
    bos: str | None
    eos: str
    add_bos: bool | None  # None: the key is left out, the library default applies
    user_defined: tuple[str, ...] = ()
    specials_first: bool = False  # SmolLM puts its special tokens at ids 0..; Llama 3, Qwen after the merges
    name: str = "tiny"
    n_merges: int = 400
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def specials(self) -> list[str]:
        return [*self.control, *self.user_defined]


CHATML = ("<|im_start|>", "<|im_end|>")
FAMILIES = {
    # Llama 3.x: digits in groups of three, merges ignored for a whole word in the vocabulary, BOS added
    "llama-bpe": Family(
        "llama-bpe",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        add_bos=True,
    ),
    # Qwen2/2.5/3: single digits; tool-call markers are user-defined (parsed even with special=False)
    "qwen2": Family(
        "qwen2",
        ("<|endoftext|>", *CHATML),
        bos="<|endoftext|>",
        eos="<|im_end|>",
        add_bos=False,
        user_defined=("<tool_call>", "</tool_call>"),
    ),
    # SmolLM/SmolLM2: starcoder's split (single digits), specials first
    "smollm": Family(
        "smollm", ("<|endoftext|>", *CHATML), bos="<|im_start|>", eos="<|im_end|>", add_bos=False, specials_first=True
    ),
    # the library's fallback split (a GPT-2 vocabulary converted without a known pre-tokenizer)
    "default": Family("default", ("<|endoftext|>", *CHATML), bos="<|endoftext|>", eos="<|endoftext|>", add_bos=None),
    # TinyLlama / Mistral: SentencePiece BPE, byte fallback, a space prefix, BOS by default
    "spm": Family(None, ("<unk>", "<s>", "</s>", *CHATML), bos="<s>", eos="</s>", add_bos=None, specials_first=True),
    # Phi-3: SentencePiece, chat markers; llama.cpp strips the blanks after its special tokens
    "spm-phi3": Family(
        None,
        ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"),
        bos="<s>",
        eos="<|endoftext|>",
        add_bos=False,
        specials_first=True,
        name="Phi-3-mini-4k-instruct",
        extra={"add_space_prefix": False},
    ),
}
# the split each family's tokenizer.json trains and runs with (HF's own spelling, not ours)
_LLAMA3_HF = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TRAIN_SPLIT = {
    "llama-bpe": [pre_tokenizers.Split(Regex(_LLAMA3_HF), behavior="isolated")],
    "qwen2": [pre_tokenizers.Split(Regex(_LLAMA3_HF.replace(r"\p{N}{1,3}", r"\p{N}")), behavior="isolated")],
    "smollm": [pre_tokenizers.Digits(individual_digits=True)],
    "default": [],
}


# whole words in the vocabulary that no merge makes (Llama 3's has such): llama-bpe takes a pre-token that
# is one of them as is (ignore_merges), the others merge it as usual
_UNMERGED = [
    piece
    for word in (" tokenizer", "llama", " Hola", " 日本語")
    for piece, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(word)
]


def _train_merges(steps: list[pre_tokenizers.PreTokenizer], n_merges: int) -> list[str]:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *steps,
            pre_tokenizers.ByteLevel(
                add_prefix_space=False, use_regex=not steps or isinstance(steps[0], pre_tokenizers.Digits)
            ),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=256 + n_merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(TRAIN.splitlines(keepends=True) * 3, trainer)
    return [m if isinstance(m, str) else " ".join(m) for m in json.loads(hf.to_str())["model"]["merges"]]


def _byte_level(fam: Family) -> tuple[list[str], list[int], list[str]]:
    """Train a byte-level BPE: tokens, their types, merges. The merges of the family's own split come
    first; then those of GPT-2's split (digit runs, words with their space), which make tokens that
    cross the family's split: a wrong split shows as ids that differ from llama.cpp's."""
    own = _train_merges(_TRAIN_SPLIT[fam.pre or ""], fam.n_merges)
    merges = list(dict.fromkeys([*own, *_train_merges([], fam.n_merges // 2)]))
    b2u = pre_tokenizers.ByteLevel.alphabet()
    vocab = list(dict.fromkeys([*sorted(b2u), *(m.replace(" ", "") for m in merges), *_UNMERGED]))
    specials = fam.specials
    tokens = [*specials, *vocab] if fam.specials_first else [*vocab, *specials]
    kind = {t: int(TokenType.CONTROL) for t in fam.control} | {t: int(TokenType.USER_DEFINED) for t in fam.user_defined}
    return tokens, [kind.get(t, int(TokenType.NORMAL)) for t in tokens], merges


def _sentencepiece(fam: Family) -> tuple[list[str], list[int], list[float]]:
    """Train a SentencePiece-style BPE: specials, <0x00>..<0xFF>, merged pieces scored by merge
    order, then the single characters; returns tokens, types, scores."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=fam.n_merges + 200, show_progress=False)
    hf.train_from_iterator(TRAIN.splitlines(keepends=True) * 3, trainer)
    model = json.loads(hf.to_str())["model"]
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    pieces = list(dict.fromkeys(a + b for a, b in merges))
    chars = [t for t in sorted(model["vocab"], key=model["vocab"].get) if len(t) == 1 and t not in pieces]
    tokens = [*fam.control, *(f"<0x{b:02X}>" for b in range(256)), *pieces, *chars]
    types = [int(TokenType.CONTROL)] * len(fam.control)
    types[0] = int(TokenType.UNKNOWN)
    types += [int(TokenType.BYTE)] * 256 + [int(TokenType.NORMAL)] * (len(pieces) + len(chars))
    scores = [0.0] * (len(fam.control) + 256) + [-float(i) for i in range(len(pieces) + len(chars))]
    return tokens, types, scores


def write_vocab(path: Path, fam: Family) -> Path:
    """A vocab-only GGUF of `fam` (no tensors: llama.cpp loads it with vocab_only)."""
    w = GGUFWriter(path, "llama")
    w.add_name(fam.name)
    if fam.pre is None:
        tokens, types, scores = _sentencepiece(fam)
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
    else:
        tokens, types, merges = _byte_level(fam)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(fam.pre)
        w.add_token_merges(merges)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if fam.bos is not None:
        w.add_bos_token_id(tokens.index(fam.bos))
    w.add_eos_token_id(tokens.index(fam.eos))
    if fam.add_bos is not None:
        w.add_add_bos_token(fam.add_bos)
    if "add_space_prefix" in fam.extra:
        w.add_add_space_prefix(bool(fam.extra["add_space_prefix"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


@dataclass
class Pair:
    """Our tokenizer and llama.cpp's for one family's file."""

    family: Family
    ours: Tokenizer
    ref: object

    def specials_in_text(self) -> list[str]:
        f = self.family
        s = f.specials
        return [
            f"{s[1]}user\nhello{s[-1]}\n{s[1]}assistant\n",
            f"x{s[-1]}y {s[1]} z\t{s[2 % len(s)]}\n\n",
            f"{s[0]}{s[0]}  {s[-1]}  Привет{s[1]}日本",
            f"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n{CORPUS[5]}<|im_end|>",
            "<s>hello</s> world <unk>",
            "<|not_a_token|> <|im_start",
        ]


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    fam = FAMILIES[request.param]
    path = write_vocab(tmp_path_factory.mktemp("fam") / f"{request.param}.gguf", fam)
    f = load_gguf(path)
    ours = Tokenizer.from_gguf(f.metadata)
    f.close()
    ref = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    yield Pair(fam, ours, ref)
    ref.close()


def _llama_cpp_ids(p: Pair, text: str, add: bool) -> list[int]:
    return p.ref.tokenize(text.encode(), add_bos=add, special=True)  # type: ignore[attr-defined]


def _check(p: Pair, texts: list[str]) -> None:
    for text in texts:
        for add in (True, False):
            assert p.ours.encode(text, add_special=add) == _llama_cpp_ids(p, text, add), (text, add)


def test_vocabulary_is_real(pair: Pair) -> None:
    """The trained vocabulary merges inside every script (it is not bytes alone)."""
    for text in ("the capital", "Привет", "مرحبا", "你好", "print("):
        assert len(pair.ours.encode(text, add_special=False)) < len(text.encode()), text


@pytest.mark.parametrize("text", CORPUS)
def test_same_ids_as_llama_cpp(pair: Pair, text: str) -> None:
    _check(pair, [text])


def test_special_tokens_in_text(pair: Pair) -> None:
    _check(pair, pair.specials_in_text())


def test_digits_split_as_named(pair: Pair) -> None:
    """llama-bpe groups digits by three, qwen2 and smollm split each digit; the others merge them freely."""
    ids = pair.ours.encode("1234567", add_special=False)
    pieces = [pair.ours.decode([i]) for i in ids]
    if pair.family.pre == "llama-bpe":
        assert pieces[0] == "123" and "".join(pieces) == "1234567"
    elif pair.family.pre in ("qwen2", "smollm"):
        assert pieces == list("1234567")
    _check(pair, ["1234567"])


def test_bos_as_llama_cpp_adds_it(pair: Pair) -> None:
    with_bos = pair.ours.encode("hi")
    assert with_bos == _llama_cpp_ids(pair, "hi", True)
    expected = pair.family.add_bos if pair.family.add_bos is not None else pair.family.pre is None
    assert (with_bos[:1] == [pair.ours.bos_id]) == expected


@pytest.mark.parametrize("text", CORPUS)
def test_decode_round_trips(pair: Pair, text: str) -> None:
    ids = pair.ours.encode(text, add_special=False)
    expected = text.replace("\u2581", " ") if pair.family.pre is None else text  # SentencePiece's space
    assert pair.ours.decode(ids) == expected
    dec = pair.ours.stream_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == pair.ours.decode(ids)


def test_control_tokens_decode_to_nothing(pair: Pair) -> None:
    f = pair.family
    ids = pair.ours.encode(f"a{f.control[-1]}b", add_special=False)
    # a SentencePiece vocabulary with a space prefix writes "▁b" after a special token, as llama.cpp does
    assert pair.ours.decode(ids) == ("a b" if f.pre is None and f.extra.get("add_space_prefix", True) else "ab")
    if f.pre is not None:  # (llama-cpp-python's detokenize keeps SentencePiece's leading space)
        assert pair.ours.decode(ids) == pair.ref.detokenize(ids).decode()  # type: ignore[attr-defined]
    for marker in f.user_defined:  # user-defined tokens keep their text
        assert pair.ours.decode(pair.ours.encode(marker, add_special=False)) == marker


PIECES = st.sampled_from(
    [
        *" \n\t\r\u00a0'sStTlLdD0123456789.,!?-_(){}é日本語Ж́ع🙂👍🏽\u2581",
        "  ",
        "   ",
        "\n\n",
        "<|im_start|>",
        "<|im_end|>",
        "<s>",
        "</s>",
        "<|end|>",
        "<tool_call>",
        "<|eot_id|>",
        "1234",
        "the",
        "Привет",
        "你好",
        "مرحبا",
    ]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.lists(PIECES).map("".join), st.sampled_from(CORPUS), st.text(max_size=40)))
def test_same_ids_as_llama_cpp_on_mixed_text(pair: Pair, text: str) -> None:
    _check(pair, [text])

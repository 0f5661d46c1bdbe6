"""Tokenizer built from GGUF metadata on HF `tokenizers`, made to tokenize as llama.cpp does.

Two vocabulary kinds (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE from tokens + merges, split first by the regexes llama.cpp uses
  for the `tokenizer.ggml.pre` name (llama-vocab.cpp).
- "llama": SentencePiece-style BPE: merges ranked by the merged piece's score, `<0xNN>`
  byte fallback, spaces written as U+2581 and, with add_space_prefix, one space prepended
  to each run of text (at the start and after every special token, as llama.cpp does).

Control, unknown and user-defined tokens written in the text map to their ids (for a model
named Phi-3, llama.cpp, and so we, drop the blanks that follow most of them). Decoding
maps each id to its bytes: control tokens contribute no text (llama.cpp's detokenize with
special=false); user-defined tokens their text verbatim; byte tokens their byte. The result
is the exact inverse of `encode` (no space clean-up), and `StreamDecoder` yields the same text
piece by piece without ever splitting a UTF-8 character.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from enum import IntEnum
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from rbees_workerd.engine.gguf import load_gguf
from rbees_workerd.errors import InvalidParams, ModelLoadError

_SPM_SPACE = "\u2581"
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# llama-vocab.cpp: pre-tokenizer name -> the regexes it splits with, in order
_PRE_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt2": (_GPT2_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
}
_PRE_ALIASES = {
    "gpt-2": "gpt2",
    "phi-2": "gpt2",
    "olmo": "gpt2",
    "mpt": "gpt2",
    "jais": "gpt2",
    "llama-bpe": "llama3",
    "llama-v3": "llama3",
    "smaug-bpe": "llama3",
    "dbrx": "llama3",
    "deepseek-r1-qwen": "qwen2",
    "stablelm2": "qwen2",
    "smollm": "starcoder",
    "refact": "starcoder",
    "command-r": "starcoder",
    "codeshell": "starcoder",
}
_IGNORE_MERGES = frozenset({"llama3"})  # llama.cpp takes a whole pre-token that is in the vocab as is
# end-of-generation token texts llama.cpp also stops on when they are control tokens
_EOG_TEXTS = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<|eom_id|>", "<end_of_turn>", "<EOT>", "<|end_of_text|>"}
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


class TokenType(IntEnum):
    """tokenizer.ggml.token_type values."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, as byte-level BPE vocabularies spell bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class StreamDecoder:
    """Turns token ids, one at a time, into newly completed text; holds back a partial UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, strip_space: bool) -> None:
        self._pieces = tokenizer._pieces
        self._strip_space = strip_space
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        piece = self._pieces[token_id]
        if self._strip_space and piece:
            self._strip_space = False
            piece = piece.removeprefix(b" ")
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """What is left at the end (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)

    @property
    def pending(self) -> bool:
        """Whether it holds the first bytes of a character that later tokens complete."""
        return bool(self._utf8.getstate()[0])


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template."""

    def __init__(
        self,
        hf: HFTokenizer,
        pieces: list[bytes],
        *,
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: frozenset[int],
        add_bos: bool,
        add_eos: bool,
        strip_space_prefix: bool,
        chat_template: str,
        rstrip: re.Pattern[str] | None = None,
    ) -> None:
        self._hf = hf
        self._pieces = pieces
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = eos_ids
        self.vocab_size = len(pieces)
        self._add_bos = add_bos and bos_id is not None
        self._add_eos = add_eos and eos_id is not None
        self._strip_space_prefix = strip_space_prefix
        self._rstrip = rstrip
        try:
            self._template = _jinja_env().from_string(chat_template)
        except jinja2.TemplateError as e:
            raise ModelLoadError(f"the model's chat template does not compile: {e}") from e

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> Tokenizer:
        """Build from GGUFFile.metadata; raises ModelLoadError for a vocabulary it cannot use."""
        return _build(metadata)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Build from a GGUF file's metadata alone (the worker's, beside its engine process: the weights stay
        unread in the map); raises ModelLoadError."""
        f = load_gguf(path)
        try:
            return cls.from_gguf(f.metadata)
        finally:
            f.close()

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of a token as the model file spells it."""
        return self._hf.id_to_token(token_id) or ""

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in it map to their ids. With
        `add_special`, BOS/EOS are added as the file's add_bos_token/add_eos_token say."""
        if self._rstrip is not None:
            text = self._rstrip.sub(r"\1", text)
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_special and self._add_bos:
            ids.insert(0, self.bos_id)  # type: ignore[arg-type]
        if add_special and self._add_eos:
            ids.append(self.eos_id)  # type: ignore[arg-type]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (control tokens contribute nothing); invalid UTF-8 becomes U+FFFD."""
        out = self.stream_decoder()
        return "".join(out.push(i) for i in ids) + out.flush()

    def stream_decoder(self, continuation: bool = False) -> StreamDecoder:
        """A decoder for one sequence's tokens as they are generated. For a SentencePiece
        vocabulary it removes the space prefix of the first text, like `decode`, unless the
        tokens continue a text (generated after a prompt: "▁Paris" then reads " Paris")."""
        return StreamDecoder(self, strip_space=self._strip_space_prefix and not continuation)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's chat template (ChatML when the file has none)."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token="" if self.bos_id is None else self.token_text(self.bos_id),
                eos_token="" if self.eos_id is None else self.token_text(self.eos_id),
            )
        except jinja2.TemplateError as e:
            raise InvalidParams(f"chat template: {e}") from e


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@cache
def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The environment HF chat templates are written for (trim_blocks, lstrip_blocks, raise_exception)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env


def _build(md: dict[str, Any]) -> Tokenizer:
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama"):
        raise ModelLoadError(f"unsupported tokenizer model {kind!r} (supported: gpt2, llama)")
    if not isinstance(tokens, list) or not tokens:
        raise ModelLoadError("metadata key tokenizer.ggml.tokens is missing or empty")
    types = md.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelLoadError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    types = [int(t) for t in types]
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        if kind == "gpt2":
            hf = _byte_level_bpe(md, vocab)
            pieces = _byte_level_pieces(tokens, types)
        else:
            hf = _sentencepiece_bpe(md, vocab, types)
            pieces = _sentencepiece_pieces(tokens, types)
        hf.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types, strict=True)
                if ty in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED)
            ]
        )
    except Exception as e:  # tokenizers raises plain Exception for inconsistent vocab/merges
        raise ModelLoadError(f"cannot build the tokenizer from the model's vocabulary: {e}") from e

    def token_id(key: str) -> int | None:
        value = md.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if not 0 <= int(value) < len(tokens):
            raise ModelLoadError(f"tokenizer.ggml.{key} = {value} is outside the vocabulary")
        return int(value)

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    named = {token_id(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")} - {None}
    by_text = {
        i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == TokenType.CONTROL and t in _EOG_TEXTS
    }
    pre = _pre_name(md) if kind == "gpt2" else ""
    return Tokenizer(
        hf,
        pieces,
        bos_id=bos,
        eos_id=eos,
        eos_ids=frozenset(named | by_text),  # type: ignore[arg-type]
        add_bos=bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama" or pre == "llama3")),
        add_eos=bool(md.get("tokenizer.ggml.add_eos_token", False)),
        strip_space_prefix=kind == "llama" and _add_space_prefix(md),
        chat_template=str(md.get("tokenizer.chat_template") or CHATML_TEMPLATE),
        rstrip=_rstrip_pattern(md, tokens, types),
    )


def _rstrip_pattern(md: dict[str, Any], tokens: list[str], types: list[int]) -> re.Pattern[str] | None:
    """llama.cpp strips the blanks (C isspace) after the special tokens of a model whose general.name
    says Phi-3 (but not after <unk>, <s>, <|endoftext|>): the pattern of those tokens and their blanks."""
    name = str(md.get("general.name") or "").lower()
    if "phi-3" not in name and "phi3" not in name:
        return None
    special = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
    texts = {t for t, ty in zip(tokens, types, strict=True) if ty in special} - {"<unk>", "<s>", "<|endoftext|>"}
    if "</s>" in tokens:
        texts.add("</s>")
    if not texts:
        return None
    alternatives = "|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))
    return re.compile(f"({alternatives})[ \\t\\n\\v\\f\\r]+")


def _pre_name(md: dict[str, Any]) -> str:
    name = str(md.get("tokenizer.ggml.pre") or "default")
    name = _PRE_ALIASES.get(name, name)
    if name not in _PRE_REGEXES:
        known = ", ".join(sorted({*_PRE_REGEXES, *_PRE_ALIASES}))
        raise ModelLoadError(f"unsupported pre-tokenizer tokenizer.ggml.pre={name!r} (supported: {known})")
    return name


def _add_space_prefix(md: dict[str, Any]) -> bool:
    return bool(md.get("tokenizer.ggml.add_space_prefix", True))


def _byte_level_bpe(md: dict[str, Any], vocab: dict[str, int]) -> HFTokenizer:
    pre = _pre_name(md)
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges") or []]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES))
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_REGEXES[pre]]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    missing = [c for c in bytes_to_unicode().values() if c not in vocab]
    if missing:
        # A byte without a token is dropped; llama.cpp drops it after merging, so its neighbours
        # never merge across it: isolate it first (HF's BPE would drop it before merging).
        pattern = "[" + "".join(f"\\x{{{ord(c):04X}}}" for c in missing) + "]"
        steps.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    hf.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return hf


def _sentencepiece_bpe(md: dict[str, Any], vocab: dict[str, int], types: list[int]) -> HFTokenizer:
    scores = md.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(vocab):
        raise ModelLoadError("tokenizer.ggml.scores is missing or does not match tokenizer.ggml.tokens")
    unk = md.get("tokenizer.ggml.unknown_token_id")
    unk_token = next(iter(vocab)) if unk is None else list(vocab)[int(unk)]
    hf = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges_from_scores(vocab, scores, types),
            unk_token=unk_token,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    steps = [normalizers.Prepend(_SPM_SPACE)] if _add_space_prefix(md) else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPM_SPACE)])
    return hf


def _merges_from_scores(vocab: dict[str, int], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose concatenation is the highest-scored
    piece; as rank-ordered merges: every split of each normal piece into two pieces of the
    vocabulary, best score first."""
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, i in vocab.items():
        if types[i] != TokenType.NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _byte_level_pieces(tokens: list[str], types: list[int]) -> list[bytes]:
    u2b = {c: b for b, c in bytes_to_unicode().items()}

    def piece(text: str, kind: int) -> bytes:
        if kind == TokenType.USER_DEFINED:
            return text.encode()
        if kind != TokenType.NORMAL:
            return b""
        return b"".join(bytes([u2b[c]]) if c in u2b else c.encode() for c in text)

    return [piece(t, k) for t, k in zip(tokens, types, strict=True)]


def _sentencepiece_pieces(tokens: list[str], types: list[int]) -> list[bytes]:
    def piece(text: str, kind: int) -> bytes:
        if kind == TokenType.BYTE:
            return bytes([int(text[3:5], 16)])
        if kind == TokenType.UNKNOWN:
            return "\u2585".encode()  # what llama.cpp prints for <unk>
        if kind == TokenType.USER_DEFINED:
            return text.encode()
        if kind != TokenType.NORMAL:
            return b""
        return text.replace(_SPM_SPACE, " ").encode()

    return [piece(t, k) for t, k in zip(tokens, types, strict=True)]

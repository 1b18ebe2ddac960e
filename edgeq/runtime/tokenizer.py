"""The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, built the way llama.cpp reads it.

Two vocabulary kinds (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE with the file's merges; text is first cut by the regexes that llama.cpp keys by
  `tokenizer.ggml.pre` (src/llama-vocab.cpp, `llm_tokenizer_bpe`), each one splitting the pieces of the last.
  The merging runs in Hugging Face `tokenizers` (Rust); control and user-defined tokens are added tokens there,
  matched whole in the raw text before anything else, as llama.cpp does.
- "llama": SentencePiece (llama.cpp's `llm_tokenizer_spm`), done here (`SpmEncoder`): spaces become "▁",
  adjacent symbols merge when their concatenation is a token, best score first; characters that are no token
  fall back to <0xNN> bytes. It needs only a text → id dict next to the file's own token list and scores, where
  an HF BPE needs every split of every token as a merge (515k on Gemma 3's 262k vocabulary: +263 MiB at its
  peak, 1.4 s to build).

Decoding is done here from each token's bytes, which also serves the streaming decoder.
"""
from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Any

from edgeq.errors import ModelError

log = logging.getLogger(__name__)

# llama.cpp's token types (gguf TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts of control tokens that end a turn, as llama.cpp's special_eog_ids collects them.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
    "<|return|>", "<|call|>", "<|end_of_text|>", "<end_of_utterance>", "_<EOT>", "<｜end▁of▁sentence｜>",
})

SPACE_MARK = "\u2581"  # "▁", SentencePiece's visible space

# ---------------------------------------------------------------- pre-tokenizer regexes (llama.cpp)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
_DEEPSEEK3 = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Each name maps to the regexes applied in turn; the llama.cpp type in the comment.
_PRE_GROUPS: list[tuple[tuple[str, ...], list[str]]] = [
    (("default",), [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"]),  # DEFAULT
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
      "dbrx", "smaug-bpe"), [_LLAMA3]),  # LLAMA3, DBRX, SMAUG
    (("deepseek-coder",), ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"]),  # DEEPSEEK_CODER
    (("deepseek-v3", "hunyuan-dense"), [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK3]),
    (("falcon",), [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"]),  # FALCON
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"), [r"\p{N}", _GPT2]),
    (("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
      "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "exaone4", "trillion",
      "granite-docling"), [_GPT2]),  # GPT2, MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING
    (("qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "megrez", "hunyuan", "grok-2"), [_QWEN2]),
    (("poro-chat", "bloom", "gpt3-finnish"), [_PORO]),  # PORO, BLOOM, GPT3_FINNISH
    (("glm4", "chatglm-bpe"), [_LLAMA3]),  # CHATGLM4
    (("viking",), [_PORO, r"\p{N}"]),  # VIKING
    (("tekken",), [_TEKKEN]),  # TEKKEN
    (("gpt-4o", "llama4", "minimax-m2"), [_GPT4O]),  # GPT4O
    (("seed-coder",), [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                       r"|\s+(?!\S)|\s+"]),  # SEED_CODER
    (("bailingmoe", "bailingmoe2", "llada-moe"), [r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])"
                                                  r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                                                  r"|\s*[\r\n]|\s+(?!\S)|\s+"]),  # BAILINGMOE
]
PRE_TOKENIZER_REGEXES: dict[str, list[str]] = {name: regs for names, regs in _PRE_GROUPS for name in names}
# llama.cpp matches the whole pre-token against the vocabulary before merging for these
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (the alphabet byte-level vocabularies are spelled in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
_OUTSIDE_BYTE_ALPHABET = re.compile("[^" + "".join(re.escape(c) for c in CHAR_TO_BYTE) + "]")


class SpmEncoder:
    """llama.cpp's `llm_tokenizer_spm` over one text run (already normalized: spaces as "▁"). Symbols start as
    single characters; the adjacent pair whose concatenation is the best-scoring token merges first (ties: the
    leftmost), until no pair forms a token. A symbol that is no token (only an unmerged character can be one)
    becomes its UTF-8 bytes as <0xNN> tokens, or the unknown token where the vocabulary lacks a byte token."""

    def __init__(self, tokens: list[str], scores, unk_id: int | None):
        from array import array

        import numpy as np

        self.ids = dict(zip(tokens, range(len(tokens))))  # a repeated text keeps its last id, as llama.cpp's map
        # 8 bytes a token, read as Python floats one at a time (no float object per token held)
        self.neg_scores = array("d", np.negative(np.asarray(scores, dtype=np.float64)).tobytes())
        byte_ids = [self.ids.get(f"<0x{b:02X}>", unk_id) for b in range(256)]
        self.byte_ids = byte_ids

    def encode(self, text: str, out: list[int]) -> None:
        n = len(text)
        if n == 0:
            return
        import heapq

        ids, neg_scores = self.ids, self.neg_scores
        length = [1] * n
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            t = ids.get(text[i:i + 2])
            if t is not None:
                heap.append((neg_scores[t], i, i + 1, 2))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, left, right, size = pop(heap)
            n_left, n_right = length[left], length[right]
            if n_left == 0 or n_right == 0 or n_left + n_right != size:
                continue  # one side merged since this pair was queued
            length[left] = size
            length[right] = 0
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prev[after] = left
            before = prev[left]
            if before >= 0:
                t = ids.get(text[before:left + size])
                if t is not None:
                    push(heap, (neg_scores[t], before, left, left + size - before))
            if after >= 0:
                t = ids.get(text[left:after + length[after]])
                if t is not None:
                    push(heap, (neg_scores[t], left, after, size + length[after]))
        i = 0
        byte_ids = self.byte_ids
        while i >= 0:
            piece = text[i:i + length[i]]
            t = ids.get(piece)
            if t is not None:
                out.append(t)
            else:
                out.extend(b for b in (byte_ids[c] for c in piece.encode("utf-8", "surrogatepass")) if b is not None)
            i = nxt[i]


class TokenTable:
    """A vocabulary's token texts, read-only, in one UTF-8 buffer with an end offset per token: ~10 bytes a token
    where a list of str holds ~100 (Qwen's 151k tokens: 15 MB -> 3). Indexed like the list it replaces; a
    token's str is made when asked for (its piece, once per id, is cached by the tokenizer)."""

    __slots__ = ("_blob", "_ends")

    def __init__(self, texts: list[str]):
        import numpy as np

        encoded = [t.encode("utf-8") for t in texts]  # valid UTF-8: the file's strings were decoded with "replace"
        self._blob = b"".join(encoded)
        self._ends = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        n = len(self._ends)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"token id {i} is outside the vocabulary of {n}")
        return self._blob[int(self._ends[i - 1]) if i else 0:int(self._ends[i])].decode("utf-8")

    def __iter__(self):
        for i in range(len(self._ends)):
            yield self[i]

    def max_bytes(self) -> int:
        """Bytes in the longest token's UTF-8 spelling."""
        import numpy as np

        return int(np.diff(self._ends, prepend=0).max()) if len(self._ends) else 1  # as max(..., default=1)


class AddedTokenSplitter:
    """Cuts text at the vocabulary's control and user-defined tokens: at the leftmost place where any matches,
    the longest one (Hugging Face's added-token matching). Yields (text run, None) and (None, token id)."""

    def __init__(self, tokens: list[str], ids: list[int], special: frozenset[int]):
        by_first: dict[str, list[tuple[str, int]]] = {}
        for i in ids:
            t = tokens[i]
            if t:
                by_first.setdefault(t[0], []).append((t, i))
        for group in by_first.values():
            group.sort(key=lambda e: -len(e[0]))  # longest first; equal lengths keep id order
        self.by_first = by_first
        self.special = special
        self.starts = re.compile("[" + "".join(re.escape(c) for c in by_first) + "]") if by_first else None

    def split(self, text: str, parse_special: bool):
        start = pos = 0
        starts = self.starts
        while starts is not None:
            m = starts.search(text, pos)
            if m is None:
                break
            i = m.start()
            for t, tid in self.by_first[text[i]]:
                if text.startswith(t, i):
                    pos = i + len(t)
                    if parse_special or tid not in self.special:
                        if i > start:
                            yield text[start:i], None
                        yield None, tid
                        start = pos
                    # else a control token written in the text stays text of its run, its span consumed whole
                    break
            else:
                pos = i + 1
        if start < len(text):
            yield text[start:], None


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list of " + (type(value[0]).__name__ if value else "nothing")
    if hasattr(value, "dtype"):
        return f"an array of {value.dtype}"
    return f"a {type(value).__name__}"


def _strings(meta: dict[str, Any], key: str) -> list[str]:
    """A string-array key (tokens, merges) as a list of str; anything else is a ModelError."""
    v = meta.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not set(map(type, v)) <= {str}:
        raise ModelError(f"{key} must be an array of strings, not {_kind(v)}")
    return v


def _short(e: Any, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def token_list(meta: dict[str, Any]) -> list[str]:
    """`tokenizer.ggml.tokens`, checked to be an array of strings."""
    return _strings(meta, "tokenizer.ggml.tokens")


def _numbers(meta: dict[str, Any], key: str, n: int, integer: bool, as_list: bool = True):
    """A numeric per-token array (token types, scores) of exactly n items, as a list (as_list=False: a numpy
    array, no Python object per item); None when absent."""
    import numpy as np

    v = meta.get(key)
    if v is None:
        return None
    kinds = "iu" if integer else "iuf"
    if isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        v = np.asarray(v)
    if not isinstance(v, np.ndarray) or v.ndim != 1 or (v.size and v.dtype.kind not in kinds):
        raise ModelError(f"{key} must be an array of {'integers' if integer else 'numbers'}, not {_kind(v)}")
    if len(v) != n:
        raise ModelError(f"{key} has {len(v)} entries for {n} tokens")
    if not integer and v.size and not np.isfinite(v).all():
        raise ModelError(f"{key} holds NaN or infinite scores")
    return v.tolist() if as_list else v


def _flag(meta: dict[str, Any], key: str, default: bool) -> bool:
    import numpy as np

    v = meta.get(key, default)
    if not isinstance(v, (bool, int, np.integer)):
        raise ModelError(f"{key} must be a boolean, not {_kind(v)}")
    return bool(v)


def special_token_id(meta: dict[str, Any], key: str, n: int) -> int | None:
    """A special token id (BOS, EOS...): None when absent; out of range → a warning and None, as llama.cpp
    does; not an integer → a ModelError."""
    import numpy as np

    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ModelError(f"{key} must be an integer token id, not {_kind(v)}")
    if not 0 <= v < n:
        log.warning("%s = %d is not a token id (the vocabulary has %d tokens): ignored", key, v, n)
        return None
    return int(v)


class Tokenizer:
    """Text ↔ token ids for one GGUF vocabulary. Build with `from_gguf(gf)` or `from_metadata(meta)`."""

    def __init__(self, meta: dict[str, Any]):
        self.model = meta.get("tokenizer.ggml.model")
        if not isinstance(self.model, str):
            raise ModelError(f"tokenizer.ggml.model must be a string, not {_kind(self.model)}")
        if self.model not in ("gpt2", "llama"):
            raise ModelError(f"unsupported tokenizer model {self.model[:40]!r} (edgeq supports 'gpt2' BPE and 'llama' SentencePiece)")
        tokens = token_list(meta)
        if not tokens:
            raise ModelError("the file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        n = len(tokens)
        import numpy as np

        kinds = _numbers(meta, "tokenizer.ggml.token_type", n, integer=True, as_list=False)
        if kinds is None:
            kinds = np.full(n, NORMAL)
        types = kinds.tolist()
        self.tokens = tokens
        self.token_types = types
        self.vocab_size = n
        self.pre = meta.get("tokenizer.ggml.pre", "default")
        if not isinstance(self.pre, str):
            raise ModelError(f"tokenizer.ggml.pre must be a string, not {_kind(self.pre)}")
        self.pre = self.pre or "default"

        spm = self.model == "llama"

        def token_id(key):
            return special_token_id(meta, key, n)

        self.bos_id = token_id("tokenizer.ggml.bos_token_id")
        self.eos_id = token_id("tokenizer.ggml.eos_token_id")
        self.unk_id = token_id("tokenizer.ggml.unknown_token_id")
        self.pad_id = token_id("tokenizer.ggml.padding_token_id")
        # llama.cpp's defaults: SentencePiece adds BOS unless told otherwise, BPE files say so explicitly
        self.add_bos = _flag(meta, "tokenizer.ggml.add_bos_token", spm) and self.bos_id is not None
        self.add_eos = _flag(meta, "tokenizer.ggml.add_eos_token", False) and self.eos_id is not None
        self.add_space_prefix = _flag(meta, "tokenizer.ggml.add_space_prefix", spm) and spm

        special = np.flatnonzero(kinds == CONTROL).tolist()
        user_defined = np.flatnonzero(kinds == USER_DEFINED).tolist()
        self.special_ids = frozenset(special)

        self._tok = None
        self._spm = None
        if spm:
            scores = _numbers(meta, "tokenizer.ggml.scores", n, integer=False, as_list=False)
            self._spm = SpmEncoder(tokens, scores if scores is not None else np.zeros(n), self.unk_id)
            self._added = AddedTokenSplitter(tokens, special + user_defined, self.special_ids)
        else:
            self._tok = self._hf_bpe(meta, tokens, types, special, user_defined)
            # the BPE has its own copy of the vocabulary; ours is read a token at a time (pieces, token texts)
            self.tokens = TokenTable(tokens)
        self._lock = threading.Lock()
        self._piece_cache: dict[int, bytes] = {}

        eog = {i for i in (self.eos_id, token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id"))
               if i is not None}
        eog.update(i for i in special if tokens[i] in EOG_TEXTS)
        self.eog_ids: set[int] = eog

    def _hf_bpe(self, meta, tokens, types, special, user_defined):
        """The byte-level BPE in Hugging Face `tokenizers`, with the file's merges and pre-tokenizer regexes."""
        from tokenizers import AddedToken, Regex, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE

        try:  # `tokenizers` reports a vocabulary it cannot use (a merge of unknown tokens...) as a bare Exception
            # Tokens in the byte alphabet stay as spelled; others (added tokens like "<|im_start|>") are kept
            # raw for the added-token match, or respelled byte by byte if they are ordinary tokens.
            outside_alphabet = _OUTSIDE_BYTE_ALPHABET.search  # one regex call a token, not a loop per character
            vocab = {}
            for i, t in enumerate(tokens):
                if types[i] in (NORMAL, UNUSED, BYTE, UNKNOWN) and outside_alphabet(t):
                    t = "".join(BYTE_TO_CHAR[b] for b in t.encode("utf-8"))
                vocab[t] = i
            merges = []
            for m in _strings(meta, "tokenizer.ggml.merges"):
                k = m.find(" ", 1)
                if k > 0:
                    merges.append((m[:k], m[k + 1:]))
            tok = HFTokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=self.pre in _IGNORE_MERGES))
            regexes = PRE_TOKENIZER_REGEXES.get(self.pre)
            if regexes is None:
                log.warning("unknown pre-tokenizer %r in tokenizer.ggml.pre: using gpt2's regex", self.pre[:64])
                regexes = [_GPT2]
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
            tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_defined])
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"the tokenizer vocabulary is corrupt: {_short(e)}") from None
        return tok

    # ------------------------------------------------------------ construction
    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        """Build from a GGUF metadata dict (keys like "tokenizer.ggml.tokens", plain Python values)."""
        return cls(meta)

    @classmethod
    def from_gguf(cls, gf) -> "Tokenizer":
        """Build from an open GGUF file (anything with a `.metadata` dict)."""
        return cls.from_metadata(gf.metadata)

    # ------------------------------------------------------------ encode
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. add_special: BOS/EOS as the file asks; parse_special: control tokens written
        in the text (like "<|im_start|>") become their ids, otherwise they are tokenized as plain text."""
        if self._spm is not None:
            ids = self._spm_encode(text, parse_special)
        else:
            with self._lock:  # encode_special_tokens is a setting of the shared Rust tokenizer
                self._tok.encode_special_tokens = not parse_special
                try:
                    ids = self._tok.encode(text, add_special_tokens=False).ids if text else []
                finally:
                    self._tok.encode_special_tokens = False
        if add_special:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def _spm_encode(self, text: str, parse_special: bool) -> list[int]:
        ids: list[int] = []
        for run, tid in self._added.split(text, parse_special):
            if tid is not None:
                ids.append(tid)
                continue
            if self.add_space_prefix:  # llama.cpp prefixes every text run that follows a token or the start
                run = " " + run
            self._spm.encode(run.replace(" ", SPACE_MARK), ids)
        return ids

    # ------------------------------------------------------------ decode
    def token_text(self, token_id: int) -> str:
        """The token as the vocabulary spells it (e.g. "Ġthe", "▁the", "<0x0A>", "<|im_end|>")."""
        return self.tokens[token_id]

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """Bytes in the longest token's UTF-8 spelling, once: a bound on any token's decoded bytes (a prompt cap
        sized from it must not walk the whole vocabulary's decoding on every run)."""
        if isinstance(self.tokens, TokenTable):
            return self.tokens.max_bytes()
        return max(map(len, map(str.encode, self.tokens)), default=1)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token stands for in decoded text (control tokens: their text)."""
        b = self._piece_cache.get(token_id)
        if b is None:
            t, kind = self.tokens[token_id], self.token_types[token_id]
            if kind in (CONTROL, USER_DEFINED, UNKNOWN):
                b = t.encode("utf-8")
            elif kind == BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                b = bytes([int(t[3:5], 16)])
            elif self.model == "llama":
                b = t.replace(SPACE_MARK, " ").encode("utf-8")
            elif all(c in CHAR_TO_BYTE for c in t):
                b = bytes(CHAR_TO_BYTE[c] for c in t)
            else:
                b = t.encode("utf-8")
            self._piece_cache[token_id] = b
        return b

    def decode(self, ids, skip_special: bool = False) -> str:
        """The text of `ids`; skip_special drops control tokens (BOS, <|im_end|>...). Invalid UTF-8 → U+FFFD."""
        d = self.stream_decoder(skip_special=skip_special)
        return "".join(d.feed(int(i)) for i in ids) + d.flush()

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)

    def __repr__(self) -> str:
        return f"Tokenizer({self.model}/{self.pre}, {self.vocab_size} tokens)"


def _complete_prefix(buf: bytes) -> int:
    """Length of the longest prefix of `buf` that ends on a UTF-8 character boundary."""
    n = len(buf)
    for back in range(1, min(4, n) + 1):
        c = buf[n - back]
        if c & 0xC0 != 0x80:  # a lead byte (or ASCII): does its sequence fit in what we have?
            need = 1 if c < 0x80 else 2 if c >> 5 == 0b110 else 3 if c >> 4 == 0b1110 else 4 if c >> 3 == 0b11110 else 1
            return n if back >= need else n - back
    return n  # only continuation bytes in the last 4: invalid anyway, let them through as U+FFFD


class StreamDecoder:
    """Turns token ids into text one at a time, holding back the bytes of a character not yet complete."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tok = tokenizer
        self.skip_special = skip_special
        self._buf = b""
        self._strip_space = tokenizer.add_space_prefix  # the space encode() put in front of the first word

    def feed(self, token_id: int) -> str:
        tok = self.tok
        special = token_id in tok.special_ids
        if special and self.skip_special:
            return ""
        piece = tok.token_bytes(token_id)
        if self._strip_space and not special:
            self._strip_space = False
            if piece.startswith(b" "):
                piece = piece[1:]
        self._buf += piece
        k = _complete_prefix(self._buf)
        out, self._buf = self._buf[:k], self._buf[k:]
        return out.decode("utf-8", errors="replace")

    def flush(self) -> str:
        out, self._buf = self._buf, b""
        return out.decode("utf-8", errors="replace")

"""The GGUF tokenizer against Hugging Face's and llama.cpp's on the real files, plus small synthetic vocabularies."""
import functools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeq.runtime.tokenizer import Tokenizer

MIXED = (
    "Hello world! The café's naïve façade — 'quoted' \"text\", isn't it? I'll say we've 12345 and 3.14159.\n"
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\n\tif (a && b) { c[i] = 0x1F; }\n"
    "Unicode: 日本語のテキスト, 한국어, Ελληνικά, русский, עברית, العربية, हिन्दी.\n"
    "Emoji: 🤗👍🏽🎉 👨‍👩‍👧 🇫🇷 ∑∫√∞ ≤≥ ‰ 𝔘𝔫𝔦 𓀀\n"
    "  leading and trailing spaces   \r\n"
    "<|im_start|>user\nHi there<|im_end|>\n<start_of_turn>model\nSure<end_of_turn>\n<bos>x<eos>"
)

LLAMACPP_PYTHON = next((p for p in (Path(os.environ.get("EDGEQ_LLAMACPP_PY", "/nonexistent")),
                                    Path.home() / ".cache" / "edgeq-llamacpp-noamx" / "bin" / "python",
                                    Path.home() / ".cache" / "edgeq-llamacpp" / "bin" / "python") if p.is_file()),
                       Path.home() / ".cache" / "edgeq-llamacpp" / "bin" / "python")
LLAMACPP_SCRIPT = """
import json, sys
from llama_cpp import Llama
path, add_special, special = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
llm = Llama(model_path=path, vocab_only=True, verbose=False)
print(json.dumps([llm.tokenize(t.encode("utf-8"), add_bos=add_special, special=special) for t in json.load(sys.stdin)]))
"""


@functools.lru_cache(maxsize=None)
def gguf_metadata(path) -> dict:
    """The file's metadata as Python values: edgeq's GGUFFile when present, else gguf-py's reader."""
    try:
        from edgeq.formats.gguf_file import GGUFFile
    except ImportError:
        import gguf

        reader = gguf.GGUFReader(str(path))
        return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    with GGUFFile(path) as gf:
        return dict(gf.metadata)


def hf_tokenizer(path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    path = Path(path)
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def llamacpp_tokenize(path, texts, add_special=True, special=True):
    if not LLAMACPP_PYTHON.exists():
        pytest.skip(f"llama-cpp-python venv not found at {LLAMACPP_PYTHON}: no llama.cpp comparison")
    r = subprocess.run([str(LLAMACPP_PYTHON), "-c", LLAMACPP_SCRIPT, str(path), str(int(add_special)), str(int(special))],
                       input=json.dumps(texts), capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"llama-cpp-python could not tokenize: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real(request):
    path = request.getfixturevalue(f"{request.param}_path")
    meta = gguf_metadata(str(path))
    t0 = time.perf_counter()
    tok = Tokenizer.from_metadata(meta)
    build_s = time.perf_counter() - t0
    return request.param, Path(path), meta, tok, build_s


TEXTS = [MIXED, "", " ", "a", "  two", "x\n\n\ny", "1234567890", "don't DON'T", "<|im_start|>", "<end_of_turn>"]


def test_ids_match_huggingface(real):
    _, path, _, tok, _ = real
    hf = hf_tokenizer(path)
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text), text


def test_ids_match_llamacpp(real):
    _, path, _, tok, _ = real
    expected = llamacpp_tokenize(path, TEXTS, add_special=True, special=True)
    for text, want in zip(TEXTS, expected):
        assert tok.encode(text) == want, text
    plain = llamacpp_tokenize(path, TEXTS, add_special=False, special=False)
    for text, want in zip(TEXTS, plain):
        assert tok.encode(text, add_special=False, parse_special=False) == want, text


def long_mixed_text() -> str:
    """Some 20 kB mixing prose, code, digits, runs of spaces/tabs/newlines, characters that only byte fallback
    spells (old scripts, rare emoji) and control-token texts, to compare whole tokenizations."""
    parts = []
    for k in range(60):
        parts.append(MIXED)
        parts.append(f"{k * 7919} {k ** 5}.{k:03d} {'x' * (k % 7)}{' ' * (k % 11)}\t" + "\n" * (k % 4))
        parts.append("𓀀𓀁𓁐 🫨🪿 ꙮ ᚠᛇᚻ 𝕏 \u00a0\u2009\u200b  ▁▁ ")
        parts.append("The quick brown fox jumps over the lazy dog; naïve coöperation, Œuvre, straße. ")
    return "".join(parts)


def test_long_mixed_text_matches_llamacpp(real):
    """Token for token on a long text, with and without specials: SentencePiece vocabularies are encoded by our
    own merge loop, so every corner (ties, byte fallback, space runs, added tokens) is checked on the real files."""
    _, path, _, tok, _ = real
    text = long_mixed_text()
    assert tok.encode(text) == llamacpp_tokenize(path, [text], add_special=True, special=True)[0]
    plain = llamacpp_tokenize(path, [text], add_special=False, special=False)[0]
    assert tok.encode(text, add_special=False, parse_special=False) == plain


def test_long_mixed_text_matches_huggingface(real):
    _, path, _, tok, _ = real
    text = long_mixed_text().replace("▁", "")  # HF's Gemma tokenizer reads a literal "▁" as a space; llama.cpp does not
    assert tok.encode(text) == hf_tokenizer(path).encode(text)


def test_sentencepiece_vocabulary_needs_no_hf_tokenizers():
    """A SentencePiece file is encoded without building a Hugging Face BPE (515k derived merges on Gemma 3)."""
    code = ("import sys; sys.path.insert(0, 'tests'); from test_tokenizer import tiny_spm_metadata\n"
            "from edgeq.runtime.tokenizer import Tokenizer\n"
            "tok = Tokenizer.from_metadata(tiny_spm_metadata()); assert tok.encode('ab') == [1, 264]\n"
            "print('tokenizers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_spm_control_text_without_parse_special_stays_in_its_run():
    """parse_special=False: a control token's text is plain text of the run around it (no space prefix after
    it, as in llama.cpp), while user-defined tokens still match."""
    tok = Tokenizer.from_metadata(tiny_spm_metadata())
    assert [tok.token_text(i) for i in tok.encode("a<ctl>b", add_special=False, parse_special=False)][-2:] == \
        ["<0x3E>", "b"]
    user = tiny_spm_metadata()
    user["tokenizer.ggml.token_type"] = user["tokenizer.ggml.token_type"][:-1] + [4]
    tok = Tokenizer.from_metadata(user)
    assert [tok.token_text(i) for i in tok.encode("a<ctl>b", add_special=False, parse_special=False)] == \
        ["▁a", "<ctl>", "▁", "b"]


def test_special_tokens(real):
    name, _, _, tok, _ = real
    if name == "smollm2":
        assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (1, 2, False, False)
        assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
        assert 1 not in tok.encode("<|im_start|>", parse_special=False)
        assert tok.eog_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    else:
        assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (2, 1, True, False)
        assert tok.encode("hi")[0] == 2 and tok.encode("hi", add_special=False)[0] != 2
        assert tok.encode("<start_of_turn>", add_special=False) == [105]
        assert tok.eog_ids == {1, 106}  # <eos>, <end_of_turn>
    assert tok.vocab_size == len(tok.tokens)


def test_roundtrip(real):
    _, _, _, tok, _ = real
    ids = tok.encode(MIXED, add_special=False)
    assert tok.decode(ids) == MIXED
    end = tok.token_text(max(tok.eog_ids))  # <|im_end|> or <end_of_turn>
    assert tok.decode(tok.encode(f"a{end}b", add_special=False), skip_special=True) == "ab"


def test_stream_decoder_never_splits_a_character(real):
    _, _, _, tok, _ = real
    ids = tok.encode(MIXED, add_special=False)
    d = tok.stream_decoder()
    out = ""
    for i in ids:
        out += d.feed(i)
        assert "\ufffd" not in out
        assert MIXED.startswith(out)
    assert out + d.flush() == MIXED


def test_byte_fallback_assembles_characters():
    """SentencePiece byte tokens <0xF0><0x9F>... come out as one character, never half of one."""
    tok = Tokenizer.from_metadata(tiny_spm_metadata())
    ids = tok.encode("a🤗", add_special=False)
    assert [tok.token_text(i) for i in ids] == ["▁a", "<0xF0>", "<0x9F>", "<0xA4>", "<0x97>"]
    d = tok.stream_decoder()
    pieces = [d.feed(i) for i in ids]
    assert pieces == ["a", "", "", "", "🤗"]  # add_space_prefix: the leading space is dropped
    assert d.flush() == ""
    assert tok.decode(ids) == "a🤗"


def test_gemma_byte_fallback(gemma3_path):
    tok = Tokenizer.from_metadata(gguf_metadata(str(gemma3_path)))
    text = "𓀀𓀁 🫨"
    ids = tok.encode(text, add_special=False)
    assert tok.decode(ids) == text
    d = tok.stream_decoder()
    assert all("\ufffd" not in d.feed(i) for i in ids)


def tiny_spm_metadata(**over):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "▁a", "ab", "▁ab", "<ctl>"]
    types = [2, 3, 3] + [6] * 256 + [1] * 6 + [3]
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, 0.0]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    meta.update(over)
    return meta


def test_tiny_spm_merges_by_score():
    tok = Tokenizer.from_metadata(tiny_spm_metadata())
    assert tok.add_bos and tok.add_space_prefix  # SentencePiece defaults, as llama.cpp
    # "▁ab": ▁a (-4) beats ab (-5), then ▁ab (-6) from ▁a + b
    assert [tok.token_text(i) for i in tok.encode("ab")] == ["<s>", "▁ab"]
    # llama.cpp puts the space prefix in front of every text run after a special token too
    assert [tok.token_text(i) for i in tok.encode("a<ctl>b", add_special=False)] == ["▁a", "<ctl>", "▁", "b"]
    assert tok.decode(tok.encode("ab ab")) == "<s>ab ab"
    assert tok.decode(tok.encode("ab ab"), skip_special=True) == "ab ab"


def test_max_token_bytes_is_the_longest_spelling():
    tok = Tokenizer.from_metadata(tiny_spm_metadata())
    assert tok.max_token_bytes == 6  # "<0xNN>"
    meta = tiny_spm_metadata()
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][:-1] + ["▁日本語"]  # 3 + 9 bytes
    assert Tokenizer.from_metadata(meta).max_token_bytes == 12


def test_token_table_reads_back_the_list_it_replaces(smollm2_path):
    from edgeq.runtime.tokenizer import TokenTable

    texts = ["", "a", "Ġthe", "日本語", "<|im_end|>", "\ufffd", "ü" * 40, "x"]
    table = TokenTable(texts)
    assert len(table) == len(texts) and list(table) == texts
    assert [table[i] for i in range(len(texts))] == texts and table[-1] == "x" and table[-len(texts)] == ""
    assert table.max_bytes() == 80
    assert TokenTable([""]).max_bytes() == 0 and TokenTable([]).max_bytes() == 1  # as the list path's max(default=1)
    for bad in (len(texts), -len(texts) - 1):
        with pytest.raises(IndexError):
            table[bad]
    meta = gguf_metadata(str(smollm2_path))
    tok = Tokenizer.from_metadata(meta)
    assert isinstance(tok.tokens, TokenTable)  # a BPE's own copy of the vocabulary is in tokenizers
    assert list(tok.tokens) == meta["tokenizer.ggml.tokens"]
    assert tok.max_token_bytes == max(len(t.encode()) for t in meta["tokenizer.ggml.tokens"])


@pytest.mark.parametrize("token_id", [1, 500])  # a control token, an ordinary one
def test_a_token_that_is_no_unicode_text_is_a_model_error(smollm2_path, token_id):
    """A lone surrogate (only an API caller's dict can hold one: the file's strings are decoded with "replace")
    cannot be stored as UTF-8 (the BPE's vocabulary, TokenTable): one ModelError, no UnicodeEncodeError."""
    from edgeq.errors import ModelError

    meta = gguf_metadata(str(smollm2_path))
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[token_id] = "a\ud800b"
    with pytest.raises(ModelError, match="corrupt"):
        Tokenizer.from_metadata(dict(meta, **{"tokenizer.ggml.tokens": tokens}))


def test_gpt2_unknown_pre_falls_back_with_warning(smollm2_path, caplog):
    meta = dict(gguf_metadata(str(smollm2_path)), **{"tokenizer.ggml.pre": "no-such-pre"})
    with caplog.at_level(logging.WARNING, logger="edgeq.runtime.tokenizer"):
        tok = Tokenizer.from_metadata(meta)
    assert "no-such-pre" in caplog.text
    assert tok.decode(tok.encode("Hello world 123")) == "Hello world 123"


def test_from_gguf_reads_metadata_attribute():
    class FakeFile:
        metadata = tiny_spm_metadata()

    assert Tokenizer.from_gguf(FakeFile()).vocab_size == 266


def test_unsupported_model_is_a_model_error():
    from edgeq.errors import ModelError

    with pytest.raises(ModelError, match="tokenizer model"):
        Tokenizer.from_metadata(tiny_spm_metadata(**{"tokenizer.ggml.model": "rwkv"}))

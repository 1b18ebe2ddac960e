"""`edgeq inspect`: the summary of a GGUF file, as a table and as JSON."""
import json

import numpy as np
import pytest

from edgeq.cli import main
from edgeq.formats.gguf_write import write_gguf


def run(capsys, *argv):
    rc = main(["inspect", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    meta = {
        "general.name": "Tiny Test",
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.block_count": 1,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(10)],
    }
    tensors = [
        ("token_embd.weight", "Q8_0", (10, 64), np.zeros(10 * 68, np.uint8)),
        ("output_norm.weight", "F32", (64,), np.ones(64, np.float32)),
    ]
    write_gguf(path, "llama", meta, tensors)
    return path


def test_table(tiny, capsys):
    rc, out, err = run(capsys, tiny)
    assert rc == 0 and err == ""
    for text in ("llama", "Tiny Test", "704", "256", "Q8_0", "F32", "gpt2 / smollm", "chat template     no"):
        assert text in out, text


def test_json(tiny, capsys):
    rc, out, _ = run(capsys, tiny, "--json", "--tensors")
    assert rc == 0
    s = json.loads(out)
    assert s["architecture"] == "llama" and s["name"] == "Tiny Test"
    assert s["parameters"] == 10 * 64 + 64
    assert s["bits_per_weight"] == pytest.approx(8 * (10 * 68 + 256) / 704, abs=1e-3)
    assert s["tensor_types"] == {"Q8_0": 1, "F32": 1}
    assert (s["context_length"], s["embedding_length"], s["layers"], s["heads"], s["heads_kv"]) == (256, 64, 1, 4, 2)
    assert s["vocab_size"] == 10 and s["tokenizer"] == "gpt2" and s["chat_template"] is False
    assert s["tensors"][0] == {"name": "token_embd.weight", "type": "Q8_0", "shape": [10, 64]}


def test_tensor_list(tiny, capsys):
    rc, out, _ = run(capsys, tiny, "--tensors")
    assert rc == 0
    assert any(line.split() == ["token_embd.weight", "Q8_0", "10", "x", "64"] for line in out.splitlines())


def test_not_a_gguf_file(tmp_path, capsys):
    f = tmp_path / "junk.gguf"
    f.write_bytes(b"this is not a model at all" * 100)
    rc, out, err = run(capsys, f)
    assert rc != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and "junk.gguf" in err and "not a GGUF file" in err


def test_missing_file(tmp_path, capsys):
    rc, _, err = run(capsys, tmp_path / "nope.gguf")
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "nope.gguf" in err


@pytest.mark.slow
def test_real_smollm2(smollm2_path, capsys):
    rc, out, _ = run(capsys, smollm2_path, "--json")
    assert rc == 0
    s = json.loads(out)
    assert s["architecture"] == "llama"
    assert 130e6 < s["parameters"] < 140e6
    assert (s["layers"], s["embedding_length"], s["heads"], s["heads_kv"]) == (30, 576, 9, 3)
    assert s["vocab_size"] == 49152 and s["tokenizer"] == "gpt2" and s["chat_template"] is True
    assert 4 < s["bits_per_weight"] < 9
    assert sum(s["tensor_types"].values()) == s["tensor_count"] == 272
    rc, out, _ = run(capsys, smollm2_path)
    assert rc == 0 and "llama" in out and "49,152" in out


@pytest.mark.slow
def test_real_gemma3(gemma3_path, capsys):
    rc, out, _ = run(capsys, gemma3_path, "--json")
    assert rc == 0
    s = json.loads(out)
    assert s["architecture"] == "gemma3"
    assert s["vocab_size"] == 262144 and s["layers"] == 18 and s["embedding_length"] == 640
    assert s["context_length"] == 32768 and s["tokenizer"] == "llama"
    assert 260e6 < s["parameters"] < 275e6


def test_hostile_metadata_is_escaped(tmp_path, capsys):
    controls = {chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} - {"\n", "\t"}
    name = "\x1b]0;PWNED\x07 \x9b2J\nsecond line"
    path = tmp_path / "evil.gguf"
    write_gguf(path, "llama\x1b[31m", {"general.name": name, "tokenizer.ggml.pre": "\x1b]52;c;ZXZpbA==\x07"},
               [("w\x1b[2J", "F32", (32,), np.zeros(32, np.float32))])
    rc, out, _ = run(capsys, path, "--tensors")
    assert rc == 0 and not controls & set(out)
    assert any(line.startswith("name") and "\\x1b]0;PWNED\\x07 \\x9b2J second line" in line for line in out.splitlines())
    rc, out, _ = run(capsys, path, "--json", "--tensors")
    assert rc == 0 and not controls & set(out.rstrip("\n"))
    s = json.loads(out)  # the JSON still holds the exact values
    assert s["name"] == name and s["architecture"] == "llama\x1b[31m" and s["tensors"][0]["name"] == "w\x1b[2J"

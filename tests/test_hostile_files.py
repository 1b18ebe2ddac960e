"""Hostile model files: each bad value ends in one line (an EdgeqError or FormatError), never a traceback, a
model without layers, or gigabytes allocated. Every file is loaded in a child process with 2 GB of address
space and a time limit (tests/_hostile.py), so a regression fails the test instead of exhausting the machine."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
from gguf.constants import GGUFValueType as VT

from _hostile import ARCH, Loader, is_clean, tiny_metadata, tiny_shapes, write_tiny

A = f"{ARCH}."
N_TOKENS = len(tiny_metadata()["tokenizer.ggml.tokens"])
TOKENS = tiny_metadata()["tokenizer.ggml.tokens"]

# name -> (write_tiny keyword arguments, text expected in the one-line error)
CASES = {
    "context_length a string": (dict(set={A + "context_length": "abc"}), "context_length must be a number"),
    "context_length NaN": (dict(set={A + "context_length": math.nan}), "context_length must be a finite"),
    "block_count a string": (dict(set={A + "block_count": "1"}), "block_count must be a number"),
    "block_count an empty array": (dict(typed={A + "block_count": ([], VT.ARRAY, VT.UINT32)}), "empty array"),
    "block_count 0": (dict(set={A + "block_count": 0}), "block_count = 0 is out of range"),
    "block_count -1": (dict(set={A + "block_count": -1}), "block_count = -1 is out of range"),
    "block_count short of the layers": (dict(shapes={**tiny_shapes(N_TOKENS), "blk.1.attn_norm.weight": (128,)}),
                                        "more layers than its block_count"),
    "head_count 0": (dict(set={A + "attention.head_count": 0}), "head_count = 0 is out of range"),
    "heads not a multiple of KV heads": (dict(set={A + "attention.head_count_kv": 3}), "not a multiple of 3 KV"),
    "epsilon a string": (dict(set={A + "attention.layer_norm_rms_epsilon": "1e-5"}), "epsilon must be a number"),
    "epsilon negative": (dict(set={A + "attention.layer_norm_rms_epsilon": -1e-5}), "epsilon = "),
    "rope.freq_base 0": (dict(set={A + "rope.freq_base": 0.0}), "freq_base = 0.0 is out of range"),
    # one changed byte: 64 -> 536,870,976 rotary dims (4.2 GB allocated before a traceback, before the fix)
    "rope.dimension_count huge": (dict(set={A + "rope.dimension_count": 536_870_976}), "dimension_count"),
    "rotary dims over the head size": (dict(set={A + "rope.dimension_count": 64}), "rotary dims 64"),
    "truncated vocabulary": (dict(set={"tokenizer.ggml.tokens": TOKENS[:100], "tokenizer.ggml.token_type": [1] * 100,
                                       "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}),
                             "the vocabulary has 100 tokens"),
    "tokens of the wrong type": (dict(typed={"tokenizer.ggml.tokens": (list(range(N_TOKENS)), VT.ARRAY, VT.UINT32)}),
                                 "tokenizer.ggml.tokens must be an array of strings"),
    "tokens a string": (dict(set={"tokenizer.ggml.tokens": "abc"}), "tokenizer.ggml.tokens must be an array"),
    "merges of the wrong type": (dict(typed={"tokenizer.ggml.merges": ([1, 2], VT.ARRAY, VT.INT32)}),
                                 "tokenizer.ggml.merges must be an array of strings"),
    "token types of the wrong type": (dict(set={"tokenizer.ggml.token_type": ["x"] * N_TOKENS}),
                                      "token_type must be an array of integers"),
    "token types short": (dict(set={"tokenizer.ggml.token_type": [1] * 10}), "token_type has 10 entries"),
    "BOS id a string": (dict(set={"tokenizer.ggml.bos_token_id": "1"}), "bos_token_id must be an integer"),
    "BOS id a float": (dict(set={"tokenizer.ggml.bos_token_id": 1.5}), "bos_token_id must be an integer"),
    "EOS id an array": (dict(set={"tokenizer.ggml.eos_token_id": [1, 2]}), "eos_token_id must be an integer"),
    "add_bos_token an array": (dict(typed={"tokenizer.ggml.add_bos_token": ([True, False], VT.ARRAY, VT.BOOL)}),
                               "add_bos_token must be a boolean"),
    "merge of unknown tokens": (dict(set={"tokenizer.ggml.merges": ["h e", "zz\u0101 q"]}),
                                "tokenizer vocabulary is corrupt"),
    "chat_template not a string": (dict(set={"tokenizer.chat_template": 5}), "chat_template must be a string"),
    "chat_template an array": (dict(set={"tokenizer.chat_template": ["{{ x }}"]}), "chat_template must be a string"),
    "chat template that hangs": (dict(set={"tokenizer.chat_template": "{{ 10**(10**9) }}"}), "too large"),
    "pre-tokenizer not a string": (dict(set={"tokenizer.ggml.pre": 7}), "tokenizer.ggml.pre must be a string"),
}

SPM_CASES = {
    "SentencePiece scores shorter than tokens": (
        {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0] * 10}, "scores has 10 entries"),
    "SentencePiece scores NaN": (
        {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [math.nan] * N_TOKENS}, "NaN"),
}


@pytest.fixture(scope="module")
def loader():
    lo = Loader(memory=2 << 30, seconds=20.0)
    yield lo
    lo.close()


def test_the_tiny_model_loads(loader, tmp_path):
    # the baseline every case changes one thing of
    assert loader.load(write_tiny(tmp_path / "ok.gguf"))["outcome"] == "ok"


@pytest.mark.parametrize("case", list(CASES) + list(SPM_CASES))
def test_hostile_value_is_one_line(case, loader, tmp_path):
    if case in CASES:
        kwargs, needle = CASES[case]
    else:
        meta, needle = SPM_CASES[case]
        kwargs = dict(set=meta)
    r = loader.load(write_tiny(tmp_path / "bad model.gguf", **kwargs))
    assert r["outcome"] == "error", r
    assert is_clean(r), r
    assert needle in r["message"], r["message"]


def test_cli_sampling_options(tmp_path):
    path = write_tiny(tmp_path / "ok.gguf")
    for args, needle in ((["--temp", "nan"], "temperature must be a finite number"),
                         (["--repeat-penalty", "nan"], "repeat penalty must be a finite number"),
                         (["--top-p", "inf"], "top-p must be a finite number"),
                         (["--seed", "-1"], "seed must be >= 0"),
                         (["-n", "-1"], "--max-tokens must be >= 1"),
                         (["-n", "0"], "--max-tokens must be >= 1")):
        p = subprocess.run([sys.executable, "-m", "edgeq.cli", "run", str(path), "-p", "hi", *args],
                           capture_output=True, text=True, timeout=300)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert len(lines) == 1 and needle in lines[0], (args, p.stderr)


@pytest.mark.parametrize("kw, needle", [
    (dict(temperature=math.nan), "temperature"), (dict(repeat_penalty=math.nan), "repeat penalty"),
    (dict(top_k=1.5), "top-k"), (dict(seed=-1), "seed"), (dict(min_p=math.nan), "min-p"),
    (dict(repeat_last_n=-1), "repeat-last-n"),
])
def test_sampling_params_refuse_nan_and_negative(kw, needle):
    from edgeq.errors import EdgeqError
    from edgeq.runtime.sampling import SamplingParams

    with pytest.raises(EdgeqError, match=needle):
        SamplingParams(**kw).validate()


def test_inspect_shows_numeric_arrays(tmp_path):
    # numeric metadata arrays are numpy views now: inspect's JSON must still serialize them
    import json

    from edgeq.cli.inspect import summary
    from edgeq.formats.gguf_file import GGUFFile

    path = write_tiny(tmp_path / "arrays.gguf", set={A + "attention.head_count_kv": [2, 2, 2], "general.name": [1, 2],
                                                      "tokenizer.ggml.tokens": list(range(5))})
    with GGUFFile(path) as gf:
        s = json.loads(json.dumps(summary(gf)))
    assert s["heads_kv"] == [2, 2, 2] and s["name"] == [1, 2] and s["vocab_size"] == N_TOKENS


def test_chat_sampling_options_are_checked_before_the_load(tmp_path):
    path = write_tiny(tmp_path / "ok.gguf")
    for args, needle in ((["--temp", "nan"], "temperature must be a finite number"),
                         (["--temp", "-1"], "temperature must be >= 0"),
                         (["--top-p", "0"], "top-p must be in (0, 1]"),
                         (["--max-tokens", "0"], "--max-tokens must be >= 1")):
        p = subprocess.run([sys.executable, "-m", "edgeq.cli", "chat", str(path), *args],
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert len(lines) == 1 and needle in lines[0], (args, p.stderr)

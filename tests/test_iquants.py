"""I-quants end to end: `edgeq quantize F16 -> IQ4_XS / IQ4_NL` gives llama-quantize's tensor types and bytes and
a file llama.cpp runs; a file holding a type edgeq cannot compute (IQ2_XXS, IQ1_S, TQ1_0, MXFP4, ...) gets one
line naming the type at load and as a quantize input, and `edgeq inspect` still lists it.

The model is a tiny random llama 256 wide (IQ4_XS super-blocks fit its rows), 8 layers (llama.cpp's first-eighth
ffn_down rule applies to layer 0) and 4 query heads per KV head (its attn_v rule applies)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from edgeq.cli import main as cli  # noqa: E402
from edgeq.formats.gguf_file import GGUFFile  # noqa: E402
from edgeq.formats.gguf_write import write_gguf  # noqa: E402
from edgeq.formats.quants import QTYPES  # noqa: E402
from test_convert import LLAMACPP_PY  # noqa: E402

TOOLS = Path("/work/shared/tools/llamacpp_quantize.py")
# types edgeq reads but cannot compute or decode, one per family, as published on the hub
UNSUPPORTED = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4"]


@pytest.fixture(scope="module")
def f16_file(tmp_path_factory, smollm2_path) -> Path:
    from edgeq.convert.hf_checkpoint import materialize_from_gguf
    from test_convert import HF_CACHE

    hf = materialize_from_gguf(smollm2_path, HF_CACHE / "SmolLM2-135M-Instruct")
    root = tmp_path_factory.mktemp("iq")
    src = root / "hf"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (hf / name).is_file():
            shutil.copy(hf / name, src / name)
    vocab = len(json.loads((src / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(5)
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    out = root / "tiny-f16.gguf"
    assert cli(["convert", str(src), "-o", str(out), "--type", "F16", "-q"]) == 0
    return out


def _tensors(path) -> dict[str, tuple[str, bytes]]:
    with GGUFFile(path) as gf:
        return {n: (t.qtype, bytes(t.data)) for n, t in gf.tensors.items()}


# ---------------------------------------------------------------- IQ4_XS / IQ4_NL files

@pytest.mark.parametrize("ftype", ["IQ4_XS", "IQ4_NL"])
def test_quantize_to_iq4_matches_llama_quantize(f16_file, tmp_path, ftype):
    if not LLAMACPP_PY.is_file() or not TOOLS.is_file():
        pytest.skip("llama-cpp-python (~/.cache/edgeq-llamacpp) not installed")
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    assert cli(["quantize", str(f16_file), str(ours), "--type", ftype, "-q"]) == 0
    subprocess.run([str(LLAMACPP_PY), str(TOOLS), str(f16_file), str(theirs), ftype], check=True, timeout=600,
                   capture_output=True)
    a, b = _tensors(ours), _tensors(theirs)
    assert set(a) == set(b)
    types = {n: a[n][0] for n in a}
    assert types == {n: b[n][0] for n in b}
    # llama.cpp's rules: classifier Q6_K, attn_v Q5_K (4 query heads per KV head), ffn_down of layer 0 Q5_K
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == ftype
    assert types["blk.3.attn_v.weight"] == "Q5_K" and types["blk.0.ffn_down.weight"] == "Q5_K"
    assert types["blk.1.ffn_down.weight"] == types["blk.3.attn_q.weight"] == ftype
    assert [n for n in a if a[n][1] != b[n][1]] == []
    with GGUFFile(ours) as gf:
        assert gf.metadata["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{ftype}"])


_LLAMACPP_LOGITS = r"""
import sys, json, numpy as np, llama_cpp
m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                    type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
ids = json.loads(sys.argv[2]); m.eval(ids)
np.save(sys.argv[3], np.array(m.scores[:len(ids)], dtype=np.float32))
"""


def test_llamacpp_runs_our_iq4_xs_file(f16_file, tmp_path):
    """llama.cpp loads edgeq's IQ4_XS file, and its logits are edgeq's on the same weights."""
    if not LLAMACPP_PY.is_file():
        pytest.skip("llama-cpp-python (~/.cache/edgeq-llamacpp) not installed")
    from edgeq.runtime.engine import load

    out = tmp_path / "iq4xs.gguf"
    assert cli(["quantize", str(f16_file), str(out), "--type", "IQ4_XS", "--pure", "-q"]) == 0
    assert {q for q, _ in _tensors(out).values()} == {"IQ4_XS", "F32"}
    ids = [1, 17, 250, 33, 9, 101, 47, 2]
    npy = tmp_path / "logits.npy"
    subprocess.run([str(LLAMACPP_PY), "-c", _LLAMACPP_LOGITS, str(out), json.dumps(ids), str(npy)], check=True,
                   timeout=300, capture_output=True)
    theirs = np.load(npy)
    ours = load(str(out), n_ctx=64, threads=1, cache_type_k="f32", cache_type_v="f32").logits(ids)
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel < 5e-2, rel
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.75


# ---------------------------------------------------------------- types edgeq cannot compute

def _with_type(src: Path, dst: Path, name: str, qtype: str) -> Path:
    """A copy of the model file where tensor `name` holds random bytes typed `qtype` (same shape)."""
    rng = np.random.default_rng(0)
    tensors = []
    with GGUFFile(src) as gf:
        metadata = {k: v for k, v in gf.metadata.items() if k not in ("general.architecture", "general.alignment")}
        types = {k: gf.metadata_types[k] for k in metadata}
        for n, t in gf.tensors.items():
            if n == name:
                block_elems, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
                nbytes = int(np.prod(t.shape)) // block_elems * block_bytes
                tensors.append((n, qtype, tuple(t.shape), rng.integers(0, 256, nbytes, dtype=np.uint8)))
            else:
                tensors.append((n, t.qtype, tuple(t.shape), np.array(t.data)))
        arch = gf.arch
    write_gguf(dst, arch, metadata, tensors, types)
    return dst


@pytest.fixture(scope="module")
def iq2_file(f16_file, tmp_path_factory) -> Path:
    return _with_type(f16_file, tmp_path_factory.mktemp("iq2") / "iq2.gguf", "blk.2.ffn_up.weight", "IQ2_XXS")


def _one_line(capsys, verb: str) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"edgeq {verb}: "), lines
    return lines[0]


@pytest.mark.parametrize("verb,extra", [("run", ["-p", "hi", "-n", "1"]), ("bench", ["-p", "8", "-n", "2", "-t", "1"]),
                                         ("perplexity", ["-f", "TEXT"]), ("chat", [])])
def test_unsupported_type_is_one_line_at_load(iq2_file, tmp_path, capsys, verb, extra):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    rc = cli([verb, str(iq2_file), *[str(text) if e == "TEXT" else e for e in extra]])
    assert rc != 0
    line = _one_line(capsys, verb)
    assert "blk.2.ffn_up.weight is IQ2_XXS" in line and "cannot compute" in line and "IQ4_XS" in line, line


@pytest.mark.parametrize("qtype", UNSUPPORTED)
def test_every_unsupported_type_is_named(f16_file, tmp_path, qtype):
    from edgeq.errors import ModelError
    from edgeq.runtime.engine import load

    path = _with_type(f16_file, tmp_path / "x.gguf", "blk.0.attn_q.weight", qtype)
    with pytest.raises(ModelError, match=f"blk.0.attn_q.weight is {qtype}, a type edgeq cannot compute"):
        load(path, n_ctx=64)


def test_unsupported_type_as_quantize_input(iq2_file, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert cli(["quantize", str(iq2_file), str(out), "--type", "Q8_0", "-q"]) != 0
    line = _one_line(capsys, "quantize")
    assert "IQ2_XXS" in line and "cannot decode" in line, line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_inspect_lists_unsupported_tensors(iq2_file, capsys):
    assert cli(["inspect", str(iq2_file)]) == 0
    assert "1 IQ2_XXS" in capsys.readouterr().out
    assert cli(["inspect", str(iq2_file), "--tensors"]) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if "blk.2.ffn_up.weight" in ln]
    assert len(row) == 1 and "IQ2_XXS" in row[0]


def test_iq4_registry_and_kernels_agree():
    from edgeq.cpu_kernels import simd
    from edgeq.cpu_kernels.linear import SUPPORTED

    for q in ("IQ4_NL", "IQ4_XS"):
        assert q in QTYPES and q in SUPPORTED and q in simd.ROW_DOTS
    assert not set(UNSUPPORTED) & (set(QTYPES) | set(SUPPORTED))
    assert sys.modules["edgeq.formats.quants"].KVALUES_IQ4NL.tolist() == [
        -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def test_iq4_recipe_rules():
    from edgeq.convert.mixes import Recipe

    r = Recipe("IQ4_XS", 32, n_gqa=4)
    assert r.choose("blk.5.ffn_up.weight", (1536, 576)) == "IQ4_NL"      # rows of 576: llama.cpp's fallback
    assert r.choose("blk.5.attn_v.weight", (256, 2048)) == "Q5_K"
    assert r.choose("blk.3.ffn_down.weight", (2048, 5632)) == "Q5_K"      # first eighth, no imatrix
    assert r.choose("blk.4.ffn_down.weight", (2048, 5632)) == "IQ4_XS"
    r = Recipe("IQ4_NL", 32, n_gqa=2, has_imatrix=True)
    assert r.choose("blk.5.attn_v.weight", (256, 2048)) == "IQ4_NL"
    assert r.choose("blk.0.ffn_down.weight", (2048, 5632)) == "IQ4_NL"
    assert r.choose("output.weight", (32000, 2048)) == "Q6_K"

"""`edgeq quantize IN.gguf OUT.gguf --type T`: requantize a GGUF file, metadata copied, recipe applied."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from edgeq.convert import mixes  # noqa: E402
from edgeq.cli import main as cli  # noqa: E402
from edgeq.convert.hf_checkpoint import materialize_from_gguf  # noqa: E402
from test_convert import HF_CACHE, _has_quants, needs_quants  # noqa: E402


def _has_kquants() -> bool:
    try:
        from edgeq.formats.quants import quantize

        quantize(np.ones((1, 256), np.float32), "Q4_K")
        return True
    except Exception:
        return False


needs_kquants = pytest.mark.skipif(not _has_kquants(), reason="k-quant quantizers not available yet")


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory, smollm2_path) -> Path:
    """A tiny random llama checkpoint converted to F32."""
    from test_convert import make_tiny

    hf = materialize_from_gguf(smollm2_path, HF_CACHE / "SmolLM2-135M-Instruct")
    root = tmp_path_factory.mktemp("q")
    src = make_tiny("llama", root / "llama", hf, seed=3)
    out = root / "llama-f32.gguf"
    assert cli(["convert", str(src), "-o", str(out), "--type", "F32", "-q"]) == 0
    return out


def _fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def _dequant(path) -> dict[str, np.ndarray]:
    from edgeq.formats.gguf_file import GGUFFile
    from edgeq.formats.quants import dequantize

    with GGUFFile(path) as gf:
        return {n: dequantize(t.data, t.qtype, tuple(t.shape)) for n, t in gf.tensors.items()}


@needs_quants
def test_requantize_to_q8_0_copies_metadata(f32_file, tmp_path):
    out = tmp_path / "q8.gguf"
    assert cli(["quantize", str(f32_file), str(out), "--type", "Q8_0", "-q"]) == 0
    a, b = _fields(f32_file), _fields(out)
    assert b["general.file_type"] == int(mixes.FILE_TYPES["Q8_0"][0])
    assert {k: v for k, v in a.items() if k != "general.file_type"} == \
           {k: v for k, v in b.items() if k != "general.file_type"}
    r = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    x, y = _dequant(f32_file), _dequant(out)
    for n in x:
        scale = np.abs(x[n]).max()
        assert np.abs(x[n] - y[n]).max() <= scale / 127 + 1e-7, n


@needs_quants
def test_requantize_f16_pure_and_overrides(f32_file, tmp_path):
    out = tmp_path / "mix.gguf"
    assert cli(["quantize", str(f32_file), str(out), "--type", "Q4_0", "--pure", "--output-type", "Q8_0",
                "--embedding-type", "F16", "-q"]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "F16"
    assert {types[n] for n in types if n.startswith("blk.") and not n.endswith("norm.weight")} == {"Q4_0"}


@needs_kquants
@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K", "Q5_K_S"])
def test_requantize_k_mixes(f32_file, tmp_path, qtype):
    out = tmp_path / f"{qtype}.gguf"
    assert cli(["quantize", str(f32_file), str(out), "--type", qtype, "-q"]) == 0
    rec = mixes.Recipe(qtype, n_layer=2, n_gqa=2, tied=False)
    for t in gguf.GGUFReader(out).tensors:
        assert t.tensor_type.name == rec.choose(t.name, tuple(int(d) for d in t.shape[::-1])), t.name


@pytest.mark.parametrize("case", ["missing", "not_gguf", "no_dir"])
def test_bad_input(tmp_path, capsys, case, request):
    src, out = tmp_path / "in.gguf", tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    if case == "not_gguf":
        if not _has_quants():
            pytest.skip("edgeq.formats not importable yet")
        src.write_bytes(b"this is not a gguf file at all" * 10)
    elif case == "no_dir":
        if not _has_quants():
            pytest.skip("edgeq.formats not importable yet")
        src, out = request.getfixturevalue("f32_file"), tmp_path / "nowhere" / "o.gguf"
    rc = cli(["quantize", str(src), str(out), "--type", "Q8_0", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0 and err, err
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
@needs_kquants
def test_requantize_real_gemma3(gemma3_path, tmp_path):
    """llama.cpp's gemma-3-270m Q4_K_M → Q8_0 → Q4_K_M: same tensor types as llama.cpp chose."""
    q8, q4 = tmp_path / "g-q8.gguf", tmp_path / "g-q4.gguf"
    assert cli(["quantize", str(gemma3_path), str(q8), "--type", "Q8_0", "-q"]) == 0
    assert cli(["quantize", str(q8), str(q4), "--type", "Q4_K_M", "-q"]) == 0
    ours = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q4).tensors}
    theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gemma3_path).tensors}
    assert ours == theirs

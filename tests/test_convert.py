"""`edgeq convert`: tiny random HF checkpoints of each architecture → GGUF, read back and run.

Checkpoints are made by transformers (random init, tiny configs) into a session temp folder; the
SmolLM2 tokenizer files come from the real checkpoint that `hf_smollm2` materializes once from the
real GGUF into ~/.cache/edgeq/hf (outside the repo). Gemma 3 gets a small SentencePiece-style
(byte-fallback BPE) tokenizer built here with `tokenizers`.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgeq.convert import hf_to_gguf, imatrix, mixes  # noqa: E402
from edgeq.cli import main as cli  # noqa: E402
from edgeq.convert.hf_checkpoint import HFCheckpoint, materialize_from_gguf  # noqa: E402

HF_CACHE = Path(os.environ.get("EDGEQ_HF_CACHE", Path.home() / ".cache" / "edgeq" / "hf"))
# the AMX build of llama-cpp-python in ~/.cache/edgeq-llamacpp crashes on quantized types on this CPU (it
# does on llama.cpp's own files too); the -noamx build is preferred when present
LLAMACPP_PY = next((p for p in (Path(os.environ.get("EDGEQ_LLAMACPP_PY", "/nonexistent")),
                                Path.home() / ".cache" / "edgeq-llamacpp-noamx" / "bin" / "python",
                                Path.home() / ".cache" / "edgeq-llamacpp" / "bin" / "python") if p.is_file()),
                   Path("/nonexistent"))
TEXT = ("When shall we three meet again in thunder, lightning, or in rain? When the hurlyburly's done, "
        "when the battle's lost and won. That will be ere the set of sun. 1234 56789 ") * 4


def _has_quants() -> bool:
    try:
        from edgeq.formats.quants import quantize  # noqa: F401
        return True
    except ImportError:
        return False


needs_quants = pytest.mark.skipif(not _has_quants(), reason="edgeq.formats.quants not available yet")


# ------------------------------------------------------------------------------------------------
# fixtures: checkpoints
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path) -> Path:
    """The real SmolLM2-135M-Instruct as an fp32 HF checkpoint (made once from the GGUF by transformers)."""
    return materialize_from_gguf(smollm2_path, HF_CACHE / "SmolLM2-135M-Instruct")


def _tiny_config(arch: str, vocab: int, **sizes):
    """sizes: overrides of the common sizes (hidden_size, intermediate_size, num_attention_heads, ...)."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-5)
    common.update(sizes)
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                        rope_theta=10000.0)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                        rope_theta=10000.0)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, **ids, head_dim=32, tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "qwen3moe":  # 4 experts of 32, 2 per token
        return transformers.Qwen3MoeConfig(**common, **ids, head_dim=32, tie_word_embeddings=True, num_experts=4,
                                           num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "llama3":  # Llama 3.x rope scaling, its original context (64) shorter than LONG_IDS
        return transformers.LlamaConfig(**common, **ids, tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))
    if arch == "smollm3":  # 4 layers: the 4th has no RoPE
        return transformers.SmolLM3Config(**{**common, "num_hidden_layers": 4}, **ids, tie_word_embeddings=True,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "phi3":  # LongRoPE over half of each head; original context 64 < LONG_IDS
        return transformers.Phi3Config(**common, **ids, tie_word_embeddings=True, original_max_position_embeddings=64,
                                       partial_rotary_factor=0.5, rope_parameters=dict(
                                           rope_type="longrope", rope_theta=10000.0,
                                           short_factor=[1.0 + 0.1 * i for i in range(8)],
                                           long_factor=[1.0 + 0.7 * i for i in range(8)]))
    if arch == "granite":
        return transformers.GraniteConfig(**common, **ids, tie_word_embeddings=False, embedding_multiplier=12.0,
                                          attention_multiplier=0.1, residual_multiplier=0.3, logits_scaling=4.0,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    # head_dim 32: edgeq's attention kernels work on 32-wide blocks.
    # llama.cpp fixes Gemma 3's pattern (5 sliding-window layers, then a global one): 6 layers cover it,
    # and a 4-token window is narrower than the test prompts
    return transformers.Gemma3TextConfig(**{**common, "rms_norm_eps": 1e-6, "num_hidden_layers": 6}, head_dim=32,
                                         sliding_window=4, query_pre_attn_scalar=32, bos_token_id=2,
                                         eos_token_id=1, pad_token_id=0)


def _spm_style_tokenizer(folder: Path) -> int:
    """A Gemma-like tokenizer.json: byte-fallback BPE over '▁'-joined words, <0xNN> byte tokens."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train_from_iterator([TEXT, TEXT.upper(), "abcdefghijklmnopqrstuvwxyz 0123456789"], trainer)
    data = json.loads(tok.to_str())
    for t in data["added_tokens"]:
        t["special"] = t["content"] in specials
    data["added_tokens"] = [t for t in data["added_tokens"] if t["special"]]
    data["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}}
    data["decoder"] = {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"},
                                                         "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]}
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
         "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": "{{ bos_token }}{% for m in messages %}"
         "{{ m['content'] }}{% endfor %}"}), encoding="utf-8")
    return len(data["model"]["vocab"])


def make_tiny(arch: str, folder: Path, smollm2_dir: Path | None, seed: int = 0, sizes: dict | None = None,
              **save_kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if arch == "gemma3":
        vocab = _spm_style_tokenizer(folder)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (smollm2_dir / name).is_file():
                shutil.copy(smollm2_dir / name, folder / name)
        vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = _tiny_config(arch, vocab, **(sizes or {}))
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "gemma3": transformers.Gemma3ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
           "llama3": transformers.LlamaForCausalLM, "smollm3": transformers.SmolLM3ForCausalLM,
           "granite": transformers.GraniteForCausalLM, "phi3": transformers.Phi3ForCausalLM,
           "qwen3moe": transformers.Qwen3MoeForCausalLM}[arch]
    model = cls(cfg).eval()
    with torch.no_grad():  # random norms, so that Gemma's +1 and every weight matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.0 if "gemma" in arch or name.endswith("bias") else 1.0, 0.1)
    model.save_pretrained(folder, **save_kwargs)
    return folder


class _Tiny(dict):
    """arch → checkpoint folder, made on first use."""

    def __init__(self, root: Path, smollm2_dir: Path):
        super().__init__()
        self.root, self.smollm2_dir = root, smollm2_dir

    def __missing__(self, arch: str) -> Path:
        # llama.cpp gives a model whose general.name (the folder's name) says phi3 Phi-3's SentencePiece token
        # attributes, and fails on a vocabulary without <s>, </s>, <unk>: this one is SmolLM2's BPE
        folder = self.root / ("tiny-longrope" if arch == "phi3" else arch)
        self[arch] = make_tiny(arch, folder, self.smollm2_dir)
        return self[arch]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, hf_smollm2):
    return _Tiny(tmp_path_factory.mktemp("tiny"), hf_smollm2)


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def convert(src, out, qtype="F32", *extra) -> int:
    return cli(["convert", str(src), "-o", str(out), "--type", qtype, "-q", *extra])


IDS = [1, 17, 250, 33, 9, 101, 47, 2, 300, 5, 64, 128]
LONG_IDS = [(i * 37 + 11) % 400 + 3 for i in range(96)]  # beyond the llama3 tiny model's original context (64)
# the architectures added after llama/qwen2/gemma3 (models/<arch>.py each): GGUF architecture of each tiny model
NEW_ARCHS = {"qwen3": "qwen3", "llama3": "llama", "smollm3": "smollm3", "granite": "granite", "phi3": "phi3",
             "qwen3moe": "qwen3moe"}


# ------------------------------------------------------------------------------------------------
# structure
# ------------------------------------------------------------------------------------------------

@needs_quants
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_convert_reads_back(tiny, tmp_path, arch, qtype):
    out = tmp_path / f"{arch}-{qtype}.gguf"
    assert convert(tiny[arch], out, qtype) == 0
    r = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    ckpt = HFCheckpoint(tiny[arch])
    hp = hf_to_gguf.read_hparams(ckpt)
    n_vocab = r.tensors[[t.name for t in r.tensors].index("token_embd.weight")].shape[1]
    want = hf_to_gguf.expected_shapes(hp, int(n_vocab))
    got = {t.name: tuple(int(d) for d in t.shape[::-1]) for t in r.tensors}
    assert got == want
    assert f["general.architecture"] == arch
    assert f["general.file_type"] == int(mixes.FILE_TYPES[qtype][0])
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
                "rope.freq_base"):
        assert f"{arch}.{key}" in f, key
    assert f[f"{arch}.block_count"] == (6 if arch == "gemma3" else 2) and f[f"{arch}.attention.head_count_kv"] == 1
    assert len(f["tokenizer.ggml.tokens"]) == n_vocab == len(f["tokenizer.ggml.token_type"])
    if arch == "gemma3":
        assert f["tokenizer.ggml.model"] == "llama" and len(f["tokenizer.ggml.scores"]) == n_vocab
        assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.bos_token_id"] == 2
        assert f["gemma3.attention.key_length"] == 32 and f["gemma3.attention.sliding_window"] == 4
        assert "<0x41>" in f["tokenizer.ggml.tokens"]
        i = f["tokenizer.ggml.tokens"].index("<0x41>")
        assert f["tokenizer.ggml.token_type"][i] == 6  # BYTE
    else:
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
        assert len(f["tokenizer.ggml.merges"]) > 1000
        assert f["tokenizer.ggml.add_bos_token"] is False
        assert f["tokenizer.ggml.eos_token_id"] == 2
        assert "<|im_start|>" in f["tokenizer.chat_template"]
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert all(types[n] == "F32" for n in types if n.endswith("norm.weight") or n.endswith(".bias"))
    assert types["blk.0.ffn_down.weight"] == qtype
    if arch == "qwen2":
        assert "blk.1.attn_k.bias" in types and "output.weight" not in types
    if arch == "llama":
        assert "output.weight" in types


@needs_quants
def test_tensor_layouts_are_llama_cpp_s(tiny, tmp_path):
    """F32 is exact: llama's Q/K rows permuted, Gemma's norms +1, everything else as stored."""
    from edgeq.formats.gguf_file import GGUFFile
    from edgeq.formats.quants import dequantize

    for arch in ("llama", "gemma3", "qwen2"):
        out = tmp_path / f"{arch}.gguf"
        assert convert(tiny[arch], out) == 0
        ck = HFCheckpoint(tiny[arch])
        with GGUFFile(out) as gf:
            def t(name):
                ti = gf.tensors[name]
                return dequantize(ti.data, ti.qtype, ti.shape)
            q, k = ck.load("model.layers.1.self_attn.q_proj.weight"), ck.load("model.layers.1.self_attn.k_proj.weight")
            if arch == "llama":
                np.testing.assert_array_equal(t("blk.1.attn_q.weight"), hf_to_gguf.permute_qk(q, 2))
                np.testing.assert_array_equal(t("blk.1.attn_k.weight"), hf_to_gguf.permute_qk(k, 1))
                assert not np.array_equal(t("blk.1.attn_q.weight"), q)
            else:
                np.testing.assert_array_equal(t("blk.1.attn_q.weight"), q)
            norm = ck.load("model.layers.0.input_layernorm.weight")
            np.testing.assert_array_equal(t("blk.0.attn_norm.weight"), norm + (1 if arch == "gemma3" else 0))
            np.testing.assert_array_equal(t("blk.0.ffn_down.weight"), ck.load("model.layers.0.mlp.down_proj.weight"))


def test_permute_matches_reference_formula():
    """LlamaModel.permute from convert_hf_to_gguf.py, written out with explicit loops."""
    n_head, hd, d = 3, 8, 5
    w = np.arange(n_head * hd * d, dtype=np.float32).reshape(n_head * hd, d)
    p = hf_to_gguf.permute_qk(w, n_head)
    for h in range(n_head):
        for i in range(hd // 2):
            np.testing.assert_array_equal(p[h * hd + 2 * i], w[h * hd + i])
            np.testing.assert_array_equal(p[h * hd + 2 * i + 1], w[h * hd + hd // 2 + i])


@needs_quants
def test_sharded_checkpoint_equals_single(tiny, tmp_path, hf_smollm2):
    sharded = make_tiny("llama", tmp_path / "sharded", hf_smollm2, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert convert(tiny["llama"], a) == 0 and convert(sharded, b) == 0
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert ta.name == tb.name
        np.testing.assert_array_equal(np.asarray(ta.data), np.asarray(tb.data))


def test_bf16_and_f16_sources_read(tmp_path, hf_smollm2):
    folder = make_tiny("qwen2", tmp_path / "bf16", hf_smollm2)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    ck = HFCheckpoint(folder)
    e = ck.tensors["model.layers.0.mlp.up_proj.weight"]
    assert e.dtype == "BF16"
    np.testing.assert_array_equal(ck.load(e.name), model.model.layers[0].mlp.up_proj.weight.detach().float().numpy())


# ------------------------------------------------------------------------------------------------
# numerics: edgeq's runtime and llama.cpp against transformers
# ------------------------------------------------------------------------------------------------

def _edgeq_logits(path: Path, ids: list[int], n_ctx: int = 64) -> np.ndarray:
    engine = pytest.importorskip("edgeq.runtime.engine")
    return engine.load(str(path), n_ctx=n_ctx, threads=1, cache_type_k="f32", cache_type_v="f32").logits(ids)


@needs_quants
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("qtype,tol", [("F32", 1e-4), ("F16", 3e-3), ("Q8_0", 6e-2)])
def test_edgeq_logits_match_transformers(tiny, tmp_path, arch, qtype, tol):
    out = tmp_path / f"{arch}.gguf"
    assert convert(tiny[arch], out, qtype) == 0
    ids = IDS if arch != "gemma3" else [2] + [i % 400 for i in IDS[1:]]
    ref = hf_logits(tiny[arch], ids)
    got = _edgeq_logits(out, ids)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < tol, f"{arch} {qtype}: max relative error {rel:.2e}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= (1.0 if qtype == "F32" else 0.9)


_LLAMACPP_LOGITS = r"""
import sys, json, numpy as np, llama_cpp
m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[4]) if len(sys.argv) > 4 else 64, logits_all=True, verbose=False, n_threads=1,
                    type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # f32 KV: exact comparison
ids = json.loads(sys.argv[2]); m.eval(ids)
np.save(sys.argv[3], np.array(m.scores[:len(ids)], dtype=np.float32))
"""


@pytest.mark.skipif(not LLAMACPP_PY.is_file(), reason="llama-cpp-python venv not built (~/.cache/edgeq-llamacpp)")
@needs_quants
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("qtype,tol", [("F32", 1e-3), ("Q8_0", 6e-2)])
def test_llamacpp_runs_our_files(tiny, tmp_path, arch, qtype, tol):
    out = tmp_path / f"{arch}.gguf"
    assert convert(tiny[arch], out, qtype) == 0
    ids = IDS if arch != "gemma3" else [2] + [i % 400 for i in IDS[1:]]
    npy = tmp_path / "logits.npy"
    subprocess.run([str(LLAMACPP_PY), "-c", _LLAMACPP_LOGITS, str(out), json.dumps(ids), str(npy)],
                   check=True, timeout=300)
    got, ref = np.load(npy), hf_logits(tiny[arch], ids)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < tol, f"llama.cpp on {arch} {qtype}: max relative error {rel:.2e}"


# ------------------------------------------------------------------------------------------------
# bad inputs: one clear line, nothing written
# ------------------------------------------------------------------------------------------------

def _run_cli(args, capsys) -> tuple[int, str]:
    rc = cli(args)
    return rc, capsys.readouterr().err.strip()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["no_config", "no_tokenizer", "bad_arch", "bad_shape", "truncated",
                                  "missing_tensor", "corrupt_header", "no_output_dir", "not_a_repo"])
def test_bad_inputs_fail_cleanly(tiny, tmp_path, capsys, case):
    src = _copy(tiny["qwen2"], tmp_path / "src")
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "m.gguf"
    st = src / "model.safetensors"
    expect = {"no_config": "config.json is missing", "no_tokenizer": "no tokenizer",
              "bad_arch": "unsupported architecture", "bad_shape": "has shape", "truncated": "truncated",
              "missing_tensor": "missing tensors", "corrupt_header": "corrupt", "no_output_dir": "does not exist",
              "not_a_repo": "not in the local Hugging Face cache"}[case]
    if case == "no_config":
        (src / "config.json").unlink()
    elif case == "no_tokenizer":
        (src / "tokenizer.json").unlink()
    elif case == "bad_arch":
        cfg = json.loads((src / "config.json").read_text())
        cfg["architectures"] = ["MambaForCausalLM"]
        (src / "config.json").write_text(json.dumps(cfg))
    elif case == "bad_shape":
        cfg = json.loads((src / "config.json").read_text())
        cfg["intermediate_size"] = 96
        (src / "config.json").write_text(json.dumps(cfg))
    elif case == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[:-1000])
    elif case == "missing_tensor":
        from safetensors.numpy import load_file, save_file

        t = load_file(st)
        del t["model.layers.1.mlp.up_proj.weight"]
        save_file(t, st, metadata={"format": "pt"})
    elif case == "corrupt_header":
        data = bytearray(st.read_bytes())
        data[10:20] = b"\xff" * 10
        st.write_bytes(bytes(data))
    elif case == "no_output_dir":
        out = tmp_path / "nowhere" / "m.gguf"
    elif case == "not_a_repo":
        src = "edgeq-test/not-a-cached-repo"
    rc, err = _run_cli(["convert", str(src), "-o", str(out), "--type", "Q8_0", "-q"], capsys)
    assert rc == 1
    assert err.count("\n") == 0 and expect in err, err
    assert list(outdir.iterdir()) == []


@needs_quants
def test_interrupt_leaves_nothing(tiny, tmp_path, monkeypatch):
    import edgeq.formats.quants as quants

    real, calls = quants.quantize, []

    def flaky(x, q, importance=None):
        calls.append(q)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(x, q, importance)

    monkeypatch.setattr(quants, "quantize", flaky)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    assert cli(["convert", str(tiny["llama"]), "-o", str(out), "--type", "Q8_0", "-q"]) == 130
    assert list(out.parent.iterdir()) == []


def test_unknown_type_is_an_argparse_error(tiny, tmp_path):
    with pytest.raises(SystemExit):
        cli(["convert", str(tiny["llama"]), "-o", str(tmp_path / "x.gguf"), "--type", "Q9_K"])


# ------------------------------------------------------------------------------------------------
# vocabulary details
# ------------------------------------------------------------------------------------------------

def test_pre_tokenizer_fingerprint(hf_smollm2):
    ck = HFCheckpoint(hf_smollm2)
    assert hf_to_gguf.bpe_pre_name(ck.tokenizer_json) == "smollm"
    tj = dict(ck.tokenizer_json)
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": hf_to_gguf._QWEN2_RE}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    assert hf_to_gguf.bpe_pre_name(tj) == "qwen2"


def test_smollm2_vocab_matches_llama_cpp_file(hf_smollm2, smollm2_path):
    """Tokens, types, merges, special ids as in the GGUF llama.cpp's converter wrote."""
    conv = hf_to_gguf.plan(HFCheckpoint(hf_smollm2))
    md = {k: v for k, v, *_ in conv.metadata(1)}
    real = {k: f.contents() for k, f in gguf.GGUFReader(smollm2_path).fields.items()}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template", "llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.vocab_size", "llama.rope.dimension_count"):
        assert md[key] == real[key], key
    assert md["llama.rope.freq_base"] == pytest.approx(real["llama.rope.freq_base"])


# ------------------------------------------------------------------------------------------------
# mixes
# ------------------------------------------------------------------------------------------------

def test_q4_k_m_mix_matches_llama_cpp_on_gemma3(gemma3_path):
    """Every tensor type of llama.cpp's own gemma-3-270m Q4_K_M file (640-wide rows: fallbacks)."""
    r = gguf.GGUFReader(gemma3_path)
    rec = mixes.Recipe("Q4_K_M", n_layer=18, n_gqa=4, tied=True)
    for t in r.tensors:
        assert rec.choose(t.name, tuple(int(d) for d in t.shape[::-1])) == t.tensor_type.name, t.name


def test_mix_rules():
    rec = mixes.Recipe("Q4_K_M", n_layer=32, n_gqa=4, tied=False)
    more = [i for i in range(32) if rec.choose(f"blk.{i}.ffn_down.weight", (4096, 11264)) == "Q6_K"]
    assert more == [i for i in range(32) if mixes.use_more_bits(i, 32)]
    assert more[:6] == [0, 1, 2, 3, 6, 9] and more[-4:] == [28, 29, 30, 31]
    assert rec.choose("blk.5.attn_v.weight", (1024, 4096)) == "Q4_K"
    assert rec.choose("blk.0.attn_v.weight", (1024, 4096)) == "Q6_K"
    assert rec.choose("blk.5.attn_q.weight", (4096, 4096)) == "Q4_K"
    assert rec.choose("output.weight", (32000, 4096)) == "Q6_K"
    assert rec.choose("token_embd.weight", (32000, 4096)) == "Q4_K"
    assert rec.choose("blk.5.attn_norm.weight", (4096,)) == "F32"
    assert rec.choose("blk.5.attn_q.bias", (4096,)) == "F32"
    # rows that are not whole 256-blocks fall back like llama.cpp
    assert rec.choose("blk.5.attn_q.weight", (576, 576)) == "Q5_0"
    assert rec.choose("blk.0.attn_v.weight", (192, 576)) == "Q8_0"
    assert rec.choose("output.weight", (49152, 576)) == "Q8_0"
    assert mixes.Recipe("Q5_K_S", 32).choose("blk.5.attn_q.weight", (576, 576)) == "Q5_1"
    assert mixes.Recipe("Q2_K", 32).choose("blk.5.ffn_up.weight", (1536, 576)) == "Q4_0"
    assert mixes.Recipe("Q8_0", 32).choose("blk.5.ffn_up.weight", (1536, 100)) == "F16"
    # tied embeddings get the classifier's type
    assert mixes.Recipe("Q4_K_M", 32, tied=True).choose("token_embd.weight", (32000, 4096)) == "Q6_K"
    # Q3_K_M / Q2_K specifics
    r3 = mixes.Recipe("Q3_K_M", 32)
    assert [r3.choose(f"blk.{i}.attn_v.weight", (1024, 4096)) for i in (0, 1, 2)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert r3.choose("blk.1.ffn_down.weight", (4096, 11264)) == "Q5_K"
    assert r3.choose("blk.9.ffn_down.weight", (4096, 11264)) == "Q4_K"
    assert r3.choose("blk.9.attn_output.weight", (4096, 4096)) == "Q4_K"
    r2 = mixes.Recipe("Q2_K", 32, n_gqa=4)
    assert r2.choose("blk.9.attn_v.weight", (1024, 4096)) == "Q4_K"
    assert r2.choose("blk.9.ffn_down.weight", (4096, 11264)) == "Q3_K"
    assert r2.choose("blk.9.ffn_up.weight", (11264, 4096)) == "Q2_K"


def test_pure_and_overrides():
    rec = mixes.Recipe("Q4_K_M", 32, pure=True, output_type="Q8_0", embedding_type="Q4_0")
    assert rec.choose("blk.0.attn_v.weight", (1024, 4096)) == "Q4_K"
    assert rec.choose("blk.0.ffn_down.weight", (4096, 11264)) == "Q4_K"
    assert rec.choose("output.weight", (32000, 4096)) == "Q8_0"
    assert rec.choose("token_embd.weight", (32000, 4096)) == "Q4_0"
    assert mixes.Recipe("F16", 4).choose("token_embd.weight", (100, 64)) == "F16"
    with pytest.raises(mixes.RecipeError):
        mixes.Recipe("Q4_K_X", 4)


# ------------------------------------------------------------------------------------------------
# importance matrix
# ------------------------------------------------------------------------------------------------

def test_imatrix_collect_save_load(tmp_path):
    im = imatrix.Imatrix(chunk_size=4, chunk_count=2, datasets=["macbeth"])
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(4, 8)).astype(np.float32) for _ in range(3)]
    for x in xs:
        im("blk.0.attn_q.weight", x)
    im("blk.0.ffn_down.weight", xs[0][:, :6])
    expect = np.mean(np.concatenate(xs) ** 2, axis=0)
    np.testing.assert_allclose(im.importance("blk.0.attn_q.weight", 8), expect, rtol=1e-6)
    path = tmp_path / "im.gguf"
    imatrix.save(im, path)
    r = gguf.GGUFReader(path)
    assert r.fields["general.type"].contents() == "imatrix"
    assert {t.name for t in r.tensors} == {"blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                                           "blk.0.ffn_down.weight.in_sum2", "blk.0.ffn_down.weight.counts"}
    back = imatrix.load(path)
    assert back.chunk_count == 2 and back.datasets == ["macbeth"] and back.counts["blk.0.attn_q.weight"] == 12
    np.testing.assert_allclose(back.importance("blk.0.attn_q.weight", 8), expect, rtol=1e-6)
    with pytest.raises(imatrix.ImatrixError):
        back.importance("blk.0.attn_q.weight", 7)


def test_imatrix_legacy_dat(tmp_path):
    vals = np.arange(1, 9, dtype=np.float32)
    name = b"blk.0.attn_k.weight"
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 10, 8) + vals.tobytes()
    blob += struct.pack("<i", 10) + struct.pack("<i", 4) + b"wiki"
    (tmp_path / "im.dat").write_bytes(blob)
    im = imatrix.load(tmp_path / "im.dat")
    np.testing.assert_allclose(im.importance("blk.0.attn_k.weight", 8), vals / 10)
    assert im.chunk_count == 10 and im.datasets == ["wiki"]
    (tmp_path / "bad.dat").write_bytes(b"\x00\x01")
    with pytest.raises(imatrix.ImatrixError):
        imatrix.load(tmp_path / "bad.dat")


@needs_quants
def test_calibrate_save_and_reuse(tiny, tmp_path):
    pytest.importorskip("edgeq.runtime.engine")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 20)
    im_path, a, b = tmp_path / "im.gguf", tmp_path / "a.gguf", tmp_path / "b.gguf"
    rc = cli(["convert", str(tiny["llama"]), "-o", str(a), "--type", "Q4_K_M", "-q", "--calibrate", str(text),
              "--chunks", "2", "--calib-ctx", "32", "--save-imatrix", str(im_path), "--method", "imatrix"])
    assert rc == 0
    im = imatrix.load(im_path)
    assert im.chunk_count == 2 and "blk.1.ffn_down.weight" in im.sums and im.counts["blk.0.attn_q.weight"] == 64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edgeq-calib")]
    assert cli(["convert", str(tiny["llama"]), "-o", str(b), "--type", "Q4_K_M", "-q", "--imatrix", str(im_path)]) == 0
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    for ta, tb in zip(ra.tensors, rb.tensors):
        np.testing.assert_array_equal(np.asarray(ta.data), np.asarray(tb.data))


@needs_quants
def test_calibrate_gptq_and_best(tiny, tmp_path):
    """--method gptq changes levels, never the block scales or the layout; best (the default) picks per
    matrix (where no AWQ scale was folded) and llama.cpp's reader (gguf-py) reads every file; --calibrate
    alone names the built-in text."""
    import argparse

    from edgeq.cli import quantize as quantize_verb
    from edgeq.convert.calibrate import DEFAULT_TEXT
    from edgeq.formats.quant_grid import decode

    pytest.importorskip("edgeq.runtime.engine")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 40)
    files = {}
    for method in ("imatrix", "gptq"):
        files[method] = tmp_path / f"{method}.gguf"
        assert cli(["convert", str(tiny["llama"]), "-o", str(files[method]), "--type", "Q2_K", "-q", "--calibrate",
                    str(text), "--chunks", "4", "--calib-ctx", "32", "--method", method]) == 0
    from edgeq.convert import QuantOptions, convert

    files["best"] = tmp_path / "best.gguf"
    best = convert(tiny["llama"], files["best"], options=QuantOptions(qtype="Q2_K", calibrate=str(text), chunks=4,
                                                                     calib_ctx=32, method="best"))
    r = {m: {t.name: t for t in gguf.GGUFReader(p).tensors} for m, p in files.items()}
    changed = 0
    for name, ti in r["imatrix"].items():
        tg = r["gptq"][name]
        assert tg.tensor_type == ti.tensor_type and tg.shape.tolist() == ti.shape.tolist()
        if ti.tensor_type.name in ("F32", "F16") or len(ti.shape) != 2:
            continue
        n_cols = int(ti.shape[0])
        ki, ai, bi = decode(np.asarray(ti.data).reshape(int(ti.shape[1]), -1), ti.tensor_type.name, n_cols)
        kg, ag, bg = decode(np.asarray(tg.data).reshape(int(tg.shape[1]), -1), tg.tensor_type.name, n_cols)
        np.testing.assert_array_equal(ag, ai)
        np.testing.assert_array_equal(bg, bi)
        changed += not np.array_equal(kg, ki)
    assert changed > 0
    folded = set(best["awq"]["folded"])   # tensors an AWQ scale changed (tests/test_awq.py)
    assert len(folded) < len(r["best"])
    for name, tb in r["best"].items():   # each other matrix of `best` is one of the two candidates
        if name in folded:
            continue
        data = np.asarray(tb.data)
        assert (np.array_equal(data, np.asarray(r["imatrix"][name].data))
                or np.array_equal(data, np.asarray(r["gptq"][name].data))), name
    p = argparse.ArgumentParser()
    quantize_verb.add_arguments(p)
    args = p.parse_args(["a.gguf", "b.gguf", "--type", "Q4_K_M", "--calibrate"])
    assert args.calibrate == DEFAULT_TEXT and args.method == "best"


@needs_quants
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("forward", [None, "Q8_0"])
def test_calibration_by_layer_sees_what_the_full_forward_sees(tiny, tmp_path, arch, forward):
    """Layer by layer (one layer's Hessians at a time, hidden states of every window kept between layers) the
    matrices see the inputs of a whole-model forward pass per window: the same importance and Hessians; each
    step holds its own layer's Hessians only, the last one the classifier's (no logits computed).
    forward="Q8_0" (calibrate.FORWARD_TYPE, the default): the float file's matrices run as Q8_0 copies, so the
    inputs are those of a full forward pass over the file quantized to Q8_0 by the converter (embedding kept), its
    matrices run as calibrate.forward_linear runs them (float tiles below its size floor: all of this tiny model's)."""
    from edgeq.convert import gptq
    from edgeq.convert.calibrate import FORWARD_TYPE, calibrate_by_layer, forward_linear
    from edgeq.models.base import all_linears
    from edgeq.runtime import engine

    assert FORWARD_TYPE == "Q8_0"
    f32 = tmp_path / "m.gguf"
    assert convert(tiny[arch], f32) == 0
    ref = f32
    if forward:
        ref = tmp_path / "q8.gguf"
        assert convert(tiny[arch], ref, forward, "--pure", "--embedding-type", "F32") == 0
    text = TEXT * 20
    model = engine.load(str(ref), n_ctx=32, threads=1)
    assert {lin.q.qtype for lin in (model.weights.layers[0].wq, model.weights.layers[0].w_down)} == {forward or "F32"}
    for lin in all_linears(model.weights.layers if forward else []):
        lin.q = forward_linear(lin.q.raw, lin.q.qtype, (lin.q.n_out, lin.q.n_in))
    tok = model.tokenizer
    full = imatrix.collect(lambda c, obs: model.collect_activations(c, obs), tok.encode(text, add_special=False),
                           n_ctx=32, n_chunks=4, bos_id=tok.bos_id if tok.add_bos else None,
                           hessians=gptq.Hessians())
    steps = []

    def on_layer(seen):
        layer = f"blk.{seen.index}." if seen.index < model.cfg.n_layer else ""
        assert seen.names and all(n.startswith(layer) for n in seen.names), seen.names
        assert set(seen.hessians.key_of) == set(seen.names)
        if not layer:   # the classifier reads every token (a forward pass only the last one's, for its logits)
            assert seen.names == [model.weights.output.name]
            assert seen.hessians.tokens[seen.names[0]] == [96, 32] and seen.imatrix.counts[seen.names[0]] == 128
            steps.append(seen.index)
            return
        for name in seen.names:
            for which in ("fit", "held"):
                np.testing.assert_allclose(seen.hessians.get(name, which), full.hessians.get(name, which),
                                           rtol=1e-4, atol=1e-3)
            assert seen.hessians.tokens[seen.hessians.key_of[name]] == [96, 32]
        steps.append(seen.index)

    im = calibrate_by_layer(f32, text, "t", 4, 32, 1, True, on_layer, forward_type=forward)
    assert steps == list(range(model.cfg.n_layer + 1))
    assert set(im.sums) == set(full.sums) and im.chunk_count == full.chunk_count == 4
    for name in set(full.sums) - {model.weights.output.name}:
        np.testing.assert_allclose(im.sums[name], full.sums[name], rtol=1e-5)
        assert im.counts[name] == full.counts[name]


# ------------------------------------------------------------------------------------------------
# the real model (slow)
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_quants
def test_smollm2_to_q4_k_m(hf_smollm2, tmp_path):
    import time

    out = tmp_path / "smollm2-q4_k_m.gguf"
    t0 = time.perf_counter()
    assert convert(hf_smollm2, out, "Q4_K_M") == 0
    seconds = time.perf_counter() - t0
    r = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == "Q8_0"  # tied, 576-wide rows: Q6_K does not fit
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.4.ffn_down.weight"] == "Q4_K"
    assert types["blk.4.attn_q.weight"] == "Q5_0"
    assert seconds < 60, f"conversion took {seconds:.1f}s"


@pytest.mark.slow
@needs_quants
def test_smollm2_f16_perplexity_matches_transformers(hf_smollm2, tmp_path, hamlet_path):
    """Same token windows, same scoring (second half of 512-token windows): within 0.1%."""
    engine = pytest.importorskip("edgeq.runtime.engine")
    out = tmp_path / "smollm2-f16.gguf"
    assert convert(hf_smollm2, out, "F16") == 0
    model = engine.load(str(out), n_ctx=512, cache_type_k="f32", cache_type_v="f32")  # weights are the question
    ids = model.tokenizer.encode(Path(hamlet_path).read_text(encoding="utf-8")[:60000], add_special=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_smollm2, dtype=torch.float32).eval()
    nll_e, nll_h = [], []
    for c in range(2):
        w = ids[c * 512:(c + 1) * 512]
        le = model.logits(w)[255:511].astype(np.float64)
        with torch.no_grad():
            lh = hf(torch.tensor([w])).logits[0, 255:511].double().numpy()
        tgt = np.array(w[256:512])
        for l, acc in ((le, nll_e), (lh, nll_h)):
            m = l.max(-1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(l - m).sum(-1)))
            acc.extend(lse - l[np.arange(len(tgt)), tgt])
    ppl_e, ppl_h = np.exp(np.mean(nll_e)), np.exp(np.mean(nll_h))
    print(f"edgeq F16 {ppl_e:.4f} vs transformers fp32 {ppl_h:.4f}")
    assert abs(ppl_e / ppl_h - 1) < 1e-3, (ppl_e, ppl_h)


@needs_quants
def test_hub_repo_id_from_local_cache(tiny, tmp_path, monkeypatch):
    """A repo id resolves through the local Hugging Face cache (snapshot_download, never the network)."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    snap = hub / "models--edgeq-test--tiny-qwen2" / "snapshots" / "0123abcd"
    shutil.copytree(tiny["qwen2"], snap)
    (hub / "models--edgeq-test--tiny-qwen2" / "refs").mkdir()
    (hub / "models--edgeq-test--tiny-qwen2" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "m.gguf"
    assert convert("edgeq-test/tiny-qwen2", out, "F16") == 0
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "qwen2"


# ------------------------------------------------------------------------------------------------
# the library API (no argparse): the same file as the verb
# ------------------------------------------------------------------------------------------------

@needs_quants
def test_library_convert_and_quantize_write_the_verbs_bytes(tiny, tmp_path):
    from edgeq.convert import QuantOptions, convert as lib_convert, quantize_file

    via_cli, via_lib = tmp_path / "cli.gguf", tmp_path / "lib.gguf"
    assert convert(tiny["llama"], via_cli, "Q8_0") == 0
    stats = lib_convert(tiny["llama"], via_lib, "Q8_0")
    assert via_lib.read_bytes() == via_cli.read_bytes()
    assert stats["types"] and stats["file_bytes"] == via_lib.stat().st_size

    q_cli, q_lib = tmp_path / "q-cli.gguf", tmp_path / "q-lib.gguf"
    assert cli(["quantize", str(via_cli), str(q_cli), "--type", "Q4_0", "--pure", "-q"]) == 0
    quantize_file(via_cli, q_lib, options=QuantOptions(qtype="Q4_0", pure=True))
    assert q_lib.read_bytes() == q_cli.read_bytes()


# ------------------------------------------------------------------------------------------------
# architectures added as one file each (models/<arch>.py): convert, run, compare, let llama.cpp run them
# ------------------------------------------------------------------------------------------------

@needs_quants
@pytest.mark.parametrize("name", list(NEW_ARCHS))
def test_new_arch_file_is_llama_cpp_s(tiny, tmp_path, name):
    """Tensor names, shapes and the arch's own keys as llama.cpp's converter writes them."""
    out = tmp_path / f"{name}.gguf"
    assert convert(tiny[name], out) == 0
    r = gguf.GGUFReader(out)
    f = {k: v.contents() for k, v in r.fields.items()}
    arch = NEW_ARCHS[name]
    assert f["general.architecture"] == arch
    names = {t.name: tuple(int(d) for d in t.shape[::-1]) for t in r.tensors}
    ours = set(names) - {"rope_freqs.weight"}
    kinds = gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]
    known = {gguf.TENSOR_NAMES[k].format(bid=i) + sfx for k in kinds for i in range(8) for sfx in (".weight", ".bias")}
    assert ours <= known, ours - known
    ck = HFCheckpoint(tiny[name])
    if name == "qwen3":
        assert names["blk.1.attn_k_norm.weight"] == (32,) and "blk.0.attn_q.bias" not in names
        assert f["qwen3.attention.key_length"] == 32
        np.testing.assert_array_equal(np.asarray(r.get_tensor(list(names).index("blk.1.attn_q_norm.weight")).data),
                                      ck.load("model.layers.1.self_attn.q_norm.weight"))
    if name == "llama3":
        factors = np.asarray(r.get_tensor(list(names).index("rope_freqs.weight")).data)
        assert factors.shape == (16,) and factors.min() == 1.0 and factors.max() == 8.0
    if name == "smollm3":
        assert f["smollm3.block_count"] == 4
    if name == "phi3":
        assert names["blk.0.attn_qkv.weight"] == (128, 64) and names["blk.0.ffn_up.weight"] == (256, 64)
        assert "blk.0.ffn_gate.weight" not in names and names["rope_factors_long.weight"] == (8,)
        assert f["phi3.rope.dimension_count"] == 16 and f["phi3.rope.scaling.original_context_length"] == 64
        assert f["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(4) / np.log(64)) ** 0.5)
    if name == "qwen3moe":
        assert names["blk.1.ffn_gate_exps.weight"] == (4, 32, 64) and names["blk.1.ffn_down_exps.weight"] == (4, 64, 32)
        assert names["blk.0.ffn_gate_inp.weight"] == (4, 64) and f["qwen3moe.expert_used_count"] == 2
        np.testing.assert_array_equal(np.asarray(r.get_tensor(list(names).index("blk.1.ffn_up_exps.weight")).data)[2],
                                      ck.load("model.layers.1.mlp.experts.2.up_proj.weight"))
    if name == "granite":
        scales = [f[f"granite.{k}"] for k in ("embedding_scale", "attention.scale", "residual_scale", "logit_scale")]
        assert scales == pytest.approx([12.0, 0.1, 0.3, 4.0])


@needs_quants
@pytest.mark.parametrize("name", list(NEW_ARCHS))
@pytest.mark.parametrize("qtype,tol", [("F32", 1e-4), ("Q8_0", 6e-2)])
def test_new_arch_logits_match_transformers(tiny, tmp_path, name, qtype, tol):
    """96 tokens: past the llama3 model's original context, and through every layer kind."""
    out = tmp_path / f"{name}.gguf"
    assert convert(tiny[name], out, qtype) == 0
    ref = hf_logits(tiny[name], LONG_IDS)
    got = _edgeq_logits(out, LONG_IDS, n_ctx=128)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < tol, f"{name} {qtype}: max relative error {rel:.2e}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= (1.0 if qtype == "F32" else 0.9)


@pytest.mark.skipif(not LLAMACPP_PY.is_file(), reason="llama-cpp-python venv not built (~/.cache/edgeq-llamacpp)")
@needs_quants
@pytest.mark.parametrize("name", list(NEW_ARCHS))
def test_llamacpp_runs_new_arch_files(tiny, tmp_path, name):
    out = tmp_path / f"{name}.gguf"
    assert convert(tiny[name], out) == 0
    npy = tmp_path / "logits.npy"
    subprocess.run([str(LLAMACPP_PY), "-c", _LLAMACPP_LOGITS, str(out), json.dumps(LONG_IDS), str(npy), "128"],
                   check=True, timeout=300)
    got, ref = np.load(npy), hf_logits(tiny[name], LONG_IDS)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1e-3, f"llama.cpp on {name}: max relative error {rel:.2e}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert (got.argmax(-1) == _edgeq_logits(out, LONG_IDS, n_ctx=128).argmax(-1)).all()


def test_smollm3_other_no_rope_pattern_is_refused(tiny, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny["smollm3"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["no_rope_layers"] = [1, 0, 1, 1]
    (src / "config.json").write_text(json.dumps(cfg))
    rc, err = _run_cli(["convert", str(src), "-o", str(tmp_path / "x.gguf"), "-q"], capsys)
    assert rc != 0 and "no_rope_layers" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()


@needs_quants
def test_phi3_short_context_uses_the_short_factors(tiny, tmp_path):
    """A context within the original 64 positions: transformers and edgeq both rotate with short_factor."""
    out = tmp_path / "phi3.gguf"
    assert convert(tiny["phi3"], out) == 0
    ref, got = hf_logits(tiny["phi3"], IDS), _edgeq_logits(out, IDS, n_ctx=64)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


@needs_quants
def test_qwen3moe_decode_reads_only_the_chosen_experts(tiny, tmp_path, monkeypatch):
    from edgeq.models import llama

    out = tmp_path / "moe.gguf"
    assert convert(tiny["qwen3moe"], out, "Q8_0") == 0
    engine = pytest.importorskip("edgeq.runtime.engine")
    model = engine.load(str(out), n_ctx=64, threads=1, cache_type_k="f32", cache_type_v="f32")
    gates = {id(g): (il, e) for il, L in enumerate(model.weights.layers) for e, g in enumerate(L.moe.gate)}
    used, real = [], llama.linears

    def recording(layers, x, observer=None):
        used.extend(gates[id(lin)] for lin in layers if id(lin) in gates)
        return real(layers, x, observer)

    monkeypatch.setattr(llama, "linears", recording)
    model.logits(IDS[:1])
    assert sorted(il for il, _ in used) == [0, 0, 1, 1]  # 2 of 4 experts in each of the 2 layers


@needs_quants
@pytest.mark.parametrize("name", list(NEW_ARCHS))
def test_new_arch_batched_decode_matches_one_sequence(tiny, tmp_path, name):
    """The server's batched decode step (forward_batch) follows every option of the family (q/k norms, layers
    without RoPE, LongRoPE tables, multipliers, experts): each row equals that sequence decoded alone."""
    import edgeq
    from edgeq.runtime.kv_cache import make_kv_cache

    out = tmp_path / f"{name}.gguf"
    assert convert(tiny[name], out, "F32") == 0
    m = edgeq.load(str(out), n_ctx=128, threads=1)
    prompts = [LONG_IDS[:70], IDS[:5], IDS[:9]]  # 70: past the llama3 model's original context
    caches = [make_kv_cache(m.cfg.kv_layouts(), 128, max_batch=96) for _ in range(6)]
    for c, ids in zip(caches, prompts + prompts):
        m.arch.forward(m.weights, m.cfg, np.asarray(ids, np.int64), 0, c)
    nxt = np.array([7, 8, 9])
    batch = m.arch.forward_batch(m.weights, m.cfg, nxt, np.array([len(p) for p in prompts]), caches[:3])
    for i, ids in enumerate(prompts):
        one = m.arch.forward(m.weights, m.cfg, nxt[i:i + 1], len(ids), caches[3 + i])[0]
        assert np.abs(batch[i] - one).max() < 1e-3 * np.abs(one).max(), name

"""AWQ scaling folded into the graph (edgeq/convert/awq.py): the fold leaves the float network's logits
unchanged (llama with GQA, qwen2 with a v bias, gemma3 with its norms stored as 1 + w), the search scales
salient channels when that lowers the quantized output error, unfoldable architectures are refused, and
`--method awq-gptq` writes a standard file of the same tensor set."""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from edgeq.convert import awq  # noqa: E402

VOCAB = 64
IDS = [ord(c) for c in "12+34=46; 5*6=30. 7-2=5,"]
N_EMBD, N_FF, N_HEAD, N_KV, HD = 64, 96, 4, 2, 32


def tiny_f32(path, arch: str, seed: int = 0, norms: dict | None = None):
    """A random float32 `arch` model (llama, qwen2 or gemma3): 2 layers, 4 query heads on 2 KV heads of 32
    dims (each KV head shared by two q heads), a byte-level vocabulary of 64 tokens. `norms` overrides
    tensors by name (e.g. folded ones)."""
    from edgeq.runtime.tokenizer import BYTE_TO_CHAR

    rng = np.random.default_rng(seed)
    gemma = arch == "gemma3"
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in [("embedding_length", N_EMBD), ("block_count", 2), ("feed_forward_length", N_FF),
                 ("attention.head_count", N_HEAD), ("attention.head_count_kv", N_KV), ("context_length", 64),
                 ("attention.key_length", HD), ("attention.value_length", HD)]:
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    if gemma:
        w.add_uint32(f"{arch}.attention.sliding_window", 3)
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", 2)
        w.add_float32(f"{arch}.rope.freq_base_swa", 100.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([BYTE_TO_CHAR[b] for b in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_eos_token_id(0)
    tensors = {}

    def matrix(name, n_out, n_in, std=None):
        tensors[name] = (rng.standard_normal((n_out, n_in)) * (std or n_in ** -0.5)).astype(np.float32)

    def vector(name, n, base=1.0):
        tensors[name] = (base + 0.3 * rng.standard_normal(n)).astype(np.float32)

    matrix("token_embd.weight", VOCAB, N_EMBD, std=1.0)
    for i in range(2):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", N_EMBD)
        matrix(p + "attn_q.weight", N_HEAD * HD, N_EMBD)
        matrix(p + "attn_k.weight", N_KV * HD, N_EMBD)
        matrix(p + "attn_v.weight", N_KV * HD, N_EMBD)
        matrix(p + "attn_output.weight", N_EMBD, N_HEAD * HD)
        vector(p + "ffn_norm.weight", N_EMBD)
        matrix(p + "ffn_gate.weight", N_FF, N_EMBD)
        matrix(p + "ffn_up.weight", N_FF, N_EMBD)
        matrix(p + "ffn_down.weight", N_EMBD, N_FF)
        if arch == "qwen2":
            for t, n in (("attn_q", N_HEAD * HD), ("attn_k", N_KV * HD), ("attn_v", N_KV * HD)):
                vector(p + t + ".bias", n, base=0.0)
        if gemma:
            for t, n in (("attn_q_norm", HD), ("attn_k_norm", HD), ("post_attention_norm", N_EMBD),
                         ("post_ffw_norm", N_EMBD)):
                vector(p + t + ".weight", n)
    vector("output_norm.weight", N_EMBD)
    if not gemma:
        matrix("output.weight", VOCAB, N_EMBD)
    tensors.update(norms or {})
    for name, x in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def logits(path) -> np.ndarray:
    from edgeq.runtime import engine

    # float KV cache: a block-quantized V cache sees v's rows at their new scale (the float graph is what must match)
    return engine.load(str(path), n_ctx=64, threads=1, cache_type_k="f32", cache_type_v="f32").logits(IDS)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_fold_keeps_float_logits(arch, tmp_path):
    """Every group folded with random scales (spread over 100×): same logits to float tolerance."""
    tensors = tiny_f32(tmp_path / "a.gguf", arch)
    shapes = {n: x.shape for n, x in tensors.items()}
    gs = awq.groups(arch, shapes, N_HEAD, N_KV)
    assert {g.producer.split(".", 2)[2] for g in gs} == {"attn_norm.weight", "ffn_norm.weight", "attn_v.weight",
                                                         "ffn_up.weight"}
    rng = np.random.default_rng(1)
    cur = dict(tensors)
    for g in gs:
        s = np.exp(rng.uniform(-2.3, 2.3, cur[g.producer].shape[0]))
        p, readers, bias = awq.fold(cur[g.producer], [cur[r] for r in g.readers], s, g.col_index,
                                    cur[g.producer_bias] if g.producer_bias else None)
        cur[g.producer] = p
        cur.update(zip(g.readers, readers))
        if bias is not None:
            cur[g.producer_bias] = bias
    assert not np.allclose(cur["blk.0.attn_norm.weight"], tensors["blk.0.attn_norm.weight"])
    folded = {n: x for n, x in cur.items() if not np.array_equal(x, tensors[n])}
    tiny_f32(tmp_path / "b.gguf", arch, norms=folded)
    ref, got = logits(tmp_path / "a.gguf"), logits(tmp_path / "b.gguf")
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_gqa_index_maps_o_columns_to_their_kv_head():
    """With 4 q heads on 2 KV heads, o's columns of q heads 0-1 read v rows of KV head 0, 2-3 of head 1."""
    shapes = {"blk.0.attn_v.weight": (N_KV * HD, N_EMBD), "blk.0.attn_output.weight": (N_EMBD, N_HEAD * HD)}
    (g,) = awq.groups("llama", shapes, N_HEAD, N_KV)
    assert g.col_index.shape == (N_HEAD * HD,)
    np.testing.assert_array_equal(g.col_index[:2 * HD], np.tile(np.arange(HD), 2))
    np.testing.assert_array_equal(g.col_index[2 * HD:], HD + np.tile(np.arange(HD), 2))


@pytest.mark.parametrize("arch", ["phi3", "qwen3moe", "mamba"])
def test_unfoldable_architectures_are_refused(arch):
    with pytest.raises(awq.AwqError, match=f"cannot be folded into {arch}: .+"):
        awq.check_arch(arch)


def _salient_case(seed=0, n_in=256, rows=64, tokens=2048):
    """Inputs with a few channels 30× larger than the rest (AWQ's setting) and weights of one scale."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((tokens, n_in)).astype(np.float32)
    X[:, :8] *= 30.0
    W = rng.standard_normal((rows, n_in)).astype(np.float32)
    H_fit = X[:tokens // 2].T.astype(np.float64) @ X[:tokens // 2]
    H_judge = X[tokens // 2:].T.astype(np.float64) @ X[tokens // 2:]
    return W, H_fit, H_judge, tokens // 2


@pytest.mark.parametrize("qtype", ["Q4_K", "Q2_K"])
def test_search_scales_salient_channels(qtype):
    """Round-to-nearest (no importance): scaling the loud channels up lowers the output error, so α > 0
    and its error is well below α = 0's."""
    from edgeq.formats.quants import dequantize, quantize

    W, H_fit, H_judge, n = _salient_case()
    rms = awq.rms_of(H_fit, n, None, W.shape[1])
    rtn = lambda Ws, H, imp: dequantize(quantize(Ws, qtype), qtype, Ws.shape)  # noqa: E731
    s, alpha, errors = awq.search([W], rms, H_fit, n, H_judge, [rtn])
    assert alpha > 0 and errors[0] == errors[0]
    assert min(errors) < 0.8 * errors[0]
    assert s[:8].min() > s[8:].max()     # the loud channels got the larger scales
    np.testing.assert_allclose(np.exp(np.mean(np.log(s))), 1.0, rtol=1e-9)


def test_search_keeps_alpha_zero_when_scaling_cannot_help():
    """A quantizer that is exact for any scaling: every α ties, and α = 0 (no fold) is kept."""
    W, H_fit, H_judge, n = _salient_case()
    s, alpha, errors = awq.search([W], awq.rms_of(H_fit, n, None, W.shape[1]), H_fit, n, H_judge,
                                  [lambda Ws, H, imp: Ws.astype(np.float64)])
    assert alpha == 0.0 and np.all(s == 1.0)


def test_folding_in_the_writer_keeps_float_logits(tmp_path):
    """The writer's Folding (the layer-at-a-time fold, v both a reader and a producer) with given scales."""
    from edgeq.convert import gptq, imatrix
    from edgeq.runtime import engine

    tensors = tiny_f32(tmp_path / "a.gguf", "llama")
    model = engine.load(str(tmp_path / "a.gguf"), n_ctx=64, threads=1)
    hs = gptq.Hessians()
    imatrix.collect(lambda chunk, obs: model.collect_activations(chunk, obs), IDS * 8, n_ctx=32, n_chunks=4,
                    hessians=hs)
    shapes = {n: x.shape for n, x in tensors.items()}
    types = {n: "Q5_0" if x.ndim == 2 else "F32" for n, x in tensors.items()}
    rng = np.random.default_rng(2)
    cache = {(g.producer, tuple(types[r] for r in g.readers)): (np.exp(rng.uniform(-1.5, 1.5, shapes[g.producer][0])), 0.5)
             for g in awq.groups("llama", shapes, N_HEAD, N_KV)}
    folding = awq.Folding("llama", {n: (lambda x=x: x) for n, x in tensors.items()}, shapes, types, hs, N_HEAD, N_KV,
                          quantizer_for=None, cache=cache)
    folded = {n: folding.load(n) for n in tensors}
    assert len(folding.alphas) == 8 and not np.allclose(folded["blk.1.attn_v.weight"], tensors["blk.1.attn_v.weight"])
    # the readers' Hessians are those of the scaled input x/s
    s = folding.col_scale["blk.0.attn_q.weight"]
    np.testing.assert_allclose(folding.hessians.get("blk.0.attn_q.weight"), hs.get("blk.0.attn_q.weight") / np.outer(s, s))
    tiny_f32(tmp_path / "b.gguf", "llama", norms=folded)
    ref, got = logits(tmp_path / "a.gguf"), logits(tmp_path / "b.gguf")
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _gptq_quantizer(qtype):
    from edgeq.convert.gptq import quantize_gptq
    from edgeq.formats.quants import dequantize

    return lambda Ws, H, imp: dequantize(quantize_gptq(Ws, qtype, H, imp), qtype, Ws.shape)


def test_larger_type_never_loses_to_a_smaller_one():
    """AWQ + GPTQ on the same inputs: each larger k-quant ends with a lower held-out error than the one below."""
    W, H_fit, H_judge, n = _salient_case(seed=3)
    rms = awq.rms_of(H_fit, n, None, W.shape[1])
    best = [min(awq.search([W], rms, H_fit, n, H_judge, [_gptq_quantizer(t)], alphas=(0.0, 0.25, 0.5))[2])
            for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")]
    assert all(a > b for a, b in zip(best, best[1:])), best


def test_awq_gptq_file_is_the_same_tensor_set(tmp_path):
    """quantize --calibrate --method awq-gptq: gguf-py (llama.cpp's reader) reads the file; names, shapes and
    types are those of the gptq file; the folds are in the norms (changed) and the file still runs."""
    from edgeq.convert import QuantOptions, quantize_file

    tiny_f32(tmp_path / "f32.gguf", "llama")
    text = tmp_path / "calib.txt"
    text.write_text("".join(chr(48 + (i * 7 + i // 5) % 14) for i in range(4000)))
    stats = {}
    for m in ("gptq", "awq-gptq", "best"):
        stats[m] = quantize_file(tmp_path / "f32.gguf", tmp_path / f"{m}.gguf", options=QuantOptions(
            qtype="Q4_K_M", calibrate=str(text), chunks=6, calib_ctx=64, method=m))
    assert stats["awq-gptq"]["awq"]["groups"] == 8 and "awq" not in stats["gptq"]
    r = {m: {t.name: t for t in gguf.GGUFReader(tmp_path / f"{m}.gguf").tensors} for m in stats}
    for m in ("awq-gptq", "best"):
        assert {(n, t.tensor_type, tuple(t.shape)) for n, t in r[m].items()} == \
            {(n, t.tensor_type, tuple(t.shape)) for n, t in r["gptq"].items()}
    alphas = stats["awq-gptq"]["awq"]["alphas"]
    for name, alpha in alphas.items():   # a group scaled (α > 0) has its producer changed; an unscaled norm not
        same = np.array_equal(np.asarray(r["awq-gptq"][name].data), np.asarray(r["gptq"][name].data))
        if alpha > 0 or "norm" in name:
            assert same == (alpha == 0.0), name
    assert np.isfinite(logits(tmp_path / "awq-gptq.gguf")).all()


def test_awq_gptq_refused_before_calibration(tmp_path):
    from edgeq.convert import QuantOptions, quantize_file
    from edgeq.errors import EdgeqError

    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.add_uint32("phi3.block_count", 1)
    w.add_tensor("blk.0.attn_qkv.weight", np.zeros((96, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EdgeqError, match="cannot be folded into phi3"):
        quantize_file(tmp_path / "phi.gguf", tmp_path / "out.gguf",
                      options=QuantOptions(qtype="Q4_K_M", calibrate="macbeth", method="awq-gptq"))


@pytest.mark.parametrize("min_gain, scaled", [(0.0, True), (0.99, False)])
def test_folding_keeps_a_scale_only_for_a_large_enough_gain(min_gain, scaled):
    """The method's own held-out error decides: a fold that gains less than min_gain is dropped (α = 0)."""
    from edgeq.convert import gptq
    from edgeq.formats.quants import dequantize, quantize

    rng = np.random.default_rng(5)
    hs = gptq.Hessians()
    for held in (False, True):
        X = rng.standard_normal((1024, 256)).astype(np.float32)
        X[:, :8] *= 30.0
        hs.held_out = held
        hs("blk.0.ffn_gate.weight", X)
        hs("blk.0.ffn_up.weight", X)
    tensors = {"blk.0.ffn_norm.weight": np.ones(256, np.float32),
               "blk.0.ffn_gate.weight": rng.standard_normal((64, 256)).astype(np.float32),
               "blk.0.ffn_up.weight": rng.standard_normal((64, 256)).astype(np.float32)}
    rtn = lambda qtype: lambda Ws, H, imp: dequantize(quantize(Ws, qtype), qtype, Ws.shape)  # noqa: E731
    folding = awq.Folding("llama", {n: (lambda x=x: x) for n, x in tensors.items()},
                          {n: x.shape for n, x in tensors.items()}, {"blk.0.ffn_gate.weight": "Q4_K",
                          "blk.0.ffn_up.weight": "Q4_K", "blk.0.ffn_norm.weight": "F32"}, hs, 4, 4, rtn)
    folding.min_gain = min_gain
    norm = folding.load("blk.0.ffn_norm.weight")
    assert (folding.alphas["blk.0.ffn_norm.weight"] > 0) == scaled
    assert np.array_equal(norm, tensors["blk.0.ffn_norm.weight"]) != scaled
    if scaled:   # a group's readers share the factorization of their scaled Hessian (one, not one per reader)
        fit = folding.hessians.factor("blk.0.ffn_gate.weight", "fit")
        assert folding.hessians.factor("blk.0.ffn_up.weight", "fit") is fit
        direct = gptq._factor(folding.hessians.get("blk.0.ffn_up.weight", "fit"), gptq.DAMP, True, np.float32)
        assert np.array_equal(fit[1], direct[1]) and np.allclose(fit[0], direct[0], rtol=1e-5, atol=1e-7)

"""The CUDA forward pass (gpu_kernels/forward.py) against the CPU one, on tiny random GGUF models.

Same simulator arrangement as tests/test_gpu_kernels.py (see its docstring): numba.cuda is imported here
with NUMBA_ENABLE_CUDASIM=1 unless something imported it earlier, in which case, without a GPU, the
simulator tests skip and `test_in_simulator_subprocess` reruns this file in a fresh process.
EDGEQ_CUDA_TESTS=gpu runs them on the real GPU. Models are tiny (n_embd 32, 2 layers, vocab 64) and the
kernels use 2 threads per block: the simulator runs every CUDA thread as a Python thread.
"""
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from _cuda_sim import import_numba_cuda, rerun_in_simulator

device = import_numba_cuda()

needs_device = pytest.mark.skipif(not device.available(), reason="numba.cuda was imported without the "
                                  "simulator and there is no GPU (see test_in_simulator_subprocess)")


# ---------------------------------------------------------------- tiny models
VOCAB = 64  # byte-level tokens for bytes 0..63: digits, space and punctuation
IDS = [ord(c) for c in "1+2=3; 4"][:7]  # 5 prefilled, then 2 decoded


def tiny_gguf(path, arch: str, qtype: str = "Q8_0", types: dict | None = None, n_embd=32, n_ff=32, n_layer=2,
              n_head=2, seed=0, n_ctx_orig=32, window=0):
    """A random `arch` model (llama, qwen2, qwen3, smollm3, granite, gemma3, phi3 or qwen3moe) written with
    gguf-py: matrices in `qtype`, or in types[short name] (e.g. {"attn_q": "Q4_0"}), a byte-level BPE vocabulary
    of 64 tokens, `n_head` query heads sharing 1 KV head of 32 dims. Gemma 3: layer 0 has a 3-token sliding
    window, layer 1 is global. Phi-3: fused matrices, RoPE over 16 of the 32 dims, LongRoPE factors (the long
    ones for contexts above n_ctx_orig) with an attention factor, an optional sliding `window`. Qwen3-MoE:
    4 experts of n_ff, 2 chosen per token."""
    from edgeq.formats.quants import quantize
    from edgeq.runtime.tokenizer import BYTE_TO_CHAR

    rng = np.random.default_rng(seed)
    n_kv, hd = 1, 32  # head_dim 32: the CPU KV cache works in blocks of 32
    types = types or {}
    gemma = arch == "gemma3"
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in [("embedding_length", n_embd), ("block_count", n_layer), ("feed_forward_length", n_ff),
                 ("attention.head_count", n_head), ("attention.head_count_kv", n_kv), ("context_length", 64),
                 ("attention.key_length", hd), ("attention.value_length", hd)]:
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    if gemma:
        w.add_uint32(f"{arch}.attention.sliding_window", 3)
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", 2)
        w.add_float32(f"{arch}.rope.freq_base_swa", 100.0)
    if arch == "granite":
        for k, v in [("embedding_scale", 6.0), ("attention.scale", 0.1), ("residual_scale", 0.4), ("logit_scale", 3.0)]:
            w.add_float32(f"{arch}.{k}", v)
    if arch == "phi3":
        w.add_uint32(f"{arch}.rope.dimension_count", hd // 2)
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", n_ctx_orig)
        w.add_float32(f"{arch}.rope.scaling.attn_factor", 1.19)
        w.add_uint32(f"{arch}.attention.sliding_window", window)
    n_expert = 4 if arch == "qwen3moe" else 0
    if n_expert:
        w.add_uint32(f"{arch}.expert_count", n_expert)
        w.add_uint32(f"{arch}.expert_used_count", 2)
        w.add_uint32(f"{arch}.expert_feed_forward_length", n_ff)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([BYTE_TO_CHAR[b] for b in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_eos_token_id(0)

    def matrix(name, n_out, n_in, std=None):
        x = (rng.standard_normal((n_out, n_in)) * (std or n_in ** -0.5)).astype(np.float32)
        t = types.get(name.split(".")[-2], qtype)
        w.add_tensor(name, quantize(x, t), raw_dtype=gguf.GGMLQuantizationType[t])

    def vector(name, n, base=1.0):
        w.add_tensor(name, (base + 0.1 * rng.standard_normal(n)).astype(np.float32))

    def experts(name, n_out, n_in):  # stacked (n_expert, n_out, n_in)
        x = (rng.standard_normal((n_expert * n_out, n_in)) * n_in ** -0.5).astype(np.float32)
        t = types.get(name.split(".")[-2], qtype)
        w.add_tensor(name, quantize(x, t).reshape(n_expert, n_out, -1), raw_dtype=gguf.GGMLQuantizationType[t])

    matrix("token_embd.weight", VOCAB, n_embd, std=1.0)
    for i in range(n_layer):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", n_embd)
        if arch == "phi3":  # fused q/k/v and gate/up
            matrix(p + "attn_qkv.weight", (n_head + 2 * n_kv) * hd, n_embd)
        else:
            matrix(p + "attn_q.weight", n_head * hd, n_embd)
            matrix(p + "attn_k.weight", n_kv * hd, n_embd)
            matrix(p + "attn_v.weight", n_kv * hd, n_embd)
        matrix(p + "attn_output.weight", n_embd, n_head * hd)
        vector(p + "ffn_norm.weight", n_embd)
        if arch == "phi3":
            matrix(p + "ffn_up.weight", 2 * n_ff, n_embd)
        elif n_expert:
            matrix(p + "ffn_gate_inp.weight", n_expert, n_embd)
            experts(p + "ffn_gate_exps.weight", n_ff, n_embd)
            experts(p + "ffn_up_exps.weight", n_ff, n_embd)
            experts(p + "ffn_down_exps.weight", n_embd, n_ff)
        else:
            matrix(p + "ffn_gate.weight", n_ff, n_embd)
            matrix(p + "ffn_up.weight", n_ff, n_embd)
        if not n_expert:
            matrix(p + "ffn_down.weight", n_embd, n_ff)
        if arch == "qwen2":
            for t, n in (("attn_q", n_head * hd), ("attn_k", n_kv * hd), ("attn_v", n_kv * hd)):
                vector(p + t + ".bias", n, base=0.0)
        if arch in ("qwen3", "qwen3moe"):
            vector(p + "attn_q_norm.weight", hd)
            vector(p + "attn_k_norm.weight", hd)
        if gemma:
            vector(p + "attn_q_norm.weight", hd)
            vector(p + "attn_k_norm.weight", hd)
            vector(p + "post_attention_norm.weight", n_embd)
            vector(p + "post_ffw_norm.weight", n_embd)
    if arch == "phi3":
        vector("rope_factors_short.weight", hd // 4)
        vector("rope_factors_long.weight", hd // 4, base=4.0)
    vector("output_norm.weight", n_embd)
    if not gemma:  # Gemma 3 ties the classifier to token_embd
        matrix("output.weight", VOCAB, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


MODELS = {  # name: (arch, default type, per-tensor types, other shape arguments)
    # llama: Q8_0 with Q4_0 and Q5_1 matrices
    "llama": ("llama", "Q8_0", {"attn_q": "Q4_0", "ffn_up": "Q4_0", "attn_output": "Q5_1"}, {"n_layer": 1}),
    # qwen2 (q/k/v biases): 8 query heads, so that attn_output has rows of 256 and can be a K-quant
    "qwen2": ("qwen2", "Q8_0", {"attn_output": "Q4_K", "attn_v": "Q4_1"}, {"n_head": 8, "n_layer": 1}),
    # gemma3 (2 layers: window 3 < 7 tokens, then global): Q4_0, a Q5_0 matrix and a BF16 one (no kernel:
    # F16 at upload)
    "gemma3": ("gemma3", "Q4_0", {"attn_k": "BF16", "ffn_gate": "Q5_0"}, {}),
    # the Llama family's options, as cfg.plan() describes them: q/k norms; no RoPE on the 4th layer; multipliers
    "qwen3": ("qwen3", "Q8_0", {}, {}),
    "smollm3": ("smollm3", "Q8_0", {}, {"n_layer": 4}),
    "granite": ("granite", "Q8_0", {}, {"n_layer": 1}),
    # phi3: fused q/k/v and gate/up, partial rotary, LongRoPE short factors (context 16 <= 32) and attention
    # factor; phi3_long: the long factors (context 16 > 8) and a 5-token sliding window
    "phi3": ("phi3", "Q8_0", {}, {}),
    "phi3_long": ("phi3", "Q8_0", {}, {"n_ctx_orig": 8, "window": 5}),
    # qwen3moe: the router and experts in F32, so that the CPU's products over the few rows routed to an expert
    # are float32 too (below 6 rows it quantizes activations to 8 bits)
    "qwen3moe": ("qwen3moe", "Q8_0", {"ffn_gate_inp": "F32", "ffn_gate_exps": "F32", "ffn_up_exps": "F32",
                                      "ffn_down_exps": "F32"}, {}),
}


@pytest.fixture(scope="module")
def fast_simulator():
    """In the simulator: kernels with 2 threads per block, and a short GIL switch interval (its block loop
    polls its threads, which otherwise wait up to 5 ms for the GIL at every step)."""
    from edgeq.gpu_kernels import forward

    saved = forward.BLOCK_THREADS, sys.getswitchinterval()
    if device.simulator():
        forward.BLOCK_THREADS = 2
        sys.setswitchinterval(1e-4)
    yield
    forward.BLOCK_THREADS = saved[0]
    sys.setswitchinterval(saved[1])


@pytest.fixture(scope="module")
def models(tmp_path_factory, fast_simulator):
    """name -> (CPU model with a float32 KV cache, CUDA model), loaded once per module."""
    from edgeq.cpu_kernels import gemm_i8
    from edgeq.runtime.engine import Model

    root = tmp_path_factory.mktemp("cuda_models")
    cache = {}

    def get(name):
        if name not in cache:
            arch, qtype, types, shape = MODELS[name]
            path = tiny_gguf(root / f"{name}.gguf", arch, qtype, types, **shape)
            # the CPU reference prefills on float tiles (the int8 GEMM, which rounds activations to 8 bits, off
            # for its matrices: QuantLinear decides at construction), as the CUDA kernels compute
            saved, gemm_i8.INT8_GEMM = gemm_i8.INT8_GEMM, ()
            try:
                cpu = Model(path, n_ctx=16, threads=1, cache_type_k="f32", cache_type_v="f32", device="cpu")
            finally:
                gemm_i8.INT8_GEMM = saved
            cache[name] = (cpu, Model(path, n_ctx=16, device="cuda"))
        return cache[name]

    return get


def _prefill_then_decode(model, ids, n_prefill):
    model.reset()
    rows = list(model._forward(ids[:n_prefill], all_logits=True))
    rows += [model._forward([t]) for t in ids[n_prefill:]]
    return np.stack(rows)


def _rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---------------------------------------------------------------- CUDA vs CPU
@needs_device
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_cpu(models, name):
    cpu, gpu = models(name)
    assert (cpu.device, gpu.device) == ("cpu", "cuda") and gpu.info["device"] == "cuda"
    got = _prefill_then_decode(gpu, IDS, 5)
    # The CPU's 7-token prefill is float32 throughout (from 6 tokens its matrix products dequantize the
    # weights: the fixture turns the int8 GEMM off) as the CUDA kernels are; its one-token decode quantizes activations to 8 bits, so it is
    # compared more loosely.
    want = cpu.logits(IDS)
    assert _rel_err(got, want) < 1e-4, _rel_err(got, want)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert _rel_err(got, _prefill_then_decode(cpu, IDS, 5)) < 3e-2
    assert gpu._gpu.fallback_types == ({"BF16"} if name == "gemma3" else set())


@needs_device
def test_prefix_reuse_rewinds_the_device_cache(models):
    """The engine keeps the common prefix and overwrites the rest: the positional CUDA cache follows."""
    cpu, gpu = models("llama")
    gpu._prefill(IDS)                     # (the cache may hold IDS already: then one token is evaluated)
    other = IDS[:5] + [33, 63]
    last = gpu._prefill(other)            # keeps 5 cached positions, evaluates 2 new tokens
    assert gpu.tokens == other and gpu._n_evaluated == 2
    assert _rel_err(last, cpu.logits(other)[-1]) < 1e-4


@needs_device
def test_generation_on_the_device(models):
    cpu, gpu = models("gemma3")
    kw = dict(max_tokens=3, temperature=0.0)
    assert "".join(gpu.generate("1+1=", **kw)) == "".join(cpu.generate("1+1=", **kw))
    assert gpu.cache.can_rewind_to(1)
    assert gpu.cache.nbytes == 2 * 2 * (1 * 16 * 32 * 4)  # layers x (k, v) x (kv heads, n_ctx, head dim) f32


@needs_device
def test_longrope_table_follows_the_context(models):
    """LongRoPE: the long factors above the original context, the short ones within it (as the CPU picks)."""
    for name, table in (("phi3", "inv_freq"), ("phi3_long", "inv_freq_long")):
        cpu, gpu = models(name)
        want = getattr(cpu.weights, table)
        assert np.allclose(gpu._gpu.layers[0].inv_freq.copy_to_host(), want), name
    assert not np.allclose(models("phi3")[0].weights.inv_freq, models("phi3")[0].weights.inv_freq_long)


class _Recorder:
    """Stands in for one expert's DeviceLinear and notes each launch."""

    def __init__(self, lin, tag, log):
        self.lin, self.tag, self.log, self.n_out = lin, tag, log, lin.n_out

    def __call__(self, d_x, d_out):
        self.log.append((self.tag, d_x.shape[0]))
        return self.lin(d_x, d_out)


@needs_device
def test_moe_decode_launches_only_the_chosen_experts(models):
    cpu, gpu = models("qwen3moe")
    log = []
    for il, L in enumerate(gpu._gpu.layers):
        for kind in ("gate", "up", "down"):
            mats = getattr(L.moe, kind)
            mats[:] = [_Recorder(m.lin if isinstance(m, _Recorder) else m, (il, kind, e), log)
                       for e, m in enumerate(mats)]
    gpu.reset()
    gpu._forward(IDS[:5])
    log.clear()
    gpu._forward([IDS[5]])  # one decoded token: 2 of 4 experts per layer, each on one row
    for il in range(len(gpu._gpu.layers)):
        launched = [(kind, rows) for (layer, kind, e), rows in log if layer == il]
        assert sorted(launched) == sorted([("down", 1), ("gate", 1), ("up", 1)] * 2), launched


@needs_device
def test_quantized_cache_is_refused_on_cuda(tmp_path):
    from edgeq.runtime.engine import Model
    from edgeq.errors import EdgeqError

    with pytest.raises(EdgeqError, match="float32 KV cache"):
        Model(tmp_path / "not-read.gguf", device="cuda", cache_type_k="q8")


def test_device_selection():
    from edgeq.runtime.engine import select_device
    from edgeq.errors import EdgeqError

    assert select_device("cpu") == "cpu"
    assert select_device("auto", cache_type_k="q4") == "cpu"
    if device.simulator():
        assert select_device("auto") == "cpu"  # auto never picks the simulator
        assert select_device("cuda") == "cuda"
    with pytest.raises(EdgeqError, match="unknown device"):
        select_device("tpu")


# ---------------------------------------------------------------- the CLI without a device
def _cli(*args, env):
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_device_cuda_without_a_gpu_is_one_line(tmp_path):
    path = tiny_gguf(tmp_path / "m.gguf", "llama", n_layer=1)
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "EDGEQ_CUDA_TESTS")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # hides any real GPU from numba-cuda
    p = _cli("run", path, "-p", "1+1", "-n", "2", "--device", "cuda", env=env)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeq run: device cuda is not available"), p.stderr
    p = _cli("run", path, "-p", "1+1", "-n", "2", "--temp", "0", "--device", "auto", env=env)
    assert p.returncode == 0, p.stderr
    assert "running on the CPU" in p.stderr
    # not asked for: a machine without a GPU is the common case, not news on every run; -v says it
    p = _cli("run", path, "-p", "1+1", "-n", "2", "--temp", "0", env=env)
    assert p.returncode == 0 and "running on the CPU" not in p.stderr, p.stderr
    p = _cli("run", path, "-p", "1+1", "-n", "2", "--temp", "0", "-v", env=env)
    assert p.returncode == 0 and "running on the CPU" in p.stderr, p.stderr


# ---------------------------------------------------------------- when this process cannot simulate
@pytest.mark.skipif(device.available(), reason="the CUDA tests ran in this process")
def test_in_simulator_subprocess():
    rerun_in_simulator(__file__)

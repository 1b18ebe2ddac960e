"""The forward pass on a CUDA device, for every architecture in models/ (the Llama family, Gemma 3).

Built from the CPU-loaded `Weights`/`Config` of a model:

    fwd = CudaForward(weights, cfg, n_ctx)      # uploads every weight once
    logits = fwd(tokens, pos0, all_logits)      # same contract as models.<arch>.forward, minus the cache

Weight matrices go to the device once, in their quantized GGUF form (`CudaLinear`); norm vectors, biases
and RoPE frequencies as float32. Types without a CUDA kernel (Q2_K, Q3_K, BF16, IQ*...) are dequantized
at upload, to F16 (or F32 where a value would overflow F16): they then take 2 (4) bytes per weight on the
device. Activations stay on the device for the whole pass; the token embedding is looked up on the host
(the same `embed_rows` as the CPU) and uploaded, and only the logits come back.

The KV cache (`CudaKVCache`) is float32, positional and holds all n_ctx positions of every layer, sliding
window layers included (attention reads only the window): any prefix can be rewound to, so the engine
truncates its token list and nothing else. The layer sequence mirrors models/llama.py and
models/gemma3.py step for step; what differs between architectures comes from `cfg.plan()` (a
models.base.ForwardPlan: RoPE table per layer, LongRoPE's long table and attention factor, q/k norms,
post-norms, activation, multipliers, experts).

Fused matrices (Phi-3's attn_qkv, gate/up in ffn_up) arrive as the CPU's row-slice views and are uploaded
as separate matrices. A mixture-of-experts layer (Qwen3-MoE) uploads every expert's matrices; per call, the
router's logits come back to the host (n_expert floats per token), the top-k choice and weights are made
there exactly as on the CPU, and only the chosen experts' matrices are launched, on the rows routed to them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.formats.quants import dequantize

from . import ops
from .device import device_empty, to_device
from .linear import DEFAULT_THREADS, QTYPE_BLOCKS, CudaLinear

F16_MAX = 65504.0
BLOCK_THREADS = DEFAULT_THREADS  # threads per block of every kernel (tests lower it for the simulator)


def upload_matrix(raw: np.ndarray, qtype: str, shape: tuple[int, int], threads: int) -> CudaLinear:
    """A weight matrix on the device: as is when a kernel decodes its type, else dequantized at upload."""
    if qtype not in QTYPE_BLOCKS:
        w = dequantize(raw, qtype, shape)
        if np.abs(w).max(initial=0.0) <= F16_MAX:
            raw, qtype = w.astype(np.float16).view(np.uint8), "F16"
        else:
            raw, qtype = w.view(np.uint8), "F32"
    return CudaLinear(raw, qtype, shape, threads=threads)


class DeviceLinear:
    """`models.base.Linear` on the device: y = x W^T (+ b)."""

    def __init__(self, lin, threads: int):
        self.name = lin.name
        self.source_qtype = lin.q.qtype
        self.w = upload_matrix(lin.q.raw, lin.q.qtype, (lin.n_out, lin.n_in), threads)
        self.bias = None if lin.bias is None else to_device(np.asarray(lin.bias, np.float32))
        self.n_out, self.n_in = lin.n_out, lin.n_in
        self.threads = threads

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + (0 if self.bias is None else 4 * self.n_out)

    def __call__(self, d_x, d_out):
        self.w.matmul(d_x, d_out)
        if self.bias is not None:
            ops.add_bias(d_out, self.bias, threads=self.threads)
        return d_out


class CudaKVCache:
    """Float32 keys and values (n_kv_heads, n_ctx, head_dim) per layer, indexed by position."""

    def __init__(self, layouts, n_ctx: int):
        self.n_ctx = n_ctx
        self.windows = [lay.window for lay in layouts]
        self.k = [device_empty((lay.n_kv_heads, n_ctx, lay.head_dim)) for lay in layouts]
        self.v = [device_empty((lay.n_kv_heads, n_ctx, lay.head_dim)) for lay in layouts]

    @property
    def nbytes(self) -> int:
        return sum(4 * int(np.prod(a.shape)) for a in self.k + self.v)

    def can_rewind_to(self, pos: int) -> bool:
        return 0 <= pos <= self.n_ctx  # every position is kept, window layers too

    def mark(self, pos: int) -> None:
        """Nothing to keep: float32 rows by position, a rewind finds them as stored (runtime/kv_cache.KVCache.mark)."""


@dataclass
class _Layer:
    attn_norm: object
    wq: DeviceLinear
    wk: DeviceLinear
    wv: DeviceLinear
    wo: DeviceLinear
    ffn_norm: object
    w_gate: DeviceLinear | None  # None in a mixture-of-experts layer
    w_up: DeviceLinear | None
    w_down: DeviceLinear | None
    inv_freq: object             # RoPE frequencies of this layer (device); None: no RoPE (SmolLM3)
    q_norm: object = None        # plan.qk_norm: RMSNorm of each head of q and k
    k_norm: object = None
    post_attn_norm: object = None  # plan.post_norms: RMSNorm of the attention / FFN output before the residual
    post_ffn_norm: object = None
    moe: "_Experts | None" = None  # plan.n_expert_used: the router and each expert's matrices


@dataclass
class _Experts:
    router: DeviceLinear
    gate: list[DeviceLinear]
    up: list[DeviceLinear]
    down: list[DeviceLinear]

    @property
    def mats(self) -> list[DeviceLinear]:
        return [self.router, *self.gate, *self.up, *self.down]


class CudaForward:
    """One model's weights on the device, its KV cache, and the forward pass over them."""

    def __init__(self, weights, cfg, n_ctx: int, threads: int | None = None):
        self.cfg, self.n_ctx, self.threads = cfg, n_ctx, threads or BLOCK_THREADS
        self.embed = weights.tok_embd          # host lookup (quantized rows, decoded on the CPU)
        up = self._upload
        vec = self._vector
        # the layer sequence is data the model's Config gives (kernels never import models)
        self.plan = plan = cfg.plan()
        tables = set(plan.rope_tables) - {None}
        freqs = {name: vec(getattr(weights, name)) for name in tables}
        long = getattr(weights, plan.rope_long_table, None) if plan.rope_long_table else None
        if long is not None and n_ctx > plan.rope_long_above:  # LongRoPE: chosen once, by the context size
            freqs = {name: vec(long) for name in tables}
        self.layers = []
        for il, L in enumerate(weights.layers):
            table = plan.rope_tables[il]
            dense = getattr(L, "moe", None) is None  # (Gemma 3's layers have no experts field)
            layer = _Layer(vec(L.attn_norm), up(L.wq), up(L.wk), up(L.wv), up(L.wo), vec(L.ffn_norm),
                           up(L.w_gate) if dense else None, up(L.w_up) if dense else None,
                           up(L.w_down) if dense else None, freqs[table] if table else None)
            if not dense:
                m = L.moe
                layer.moe = _Experts(up(m.router), [up(x) for x in m.gate], [up(x) for x in m.up],
                                     [up(x) for x in m.down])
            if plan.qk_norm:
                layer.q_norm, layer.k_norm = vec(L.q_norm), vec(L.k_norm)
            if plan.post_norms:
                layer.post_attn_norm, layer.post_ffn_norm = vec(L.post_attn_norm), vec(L.post_ffn_norm)
            self.layers.append(layer)
        self.output_norm = vec(weights.output_norm)
        self.output = up(weights.output)
        self.cache = CudaKVCache(cfg.kv_layouts(), n_ctx)
        self._bufs: dict = {}

    def _upload(self, lin) -> DeviceLinear:
        return DeviceLinear(lin, self.threads)

    @staticmethod
    def _vector(a):
        return to_device(np.asarray(a, dtype=np.float32))

    def _mats(self) -> list[DeviceLinear]:
        out = []
        for L in self.layers:
            out += [m for m in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down) if m is not None]
            out += L.moe.mats if L.moe is not None else []
        return out

    @property
    def weight_nbytes(self) -> int:
        return sum(m.nbytes for m in self._mats()) + self.output.nbytes

    @property
    def fallback_types(self) -> set[str]:
        """Source types of the matrices that were dequantized at upload (no kernel for them)."""
        return {m.source_qtype for m in self._mats() + [self.output] if m.source_qtype not in QTYPE_BLOCKS}

    def _buf(self, name: str, rows: int, *shape):
        """Scratch (rows, *shape) float32, reused across calls; grown when more rows are needed."""
        b = self._bufs.get(name)
        if b is None or b.shape[0] < rows:
            b = self._bufs[name] = device_empty((rows,) + shape)
        return b[:rows]

    def __call__(self, tokens: np.ndarray, pos0: int, all_logits: bool = False) -> np.ndarray:
        """Logits (T, n_vocab) of `tokens` at positions pos0.. if all_logits, else (1, n_vocab) of the last;
        their keys/values are written into the cache (positions >= pos0 are overwritten)."""
        cfg, plan, nt = self.cfg, self.plan, self.threads
        T = len(tokens)
        if T == 0 or pos0 < 0 or pos0 + T > self.n_ctx:
            raise ValueError(f"CudaForward: positions {pos0}..{pos0 + T} outside 0..{self.n_ctx}")
        H, H_kv, hd, d, eps = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_embd, cfg.rms_eps
        scale = plan.attn_scale
        x = self.embed(np.asarray(tokens))
        if plan.embed_scale != 1.0:
            x = x * np.float32(plan.embed_scale)
        d_x = to_device(x)                                                # (T, d) residual stream
        d_pos = to_device(np.arange(pos0, pos0 + T, dtype=np.int32))
        h = self._buf("h", T, d)
        q2, k2, v2 = self._buf("q", T, H * hd), self._buf("k", T, H_kv * hd), self._buf("v", T, H_kv * hd)
        q, k, v = q2.reshape(T, H, hd), k2.reshape(T, H_kv, hd), v2.reshape(T, H_kv, hd)
        a = self._buf("a", T, H, hd)
        o = self._buf("o", T, d)
        g, u = self._buf("g", T, cfg.n_ff), self._buf("u", T, cfg.n_ff)
        for il, L in enumerate(self.layers):
            # attention
            ops.rmsnorm(d_x, L.attn_norm, eps, h, threads=nt)
            L.wq(h, q2)
            L.wk(h, k2)
            L.wv(h, v2)
            if L.q_norm is not None:
                ops.rmsnorm(q2.reshape(T * H, hd), L.q_norm, eps, q2.reshape(T * H, hd), threads=nt)
                ops.rmsnorm(k2.reshape(T * H_kv, hd), L.k_norm, eps, k2.reshape(T * H_kv, hd), threads=nt)
            if L.inv_freq is not None:
                ops.rope(q, d_pos, L.inv_freq, plan.rope_neox, threads=nt)
                ops.rope(k, d_pos, L.inv_freq, plan.rope_neox, threads=nt)
                if plan.rope_attn_factor != 1.0:
                    n_rot = 2 * L.inv_freq.shape[0]
                    ops.scale_prefix(q, n_rot, plan.rope_attn_factor, threads=nt)
                    ops.scale_prefix(k, n_rot, plan.rope_attn_factor, threads=nt)
            ops.store_kv(k, self.cache.k[il], pos0, threads=nt)
            ops.store_kv(v, self.cache.v[il], pos0, threads=nt)
            ops.attention(q, self.cache.k[il], self.cache.v[il], pos0, scale, a, window=self.cache.windows[il],
                          threads=nt)
            L.wo(a.reshape(T, H * hd), o)
            if L.post_attn_norm is not None:
                ops.rmsnorm(o, L.post_attn_norm, eps, o, threads=nt)
            self._residual(d_x, o)
            # feed-forward
            ops.rmsnorm(d_x, L.ffn_norm, eps, h, threads=nt)
            if L.moe is not None:
                self._experts(L.moe, h, o)
            else:
                L.w_gate(h, g)
                L.w_up(h, u)
                (ops.gelu_mul if plan.gelu else ops.silu_mul)(g, u, g, threads=nt)
                L.w_down(g, o)
            if L.post_ffn_norm is not None:
                ops.rmsnorm(o, L.post_ffn_norm, eps, o, threads=nt)
            self._residual(d_x, o)
        rows = T if all_logits else 1
        xs = d_x if all_logits else d_x[T - 1:]
        hn = h[:rows]
        ops.rmsnorm(xs, self.output_norm, eps, hn, threads=nt)
        logits = self._buf("logits", rows, cfg.n_vocab)
        self.output(hn, logits)
        out = logits.copy_to_host()
        return out if plan.logit_scale == 1.0 else out / np.float32(plan.logit_scale)

    def _experts(self, m: _Experts, h, out) -> None:
        """out = each row of h through its k best experts (models.llama.experts on the device): softmax over
        the router, the k weights renormalized; only the chosen experts' matrices are read."""
        nt, T, d = self.threads, h.shape[0], h.shape[1]
        logits_d = self._buf("router", T, m.router.n_out)
        m.router(h, logits_d)
        logits = logits_d.copy_to_host()                               # (T, n_expert)
        top = np.argsort(-logits, axis=1, kind="stable")[:, :self.plan.n_expert_used]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        w = np.take_along_axis(p, top, axis=1)
        w /= w.sum(axis=1, keepdims=True)
        ops.fill(out, 0.0, threads=nt)
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)
            n, n_ff = len(rows), m.gate[e].n_out
            d_rows = to_device(rows.astype(np.int32))
            x = ops.gather_rows(h, d_rows, self._buf("x_e", n, d), threads=nt)
            g, u = self._buf("g_e", n, n_ff), self._buf("u_e", n, n_ff)
            m.gate[e](x, g)
            m.up[e](x, u)
            ops.silu_mul(g, u, g, threads=nt)
            y = m.down[e](g, self._buf("y_e", n, d))
            ops.scatter_add_rows(out, d_rows, to_device(w[rows, slot].astype(np.float32)), y, threads=nt)

    def _residual(self, d_x, d_o):
        ops.add(d_x, d_o, threads=self.threads, alpha=self.plan.residual_scale)

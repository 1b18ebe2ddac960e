"""A decode step as one compiled call (the Llama family, Gemma 3): every layer's kernels, no Python between them.

A decode token of models/llama.py's `layer` makes ~10 kernel calls a layer from Python (norms, the products'
activation quantization and row kernels, q/k norms + RoPE, the decode attention, SiLU), each a Numba dispatch
that types its arguments, and each after a matrix product has streamed megabytes of weights through the caches,
so the interpreter's code and data come back from L3 every time: ~5 ms of a 1.7B Q4_K_M token's 50
(docs/performance.md). `step` runs the same kernels, compiled as they are for the Python path and called
through their machine-code addresses (native_call.py: the driver's module holds indirect calls, so its compile
includes none of theirs), in the same order on the same arrays: its logits are those of the Python path, bit
for bit (tests/test_decode_pass.py).

What the driver reads is tables of integers made once per model and batch size and once per cache group (the
model modules' `_make_decode_tables`, kept by models/base.decode_tables; runtime/kv_cache.py
`KVCache.decode_tables`): the weights' and the caches' addresses and shapes, rebuilt as arrays in the driver (`numba.carray`), so it compiles once for every model and cache type instead of once per
layer count, and no Numba typed container is built at load time. The tables hold addresses of arrays that the
weights and the cache own: they live as long as those (the tables are kept on them).
"""
from __future__ import annotations

import os
import time

import numba
import numpy as np
from numba import carray, njit, types
from numba.core.compiler_lock import global_compiler_lock
from numba.extending import intrinsic

from . import linear, native_call, ops

_JIT = dict(cache=True, nogil=True)

# ---------------------------------------------------------------- the callees' signatures (native_call.declare)
_F32_1 = types.Array(types.float32, 1, "C")
_F32_2 = types.Array(types.float32, 2, "C")
_F32_3 = types.Array(types.float32, 3, "C")
_I64_2 = types.Array(types.int64, 2, "C")
_I64_1 = types.Array(types.int64, 1, "C")
_RAW = types.Array(types.uint8, 1, "C", readonly=True)  # a weight matrix's bytes, as the file's mmap gives them
_PRODUCT_ARGS = (types.UniTuple(_RAW, 3), types.int64, types.Array(types.int8, 2, "C"), _F32_2,
                 types.Array(types.int32, 2, "C"), types.UniTuple(_F32_2, 3))
_QUANTIZE_ARGS = (_F32_2, types.Array(types.int8, 2, "C"), _F32_2, types.Array(types.int32, 2, "C"),
                  types.Array(types.float32, 2, "A"))
# a KV side with a leading sequence axis (attention_q.KVSide: layout code, then nine arrays of fixed dtype and rank)
_KV_FIELDS = ((np.float32, 4), (np.uint16, 4), (np.uint8, 4), (np.uint8, 5), (np.uint8, 4), (np.uint8, 5),
              (np.uint16, 4), (np.uint16, 4), (np.uint16, 4))
_KV_SIDE = types.Tuple((types.int64,) + tuple(types.Array(numba.from_dtype(np.dtype(dt)), nd, "C")
                                              for dt, nd in _KV_FIELDS))
_ATTEND_ARGS = (_F32_3, _F32_3, _F32_3, _KV_SIDE, _KV_SIDE, _I64_1, _I64_1, _I64_1, types.boolean, types.int64,
                types.float32, types.int64, types.int64, types.int64, _F32_3, _I64_1)
_DECLARED = {
    ops._rmsnorm_serial: (_F32_2, _F32_1, types.float32, _F32_2),
    ops._add_rmsnorm_serial: (_F32_2, _F32_2, _F32_1, types.float32, _F32_2),
    ops._qk_serial: (_F32_3, _F32_3, _F32_1, _F32_1, types.float32, types.boolean, _I64_1, _F32_1, types.boolean),
    ops._silu_mul_in_place_serial: (_F32_2, _F32_2),
    ops._gelu_mul_in_place_serial: (_F32_2, _F32_2),
    linear._quantize_act: _QUANTIZE_ARGS,
    linear._quantize_act_super: _QUANTIZE_ARGS,
}
for _fn, _args in _DECLARED.items():
    native_call.declare(_fn, _args)


# Stand-ins that carry the signatures of callees chosen at run time (a product kernel of any weight type, the decode
# attention of any cache layouts): native_call.call types a call by its dispatcher's declared signature and jumps to
# the address it is given. Never compiled.
@njit
def _product(raws, n_in, qx, dx, bsums, outs):  # linear._mm_template's drivers, batch_dot's
    pass


@njit
def _attend(q, k, v, kpool, vpool, seqs, positions, held, store, n_kv, scale, window, nslots, threads, out, fns):
    pass  # attention_q._attend_decode_template's kernels


native_call.declare(_product, _PRODUCT_ARGS)
native_call.declare(_attend, _ATTEND_ARGS)

# the serial kernels' addresses, in this order, are the driver's `ops_addr`
_OPS = (ops._rmsnorm_serial, ops._add_rmsnorm_serial, ops._qk_serial, ops._silu_mul_in_place_serial,
        ops._gelu_mul_in_place_serial, linear._quantize_act, linear._quantize_act_super)
_RMS, _ADD_RMS, _QK, _SILU, _GELU, _QUANT32, _QUANT256 = range(len(_OPS))


def product_address(kernel) -> int:
    """The address of a product kernel (one of linear's or batch_dot's drivers) for `_product`'s signature."""
    native_call.declare(kernel, _PRODUCT_ARGS)
    return native_call.address(kernel)


def attend_address(kernel) -> int:
    """The address of an attention_q decode kernel for `_attend`'s signature."""
    native_call.declare(kernel, _ATTEND_ARGS)
    return native_call.address(kernel)


def ops_addresses(needed) -> np.ndarray:
    """The addresses of `_OPS` (0 for those not in `needed`: a kernel the model never calls is never compiled)."""
    return np.array([native_call.address(fn) if fn in needed else 0 for fn in _OPS], np.int64)


# ---------------------------------------------------------------- tables
# Products: one row per kernel call, in the Python path's order (linear._rows_plan): the kernel's address, the
# activations' group (linear.act_group), the input width, then per matrix slot (3) its bytes' address and size
# and the buffer it writes (_Q .. _LOGITS, or -1: a padding slot).
_Q, _K, _V, _O, _G, _U, _DOWN, _LOGITS = range(8)
PHASES = 4  # per layer: Q/K/V, attn_output, gate/up, down; the classifier's calls after the last layer's


def call_row(kernel_addr: int, group: int, n_in: int, raws3: tuple, dests: list[int]) -> list[int]:
    row = [kernel_addr, group, n_in]
    for k in range(3):
        raw = raws3[k]
        d = dests[k] if k < len(dests) else -1
        row += [raw.ctypes.data, raw.nbytes, d] if d >= 0 else [0, 0, -1]
    return row


def kv_row(side: tuple) -> list[list[int]]:
    """A KV side with a leading sequence axis (tuple(KVSide)) as 9 rows of [address, shape (padded to 5)]."""
    rows = []
    for a, (dt, nd) in zip(side[1:], _KV_FIELDS):
        if a.dtype != dt or a.ndim != nd or not a.flags.c_contiguous:
            raise TypeError(f"decode_pass: a KV array {a.dtype} {a.shape} is not {np.dtype(dt)} of rank {nd}")
        rows.append([a.ctypes.data] + list(a.shape) + [0] * (5 - nd))
    return rows


# ---------------------------------------------------------------- the driver
@intrinsic
def _voidptr(typingctx, addr):
    """An integer address as a void pointer (for numba.carray)."""
    if not isinstance(addr, types.Integer):
        return None
    sig = types.voidptr(addr)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))
    return sig, codegen


@njit(inline="always", **_JIT)
def _bytes(calls, c, k):
    """Matrix slot k of call c: its bytes (an empty array for a padding slot)."""
    n = calls[c, 4 + 3 * k]
    return carray(_voidptr(calls[c, 3 + 3 * k] if n else 0), n, np.uint8)


@njit(inline="always", **_JIT)
def _side(kv, il, s, layout):
    t = kv[il, s]
    return (layout,
            carray(_voidptr(t[0, 0]), (t[0, 1], t[0, 2], t[0, 3], t[0, 4]), np.float32),
            carray(_voidptr(t[1, 0]), (t[1, 1], t[1, 2], t[1, 3], t[1, 4]), np.uint16),
            carray(_voidptr(t[2, 0]), (t[2, 1], t[2, 2], t[2, 3], t[2, 4]), np.uint8),
            carray(_voidptr(t[3, 0]), (t[3, 1], t[3, 2], t[3, 3], t[3, 4], t[3, 5]), np.uint8),
            carray(_voidptr(t[4, 0]), (t[4, 1], t[4, 2], t[4, 3], t[4, 4]), np.uint8),
            carray(_voidptr(t[5, 0]), (t[5, 1], t[5, 2], t[5, 3], t[5, 4], t[5, 5]), np.uint8),
            carray(_voidptr(t[6, 0]), (t[6, 1], t[6, 2], t[6, 3], t[6, 4]), np.uint16),
            carray(_voidptr(t[7, 0]), (t[7, 1], t[7, 2], t[7, 3], t[7, 4]), np.uint16),
            carray(_voidptr(t[8, 0]), (t[8, 1], t[8, 2], t[8, 3], t[8, 4]), np.uint16))


@njit(**_JIT)
def _products(calls, c0, c1, X, bufs, ops_addr):
    """Kernel calls c0..c1-1 on the activations X (B, n): linear.matmul_rows_many's fused calls, into `bufs`."""
    B, n = X.shape
    qx = np.empty((B, n), np.int8)
    dx = np.empty((B, n // 32), np.float32)
    sums = np.empty((B, n // 16 + n // 32), np.float32)  # linear._quantized's bsums: int32 sums, then a float tail
    bsums = sums.view(np.int32)
    dsums = sums[:, n // 16:]
    empty = np.empty((B, 0), np.float32)
    done = 0
    for c in range(c0, c1):
        group = calls[c, 1]
        if group != done:
            if group == 256:
                native_call.call(linear._quantize_act_super, ops_addr[_QUANT256], (X, qx, dx, bsums, dsums))
            else:
                native_call.call(linear._quantize_act, ops_addr[_QUANT32], (X, qx, dx, bsums, dsums))
            done = group
        d0, d1, d2 = calls[c, 5], calls[c, 8], calls[c, 11]
        native_call.call(_product, calls[c, 0], (
            (_bytes(calls, c, 0), _bytes(calls, c, 1), _bytes(calls, c, 2)), n, qx, dx, bsums,
            (bufs[d0] if d0 >= 0 else empty, bufs[d1] if d1 >= 0 else empty, bufs[d2] if d2 >= 0 else empty)))


@njit(**_JIT)
def _step(x, positions, seqs, calls, starts, norms, post_norms, q_norm, k_norm, qk_norm, biases, rope, freqs, neox,
          eps, res_scale, gelu, dims, kv, kv_layout, windows, nslots, scale, threads, attend_addr, fns, output_norm,
          logits, ops_addr):
    """Every layer of one decode token of each of B sequences, then the classifier.

    x (B, d): the token embeddings, the residual stream in place; positions, seqs (B,): each row's position and
    sequence in the pooled caches; calls, starts: the product table (call_row) and call c of layer il's phase p in
    starts[il * PHASES + p] .. the next (the classifier's after the last); norms (L, 2, d): the attention's and the
    feed-forward's input norms; post_norms (L, 2, d): norms of their outputs before the residual (Gemma 3), or (L, 2,
    0) for none (Llama: each residual add shares a kernel call with the norm after it, as llama.layer's); q_norm,
    k_norm (L, head_dim) (or (L, 0)) and qk_norm; biases: (L, n_q + 2 n_kv) q/k/v biases or (L, 0); rope (L,): the
    row of freqs (tables of RoPE frequencies) layer il rotates with, -1 for none; res_scale: each sublayer's output
    times this (Granite); gelu: GeGLU, else SwiGLU; dims: n_head, n_head_kv, head_dim, n_ff, n_q (n_head x
    head_dim); kv (L, 2, 9, 6) and kv_layout (L, 2): the caches' arrays (kv_row); windows, nslots (L,); fns: the
    attention's callee addresses; logits (B, n_vocab) out."""
    B, d = x.shape
    H, Hkv, D, ff, nq = dims[0], dims[1], dims[2], dims[3], dims[4]
    nkv = Hkv * D
    L = norms.shape[0]
    post = post_norms.shape[2] > 0
    held = positions + 1
    no_freq = np.empty(0, np.float32)
    h = np.empty((B, d), np.float32)
    res = np.empty((B, d), np.float32)
    for il in range(L):
        q = np.empty((B, nq), np.float32)
        k = np.empty((B, nkv), np.float32)
        v = np.empty((B, nkv), np.float32)
        o = np.empty((B, d), np.float32)
        g = np.empty((B, ff), np.float32)
        u = np.empty((B, ff), np.float32)
        down = np.empty((B, d), np.float32)
        bufs = (q, k, v, o, g, u, down, logits)
        if il == 0 or post:
            native_call.call(ops._rmsnorm_serial, ops_addr[_RMS], (x, norms[il, 0], eps, h))
        else:
            native_call.call(ops._add_rmsnorm_serial, ops_addr[_ADD_RMS], (x, res, norms[il, 0], eps, h))
        p = il * PHASES
        _products(calls, starts[p], starts[p + 1], h, bufs, ops_addr)
        if biases.shape[1]:
            for b in range(B):
                for i in range(nq):
                    q[b, i] += biases[il, i]
                for i in range(nkv):
                    k[b, i] += biases[il, nq + i]
                    v[b, i] += biases[il, nq + nkv + i]
        q3 = q.reshape((B, H, D))
        k3 = k.reshape((B, Hkv, D))
        native_call.call(ops._qk_serial, ops_addr[_QK], (q3, k3, q_norm[il], k_norm[il], eps, qk_norm, positions,
                                                        freqs[rope[il]] if rope[il] >= 0 else no_freq, neox))
        a = np.empty((B, H, D), np.float32)
        native_call.call(_attend, attend_addr, (q3, k3, v.reshape((B, Hkv, D)), _side(kv, il, 0, kv_layout[il, 0]),
                                                _side(kv, il, 1, kv_layout[il, 1]), seqs, positions, held, True, Hkv,
                                                scale, windows[il], nslots[il], threads, a, fns))
        _products(calls, starts[p + 1], starts[p + 2], a.reshape((B, nq)), bufs, ops_addr)
        if post:  # x += norm(o), then the feed-forward's norm
            _add_normed(x, o, post_norms[il, 0], eps, h, ops_addr)
            native_call.call(ops._rmsnorm_serial, ops_addr[_RMS], (x, norms[il, 1], eps, h))
        else:
            _scale_rows(o, res_scale)
            native_call.call(ops._add_rmsnorm_serial, ops_addr[_ADD_RMS], (x, o, norms[il, 1], eps, h))
        _products(calls, starts[p + 2], starts[p + 3], h, bufs, ops_addr)
        if gelu:
            native_call.call(ops._gelu_mul_in_place_serial, ops_addr[_GELU], (g, u))
        else:
            native_call.call(ops._silu_mul_in_place_serial, ops_addr[_SILU], (g, u))
        _products(calls, starts[p + 3], starts[p + 4], g, bufs, ops_addr)
        if post:
            _add_normed(x, down, post_norms[il, 1], eps, h, ops_addr)
        else:
            _scale_rows(down, res_scale)
            res = down  # added to x by the next layer's norm call
    if not post:
        for b in range(B):
            for i in range(d):
                x[b, i] += res[b, i]
    native_call.call(ops._rmsnorm_serial, ops_addr[_RMS], (x, output_norm, eps, h))
    _products(calls, starts[L * PHASES], starts[L * PHASES + 1], h, (h, h, h, h, h, h, h, logits), ops_addr)


@njit(inline="always", **_JIT)
def _scale_rows(y, s):
    if s != 1.0:
        for b in range(y.shape[0]):
            for i in range(y.shape[1]):
                y[b, i] *= s


@njit(inline="always", **_JIT)
def _add_normed(x, y, w, eps, tmp, ops_addr):
    """x += RMSNorm(y) with weight w (tmp: scratch of x's shape), as x += rmsnorm(y, w, eps) in numpy."""
    native_call.call(ops._rmsnorm_serial, ops_addr[_RMS], (y, w, eps, tmp))
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            x[b, i] += tmp[b, i]


# _step's argument types, as `step` passes them (compile(): a first run's worker compiles it ahead, cpu_kernels
# callees by address need only their declared signatures)
STEP_ARGS = (_F32_2, _I64_1, _I64_1, _I64_2, _I64_1, _F32_3, _F32_3, _F32_2, _F32_2, types.boolean, _F32_2, _I64_1,
             _F32_2, types.boolean, types.float32, types.float32, types.boolean, _I64_1,
             types.Array(types.int64, 4, "C"), _I64_2, _I64_1, _I64_1, types.float32, types.int64, types.int64,
             _I64_1, _F32_1, _F32_2, _I64_1)


def compile() -> None:
    """Compile `_step` (or load it from the disk cache) for the types `step` calls it with."""
    _step.compile(STEP_ARGS)


_next_look = [0.0]  # when ready() may next look in the disk cache
_OFF = os.environ.get("EDGEQ_DECODE_PASS", "1") == "0"  # the layers from Python, for A/B measurements


def ready() -> bool:
    """Whether `_step` can run now without compiling: compiled or loaded in this process, or found in Numba's disk
    cache (looked for at most once a second). The warm-up compiles it (`compile`: a first run's worker process, so
    that a first answer never waits ~3 s for it); until then the forward passes run their layers from Python, and
    always with EDGEQ_DECODE_PASS=0."""
    if _OFF:
        return False
    if _step.signatures:
        return True
    now = time.monotonic()
    if now < _next_look[0]:
        return False
    _next_look[0] = now + 1.0
    # Dispatcher.compile's disk-cache lookup, without its compile after a miss
    with global_compiler_lock:
        if not _step.signatures:
            cres = _step._cache.load_overload(STEP_ARGS, _step.targetctx)
            if cres is None:
                return False
            _step.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
            _step.add_overload(cres)
    return True


def step(x: np.ndarray, positions: np.ndarray, seqs: np.ndarray, model: "Tables", cache: "CacheTables",
         freqs: np.ndarray, logits: np.ndarray) -> None:
    """`_step` with a model's tables (`Tables`), its caches' (`CacheTables`) and its RoPE tables (n, n_rot / 2)."""
    m, c = model, cache
    _step(x, positions, seqs, m.calls, m.starts, m.norms, m.post_norms, m.q_norm, m.k_norm, m.qk_norm, m.biases,
          m.rope, freqs, m.neox, m.eps, m.res_scale, m.gelu, m.dims, c.kv, c.layout, c.windows, c.nslots, m.scale,
          numba.get_num_threads(), c.attend_addr, c.fns, m.output_norm, logits, m.ops_addr)


def product_table(layers, output, B: int) -> tuple[np.ndarray, np.ndarray, list] | None:
    """(calls, starts, the weight arrays they address) for `_step` on B rows: each layer's products (Linears wq, wk,
    wv, wo, w_gate, w_up, w_down, as the model modules name them) in its phases, then the classifier `output`, each
    phase as linear.matmul_rows_many groups it (linear.rows_calls). None where a matrix has no integer kernel."""
    phases = [phase for L in layers for phase in (
        ((L.wq, L.wk, L.wv), (_Q, _K, _V)), ((L.wo,), (_O,)), ((L.w_gate, L.w_up), (_G, _U)), ((L.w_down,), (_DOWN,)))]
    calls, starts, keep = [], [], []
    for lins, dests in phases + [((output,), (_LOGITS,))]:
        starts.append(len(calls))
        fused = linear.rows_calls([lin.q for lin in lins], B)
        if fused is None:
            return None
        for kernel, group, n_in, raws3, idx in fused:
            calls.append(call_row(product_address(kernel), group, n_in, raws3, [dests[i] for i in idx]))
            keep.append(raws3)
    starts.append(len(calls))
    return np.array(calls, np.int64), np.array(starts, np.int64), keep


class Tables:
    """A model's side of `_step`: the products' table (one per batch size: the kernels differ) and the layers'
    small tensors, packed (see _step). Built by the model module (models/llama.py, models/gemma3.py)."""

    def __init__(self, table: tuple, norms, post_norms, q_norm, k_norm, qk_norm: bool, biases, rope, neox: bool,
                 eps: float, res_scale: float, gelu: bool, dims, scale: float, output_norm):
        self.calls, self.starts, self.keep = table  # keep: the weight arrays whose addresses `calls` holds
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        self.norms, self.post_norms, self.q_norm, self.k_norm = f32(norms), f32(post_norms), f32(q_norm), f32(k_norm)
        self.biases, self.output_norm = f32(biases), f32(output_norm)
        self.rope = np.asarray(rope, np.int64)
        self.qk_norm, self.neox, self.gelu = bool(qk_norm), bool(neox), bool(gelu)
        self.eps, self.res_scale, self.scale = np.float32(eps), np.float32(res_scale), np.float32(scale)
        self.dims = np.asarray(dims, np.int64)
        groups = set(self.calls[:, 1].tolist())
        self.ops_addr = ops_addresses({ops._rmsnorm_serial, ops._add_rmsnorm_serial, ops._qk_serial,
                                       ops._gelu_mul_in_place_serial if gelu else ops._silu_mul_in_place_serial}
                                      | ({linear._quantize_act} if groups - {256} else set())
                                      | ({linear._quantize_act_super} if 256 in groups else set()))


class CacheTables:
    """A cache group's side of `_step` (runtime/kv_cache.py `KVCache.decode_tables`)."""

    def __init__(self, kv: np.ndarray, layout: np.ndarray, windows: np.ndarray, nslots: np.ndarray, attend_addr: int,
                 fns: np.ndarray, keep):
        self.kv, self.layout, self.windows, self.nslots = kv, layout, windows, nslots
        self.attend_addr, self.fns = attend_addr, fns
        self.keep = keep  # the cache arrays whose addresses `kv` holds

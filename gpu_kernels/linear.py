"""CUDA matrix products over GGUF quantized weights, decoded inside the kernel.

The weight stays on the device as the file's raw block bytes (uint8, one row after another), so a
4-bit model takes 4-bit memory on the GPU too (F32 weights stay float32 values). Every kernel works in
"units" of 32 weights: one Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 block, or one 32-weight sub-block of a
Q4_K/Q5_K/Q6_K super-block, or 32 F16/F32 values. One thread block computes one output (row, token):
its threads take units in turn, each returns its 32-weight dot product, and a shared-memory tree sums
the partials. The prefill product is the same kernel over a 2-D grid (row, token).

Block layouts follow gguf-py's `gguf/quants.py` (the reference in tests/test_gpu_kernels.py).
f16 scales are decoded from their bit pattern with integer arithmetic: no float16 loads, and the same
code runs in the simulator.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32

from edgeq.formats.quants import QTYPES

from .device import to_device

UNIT = 32  # weights per unit of work
DEFAULT_THREADS = 128  # per block; a power of two (the reduction halves it)


# ---------------------------------------------------------------- scalar decoders
@cuda.jit(device=True, inline=True)
def f16_to_f32(lo, hi):
    """IEEE half from its two little-endian bytes, exactly (every half is a float32)."""
    h = int32(lo) | (int32(hi) << 8)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:  # zero or subnormal: m * 2^-24
        v = float32(m) * float32(5.960464477539063e-08)
    elif e == 31:
        v = float32(np.inf) if m == 0 else float32(np.nan)
    else:  # (1024 + m) * 2^(e - 25), both factors exact in float32
        v = float32(m | 0x400) * (float32(int32(1) << e) * float32(2.9802322387695312e-08))
    if h & 0x8000:
        v = -v
    return v


@cuda.jit(device=True, inline=True)
def _i8(b):
    return (int32(b) ^ 0x80) - 0x80


@cuda.jit(device=True, inline=True)
def _k_scale_min(w, sc_off, j):
    """Q4_K/Q5_K 6-bit scale and min of sub-block j from the 12 packed bytes at sc_off."""
    if j < 4:
        sc = int32(w[sc_off + j]) & 63
        mn = int32(w[sc_off + j + 4]) & 63
    else:
        sc = (int32(w[sc_off + j + 4]) & 0xF) | ((int32(w[sc_off + j - 4]) >> 6) << 4)
        mn = (int32(w[sc_off + j + 4]) >> 4) | ((int32(w[sc_off + j]) >> 6) << 4)
    return sc, mn


# ---------------------------------------------------------------- per-unit dot products
# Each: (w raw bytes of all rows, base byte offset of the row, unit index u, x (T, n_in), token t, n_in)
# -> float32 dot product of weights u*32 .. u*32+31 of the row with x[t]. (F32: w is float32 values and
# base an element offset.)

@cuda.jit(device=True)
def _dot_f32(w, base, u, x, t, n_in):
    s = float32(0.0)
    e0 = u * 32
    for i in range(32):
        e = e0 + i
        if e < n_in:
            s += w[base + e] * x[t, e]
    return s


@cuda.jit(device=True)
def _dot_f16(w, base, u, x, t, n_in):
    s = float32(0.0)
    e0 = u * 32
    for i in range(32):
        e = e0 + i
        if e < n_in:
            o = base + 2 * e
            s += f16_to_f32(w[o], w[o + 1]) * x[t, e]
    return s


@cuda.jit(device=True)
def _dot_q8_0(w, base, u, x, t, n_in):
    o = base + 34 * u
    d = f16_to_f32(w[o], w[o + 1])
    e0 = u * 32
    s = float32(0.0)
    for i in range(32):
        s += float32(_i8(w[o + 2 + i])) * x[t, e0 + i]
    return d * s


@cuda.jit(device=True)
def _dot_q4_0(w, base, u, x, t, n_in):
    o = base + 18 * u
    d = f16_to_f32(w[o], w[o + 1])
    e0 = u * 32
    s = float32(0.0)
    for i in range(16):
        b = int32(w[o + 2 + i])
        s += float32((b & 15) - 8) * x[t, e0 + i] + float32((b >> 4) - 8) * x[t, e0 + 16 + i]
    return d * s


@cuda.jit(device=True)
def _dot_q4_1(w, base, u, x, t, n_in):
    o = base + 20 * u
    d = f16_to_f32(w[o], w[o + 1])
    m = f16_to_f32(w[o + 2], w[o + 3])
    e0 = u * 32
    s = float32(0.0)
    sx = float32(0.0)
    for i in range(16):
        b = int32(w[o + 4 + i])
        xa = x[t, e0 + i]
        xb = x[t, e0 + 16 + i]
        s += float32(b & 15) * xa + float32(b >> 4) * xb
        sx += xa + xb
    return d * s + m * sx


@cuda.jit(device=True)
def _dot_q5_0(w, base, u, x, t, n_in):
    o = base + 22 * u
    d = f16_to_f32(w[o], w[o + 1])
    qh = int32(w[o + 2]) | (int32(w[o + 3]) << 8) | (int32(w[o + 4]) << 16) | (int32(w[o + 5]) << 24)
    e0 = u * 32
    s = float32(0.0)
    for i in range(16):
        b = int32(w[o + 6 + i])
        lo = (b & 15) | (((qh >> i) & 1) << 4)
        hi = (b >> 4) | (((qh >> (i + 16)) & 1) << 4)
        s += float32(lo - 16) * x[t, e0 + i] + float32(hi - 16) * x[t, e0 + 16 + i]
    return d * s


@cuda.jit(device=True)
def _dot_q5_1(w, base, u, x, t, n_in):
    o = base + 24 * u
    d = f16_to_f32(w[o], w[o + 1])
    m = f16_to_f32(w[o + 2], w[o + 3])
    qh = int32(w[o + 4]) | (int32(w[o + 5]) << 8) | (int32(w[o + 6]) << 16) | (int32(w[o + 7]) << 24)
    e0 = u * 32
    s = float32(0.0)
    sx = float32(0.0)
    for i in range(16):
        b = int32(w[o + 8 + i])
        lo = (b & 15) | (((qh >> i) & 1) << 4)
        hi = (b >> 4) | (((qh >> (i + 16)) & 1) << 4)
        xa = x[t, e0 + i]
        xb = x[t, e0 + 16 + i]
        s += float32(lo) * xa + float32(hi) * xb
        sx += xa + xb
    return d * s + m * sx


@cuda.jit(device=True)
def _dot_q4_k(w, base, u, x, t, n_in):
    sb = u // 8
    j = u - 8 * sb
    o = base + 144 * sb
    d = f16_to_f32(w[o], w[o + 1])
    dmin = f16_to_f32(w[o + 2], w[o + 3])
    sc, mn = _k_scale_min(w, o + 4, j)
    q_off = o + 16 + 32 * (j >> 1)
    shift = 4 * (j & 1)
    e0 = u * 32
    s = float32(0.0)
    sx = float32(0.0)
    for i in range(32):
        xv = x[t, e0 + i]
        s += float32((int32(w[q_off + i]) >> shift) & 15) * xv
        sx += xv
    return d * float32(sc) * s - dmin * float32(mn) * sx


@cuda.jit(device=True)
def _dot_q5_k(w, base, u, x, t, n_in):
    sb = u // 8
    j = u - 8 * sb
    o = base + 176 * sb
    d = f16_to_f32(w[o], w[o + 1])
    dmin = f16_to_f32(w[o + 2], w[o + 3])
    sc, mn = _k_scale_min(w, o + 4, j)
    qh_off = o + 16
    q_off = o + 48 + 32 * (j >> 1)
    shift = 4 * (j & 1)
    e0 = u * 32
    s = float32(0.0)
    sx = float32(0.0)
    for i in range(32):
        q = ((int32(w[q_off + i]) >> shift) & 15) | (((int32(w[qh_off + i]) >> j) & 1) << 4)
        xv = x[t, e0 + i]
        s += float32(q) * xv
        sx += xv
    return d * float32(sc) * s - dmin * float32(mn) * sx


@cuda.jit(device=True)
def _dot_q6_k(w, base, u, x, t, n_in):
    sb = u // 8
    j = u - 8 * sb  # 32-weight chunk: half h = j // 4, quarter q = j % 4
    h = j >> 2
    q = j & 3
    o = base + 210 * sb
    d = f16_to_f32(w[o + 208], w[o + 209])
    ql_off = o + 64 * h + 32 * (q & 1)
    qh_off = o + 128 + 32 * h
    shift_l = 4 * (q >> 1)
    shift_h = 2 * q
    sc_off = o + 192 + 8 * h + 2 * q  # two 16-weight scales per chunk
    e0 = u * 32
    s0 = float32(0.0)
    s1 = float32(0.0)
    for i in range(16):
        v0 = ((int32(w[ql_off + i]) >> shift_l) & 15) | (((int32(w[qh_off + i]) >> shift_h) & 3) << 4)
        v1 = ((int32(w[ql_off + 16 + i]) >> shift_l) & 15) | (((int32(w[qh_off + 16 + i]) >> shift_h) & 3) << 4)
        s0 += float32(v0 - 32) * x[t, e0 + i]
        s1 += float32(v1 - 32) * x[t, e0 + 16 + i]
    return d * (float32(_i8(w[sc_off])) * s0 + float32(_i8(w[sc_off + 1])) * s1)


_UNIT_DOTS = {
    "F32": _dot_f32, "F16": _dot_f16, "Q8_0": _dot_q8_0, "Q4_0": _dot_q4_0, "Q4_1": _dot_q4_1,
    "Q5_0": _dot_q5_0, "Q5_1": _dot_q5_1, "Q4_K": _dot_q4_k, "Q5_K": _dot_q5_k, "Q6_K": _dot_q6_k,
}
# qtype -> (weights per block, bytes per block) of the types with a kernel, from the registry (formats/quants.py)
QTYPE_BLOCKS = {q: (QTYPES[q].block_size, QTYPES[q].block_bytes) for q in _UNIT_DOTS}


# ---------------------------------------------------------------- the kernel
def _make_kernel(unit_dot, threads):
    """out[t, row] = W[row] . x[t]; grid (n_out, T), `threads` threads per block. `row_stride` is a row's
    length in elements of w (bytes; F32: values)."""

    @cuda.jit
    def kernel(w, row_stride, x, n_in, out):
        row = cuda.blockIdx.x
        t = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        partial = cuda.shared.array(threads, float32)
        base = row * row_stride
        acc = float32(0.0)
        for u in range(tid, (n_in + 31) // 32, threads):
            acc += unit_dot(w, base, u, x, t, n_in)
        partial[tid] = acc
        cuda.syncthreads()
        stride = threads // 2
        while stride > 0:
            if tid < stride:
                partial[tid] += partial[tid + stride]
            cuda.syncthreads()
            stride //= 2
        if tid == 0:
            out[t, row] = partial[0]

    return kernel


_KERNELS: dict = {}


def matmul_kernel(qtype: str, threads: int = DEFAULT_THREADS):
    """The compiled-on-first-launch kernel for one weight type and block size (cached)."""
    if threads & (threads - 1) or not 1 <= threads <= 1024:
        raise ValueError(f"threads must be a power of two in 1..1024, got {threads}")
    key = (qtype, threads)
    if key not in _KERNELS:
        _KERNELS[key] = _make_kernel(_UNIT_DOTS[qtype], threads)
    return _KERNELS[key]


class CudaLinear:
    """One weight matrix (n_out, n_in) kept on the device as raw GGUF bytes.

    `matvec(d_x, d_out)`: d_x float32 (n_in,) or (1, n_in) -> d_out (n_out,) or (1, n_out).
    `matmul(d_X, d_out)`: d_X float32 (T, n_in) -> d_out (T, n_out). Both take and fill device arrays,
    launch on `stream` (0: the default stream) and return d_out. `matvec_host`/`matmul_host` copy in
    and out, for tests."""

    def __init__(self, raw: np.ndarray, qtype: str, shape: tuple[int, int], threads: int = DEFAULT_THREADS):
        if qtype not in QTYPE_BLOCKS:
            raise ValueError(f"CudaLinear: no CUDA kernel for {qtype} (have {', '.join(QTYPE_BLOCKS)})")
        n_out, n_in = (int(shape[0]), int(shape[1]))
        block_elems, block_bytes = QTYPE_BLOCKS[qtype]
        if n_in % block_elems:
            raise ValueError(f"CudaLinear: row length {n_in} is not a multiple of the {qtype} block size {block_elems}")
        self.qtype, self.shape, self.threads = qtype, (n_out, n_in), threads
        self.row_bytes = n_in // block_elems * block_bytes
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
        if raw.size != n_out * self.row_bytes:
            raise ValueError(f"CudaLinear: {raw.size} bytes for {qtype} {shape}, expected {n_out * self.row_bytes}")
        if qtype == "F32":  # the kernel reads float32 values: the row stride is counted in them
            raw, self.row_stride = raw.view(np.float32), n_in
        else:
            self.row_stride = self.row_bytes
        self.d_w = to_device(raw)  # uploaded once
        self._kernel = matmul_kernel(qtype, threads)

    @property
    def nbytes(self) -> int:
        return int(self.d_w.size) * self.d_w.dtype.itemsize

    def matmul(self, d_X, d_out, stream=0):
        T, n_in = d_X.shape
        n_out = self.shape[0]
        if n_in != self.shape[1] or tuple(d_out.shape) != (T, n_out):
            raise ValueError(f"CudaLinear.matmul: X {tuple(d_X.shape)} / out {tuple(d_out.shape)} vs weight {self.shape}")
        self._kernel[(n_out, T), self.threads, stream](self.d_w, self.row_stride, d_X, n_in, d_out)
        return d_out

    def matvec(self, d_x, d_out, stream=0):
        if d_x.ndim == 1:
            self.matmul(d_x.reshape(1, d_x.shape[0]), d_out.reshape(1, d_out.shape[0]), stream)
            return d_out
        return self.matmul(d_x, d_out, stream)

    def matmul_host(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        d_out = cuda.device_array((X.shape[0], self.shape[0]), dtype=np.float32)
        self.matmul(to_device(X), d_out)
        return d_out.copy_to_host()

    def matvec_host(self, x: np.ndarray) -> np.ndarray:
        return self.matmul_host(np.asarray(x, dtype=np.float32).reshape(1, -1))[0]

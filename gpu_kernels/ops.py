"""CUDA kernels for everything in a transformer layer except the matrix products.

Mirrors cpu_kernels/ops.py, on device arrays: each host function checks shapes, launches one kernel
and returns its output device array (nothing is copied back). Numpy twins live in
tests/test_gpu_kernels.py. `threads` is the block size (a power of two); the simulator tests use a
small one, a GPU wants 128-256.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

DEFAULT_THREADS = 128
MAX_HEAD_DIM = 512  # shared accumulator of the attention kernel


def _check_threads(threads):
    if threads & (threads - 1) or not 1 <= threads <= 1024:
        raise ValueError(f"threads must be a power of two in 1..1024, got {threads}")


def _blocks(n, threads):
    """Blocks for a grid-stride loop over n elements (at most 1024: the loop covers the rest)."""
    return max(1, min((n + threads - 1) // threads, 1024))


def _cached(make):
    """Build one kernel per block size: shared-memory sizes are compile-time constants."""
    kernels = {}

    def get(threads):
        _check_threads(threads)
        if threads not in kernels:
            kernels[threads] = make(threads)
        return kernels[threads]

    return get


@cuda.jit(device=True, inline=True)
def _block_sum(buf, tid, threads):
    # Tree reduction over buf[0:threads]; every thread must call it. Result in buf[0].
    cuda.syncthreads()
    stride = threads // 2
    while stride > 0:
        if tid < stride:
            buf[tid] += buf[tid + stride]
        cuda.syncthreads()
        stride //= 2


@cuda.jit(device=True, inline=True)
def _block_max(buf, tid, threads):
    cuda.syncthreads()
    stride = threads // 2
    while stride > 0:
        if tid < stride and buf[tid + stride] > buf[tid]:
            buf[tid] = buf[tid + stride]
        cuda.syncthreads()
        stride //= 2


# ---------------------------------------------------------------- RMSNorm
def _make_rmsnorm(threads):
    @cuda.jit
    def kernel(x, w, eps, out):
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        n = x.shape[1]
        buf = cuda.shared.array(threads, float32)
        ss = float32(0.0)
        for i in range(tid, n, threads):
            ss += x[r, i] * x[r, i]
        buf[tid] = ss
        _block_sum(buf, tid, threads)
        inv = float32(1.0) / math.sqrt(buf[0] / float32(n) + eps)
        for i in range(tid, n, threads):
            out[r, i] = x[r, i] * inv * w[i]

    return kernel


_rmsnorm = _cached(_make_rmsnorm)


def rmsnorm(d_x, d_w, eps: float, d_out, threads: int = DEFAULT_THREADS, stream=0):
    """RMSNorm of each row of d_x (rows, n) with weight d_w (n,) into d_out (rows, n); one block per row.
    d_out may be d_x (each thread rewrites only the elements it read)."""
    rows, n = d_x.shape
    if d_w.shape[0] != n or tuple(d_out.shape) != (rows, n):
        raise ValueError(f"rmsnorm: x {tuple(d_x.shape)}, w {tuple(d_w.shape)}, out {tuple(d_out.shape)}")
    _rmsnorm(threads)[rows, threads, stream](d_x, d_w, np.float32(eps), d_out)
    return d_out


# ---------------------------------------------------------------- RoPE
@cuda.jit
def _rope_kernel(x, positions, inv_freq, neox):
    # grid (T, H); threads stride over the rotated pairs i < len(inv_freq).
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    half = inv_freq.shape[0]
    p = float32(positions[t])
    for i in range(cuda.threadIdx.x, half, cuda.blockDim.x):
        ang = p * inv_freq[i]
        c = float32(math.cos(ang))
        s = float32(math.sin(ang))
        if neox:
            a = x[t, h, i]
            b = x[t, h, i + half]
            x[t, h, i] = a * c - b * s
            x[t, h, i + half] = a * s + b * c
        else:
            a = x[t, h, 2 * i]
            b = x[t, h, 2 * i + 1]
            x[t, h, 2 * i] = a * c - b * s
            x[t, h, 2 * i + 1] = a * s + b * c


def rope(d_x, d_positions, d_inv_freq, neox: bool, threads: int = DEFAULT_THREADS, stream=0):
    """Rotate d_x float32 (T, H, D) in place. d_positions int32/int64 (T,); d_inv_freq float32 (n_rot/2,)
    from cpu_kernels.ops.rope_inv_freq. neox=False pairs (2i, 2i+1), neox=True pairs (i, i + n_rot/2)."""
    T, H, D = d_x.shape
    if 2 * d_inv_freq.shape[0] > D or d_positions.shape[0] != T:
        raise ValueError("rope: rotation width or positions do not match x")
    _check_threads(threads)
    _rope_kernel[(T, H), threads, stream](d_x, d_positions, d_inv_freq, bool(neox))
    return d_x


# ---------------------------------------------------------------- attention
def _make_attention(threads):
    @cuda.jit
    def kernel(q, kc, vc, pos0, scale, window, out):
        # One block per (query head h, new token t). Keys are taken `threads` at a time: each thread
        # scores one key, the block finds the chunk's max and sum in shared memory, and the output
        # accumulator (one slot per head dim, owned by thread d % threads) is rescaled as the running
        # max grows (online softmax), so the context length is not bounded by shared memory.
        h = cuda.blockIdx.x
        t = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        D = q.shape[2]
        g = h // (q.shape[1] // kc.shape[0])
        p = pos0 + t
        start = 0
        if window > 0 and p - window + 1 > 0:
            start = p - window + 1
        end = p + 1
        sq = cuda.shared.array(MAX_HEAD_DIM, float32)
        acc = cuda.shared.array(MAX_HEAD_DIM, float32)
        probs = cuda.shared.array(threads, float32)
        red = cuda.shared.array(threads, float32)
        for d in range(tid, D, threads):
            sq[d] = q[t, h, d] * scale
            acc[d] = float32(0.0)
        cuda.syncthreads()
        m = float32(-math.inf)
        total = float32(0.0)
        for c0 in range(start, end, threads):
            j = c0 + tid
            s = float32(-math.inf)
            if j < end:
                s = float32(0.0)
                for d in range(D):
                    s += sq[d] * kc[g, j, d]
            red[tid] = s
            _block_max(red, tid, threads)
            # not max(): numba-cuda's float max overload fails to compile for the real target (ptx_check)
            top = red[0]  # read once, as max(m, red[0]) did
            m_new = top if top > m else m
            cuda.syncthreads()  # everyone has read red[0] before it is reused
            e = float32(0.0)
            if j < end:
                e = math.exp(s - m_new)
            probs[tid] = e
            red[tid] = e
            _block_sum(red, tid, threads)
            alpha = math.exp(m - m_new)
            total = total * alpha + red[0]
            n = end - c0 if end - c0 < threads else threads  # not min(): see max() above
            for d in range(tid, D, threads):
                a = acc[d] * alpha
                for jj in range(n):
                    a += probs[jj] * vc[g, c0 + jj, d]
                acc[d] = a
            m = m_new
            cuda.syncthreads()  # probs and red are rewritten by the next chunk
        inv = float32(1.0) / total
        for d in range(tid, D, threads):
            out[t, h, d] = acc[d] * inv

    return kernel


_attention = _cached(_make_attention)


def attention(d_q, d_k_cache, d_v_cache, pos0: int, scale: float, d_out, window: int = 0,
              threads: int = DEFAULT_THREADS, stream=0):
    """Causal attention of T new queries d_q (T, H, D) at positions pos0.. over the cached keys/values
    d_k_cache/d_v_cache (H_kv, ctx, D) at 0..pos0+T-1, into d_out (T, H, D). Grouped-query: head h reads
    kv head h // (H / H_kv). window > 0 keeps only the last `window` positions (sliding-window layers)."""
    T, H, D = d_q.shape
    n_kv, ctx, dk = d_k_cache.shape
    if dk != D or tuple(d_v_cache.shape) != tuple(d_k_cache.shape) or H % n_kv or tuple(d_out.shape) != (T, H, D):
        raise ValueError("attention: q/k/v/out shapes do not match")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim {D} > {MAX_HEAD_DIM}")
    if pos0 < 0 or pos0 + T > ctx:
        raise ValueError(f"attention: positions {pos0}..{pos0 + T} outside the cache ({ctx})")
    _attention(threads)[(H, T), threads, stream](d_q, d_k_cache, d_v_cache, int(pos0), np.float32(scale),
                                                 int(window), d_out)
    return d_out


# ---------------------------------------------------------------- activations
@cuda.jit
def _silu_mul_kernel(g, u, out):
    rows, n = g.shape
    for k in range(cuda.grid(1), rows * n, cuda.gridsize(1)):
        r = k // n
        i = k - r * n
        a = g[r, i]
        out[r, i] = a / (float32(1.0) + math.exp(-a)) * u[r, i]


@cuda.jit
def _gelu_mul_kernel(g, u, out):
    # GELU, tanh approximation (gelu_pytorch_tanh), as Gemma uses.
    rows, n = g.shape
    c = float32(math.sqrt(2.0 / math.pi))
    for k in range(cuda.grid(1), rows * n, cuda.gridsize(1)):
        r = k // n
        i = k - r * n
        a = g[r, i]
        th = math.tanh(c * (a + float32(0.044715) * a * a * a))
        out[r, i] = float32(0.5) * a * (float32(1.0) + th) * u[r, i]


def _gated(kernel, d_g, d_u, d_out, threads, stream):
    if tuple(d_g.shape) != tuple(d_u.shape) or tuple(d_out.shape) != tuple(d_g.shape) or d_g.ndim != 2:
        raise ValueError("gate, up and out must be (rows, n) arrays of one shape")
    kernel[_blocks(d_g.shape[0] * d_g.shape[1], threads), threads, stream](d_g, d_u, d_out)
    return d_out


def silu_mul(d_g, d_u, d_out, threads: int = DEFAULT_THREADS, stream=0):
    """SwiGLU: d_out = silu(d_g) * d_u, all (rows, n). d_out may be d_g."""
    return _gated(_silu_mul_kernel, d_g, d_u, d_out, threads, stream)


def gelu_mul(d_g, d_u, d_out, threads: int = DEFAULT_THREADS, stream=0):
    """GeGLU: d_out = gelu_tanh(d_g) * d_u, all (rows, n). d_out may be d_g."""
    return _gated(_gelu_mul_kernel, d_g, d_u, d_out, threads, stream)


# ---------------------------------------------------------------- elementwise helpers of the forward pass
@cuda.jit
def _add_kernel(x, y, alpha):
    rows, n = x.shape
    for k in range(cuda.grid(1), rows * n, cuda.gridsize(1)):
        r = k // n
        i = k - r * n
        x[r, i] += alpha * y[r, i]


@cuda.jit
def _add_bias_kernel(x, b):
    rows, n = x.shape
    for k in range(cuda.grid(1), rows * n, cuda.gridsize(1)):
        r = k // n
        i = k - r * n
        x[r, i] += b[i]


def add(d_x, d_y, threads: int = DEFAULT_THREADS, stream=0, alpha: float = 1.0):
    """Residual add in place: d_x += alpha * d_y, both (rows, n) (alpha: Granite's residual multiplier).
    Returns d_x."""
    if d_x.ndim != 2 or tuple(d_x.shape) != tuple(d_y.shape):
        raise ValueError(f"add: x {tuple(d_x.shape)} and y {tuple(d_y.shape)} must be equal (rows, n) shapes")
    _check_threads(threads)
    _add_kernel[_blocks(d_x.shape[0] * d_x.shape[1], threads), threads, stream](d_x, d_y, np.float32(alpha))
    return d_x


def add_bias(d_x, d_b, threads: int = DEFAULT_THREADS, stream=0):
    """d_x (rows, n) += d_b (n,) on every row, in place (the bias of a linear layer). Returns d_x."""
    if d_x.ndim != 2 or d_b.ndim != 1 or d_b.shape[0] != d_x.shape[1]:
        raise ValueError(f"add_bias: x {tuple(d_x.shape)}, bias {tuple(d_b.shape)}")
    _check_threads(threads)
    _add_bias_kernel[_blocks(d_x.shape[0] * d_x.shape[1], threads), threads, stream](d_x, d_b)
    return d_x


@cuda.jit
def _store_kv_kernel(x, cache, pos0):
    # x (T, H_kv, D) -> cache[h, pos0 + t, :]; grid (T, H_kv), threads over D.
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    for d in range(cuda.threadIdx.x, x.shape[2], cuda.blockDim.x):
        cache[h, pos0 + t, d] = x[t, h, d]


def store_kv(d_x, d_cache, pos0: int, threads: int = DEFAULT_THREADS, stream=0):
    """Write the keys (or values) d_x (T, H_kv, D) of positions pos0.. into d_cache (H_kv, ctx, D)."""
    T, H, D = d_x.shape
    n_kv, ctx, dc = d_cache.shape
    if n_kv != H or dc != D:
        raise ValueError(f"store_kv: x {tuple(d_x.shape)} does not match the cache {tuple(d_cache.shape)}")
    if pos0 < 0 or pos0 + T > ctx:
        raise ValueError(f"store_kv: positions {pos0}..{pos0 + T} outside the cache ({ctx})")
    _check_threads(threads)
    _store_kv_kernel[(T, H), threads, stream](d_x, d_cache, int(pos0))
    return d_cache


# ---------------------------------------------------------------- LongRoPE and mixtures of experts
@cuda.jit
def _scale_prefix_kernel(x, n, factor):
    # grid (T, H); threads over the first n dims of each head
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    for d in range(cuda.threadIdx.x, n, cuda.blockDim.x):
        x[t, h, d] *= factor


def scale_prefix(d_x, n: int, factor: float, threads: int = DEFAULT_THREADS, stream=0):
    """d_x (T, H, D) float32: its first n dims of every head times factor, in place (LongRoPE's attention
    factor on the rotated dims of q and k). Returns d_x."""
    T, H, D = d_x.shape
    if not 0 <= n <= D:
        raise ValueError(f"scale_prefix: {n} dims of heads of {D}")
    _check_threads(threads)
    _scale_prefix_kernel[(T, H), threads, stream](d_x, int(n), np.float32(factor))
    return d_x


@cuda.jit
def _gather_rows_kernel(src, rows, out):
    r = cuda.blockIdx.x
    for i in range(cuda.threadIdx.x, src.shape[1], cuda.blockDim.x):
        out[r, i] = src[rows[r], i]


def gather_rows(d_src, d_rows, d_out, threads: int = DEFAULT_THREADS, stream=0):
    """d_out[r] = d_src[d_rows[r]]: (n, d) rows picked from (T, d) (the tokens routed to one expert)."""
    n = d_rows.shape[0]
    if d_out.shape[0] != n or d_out.shape[1] != d_src.shape[1]:
        raise ValueError(f"gather_rows: out {tuple(d_out.shape)} for {n} rows of {tuple(d_src.shape)}")
    _check_threads(threads)
    _gather_rows_kernel[n, threads, stream](d_src, d_rows, d_out)
    return d_out


@cuda.jit
def _scatter_add_rows_kernel(out, rows, weights, src):
    r = cuda.blockIdx.x
    w = weights[r]
    for i in range(cuda.threadIdx.x, src.shape[1], cuda.blockDim.x):
        out[rows[r], i] += w * src[r, i]


def scatter_add_rows(d_out, d_rows, d_weights, d_src, threads: int = DEFAULT_THREADS, stream=0):
    """d_out[d_rows[r]] += d_weights[r] * d_src[r] (an expert's output, weighted by its router probability,
    added to its tokens' rows; the rows of one call are distinct). Returns d_out."""
    n = d_rows.shape[0]
    if d_src.shape[0] != n or d_weights.shape[0] != n or d_src.shape[1] != d_out.shape[1]:
        raise ValueError(f"scatter_add_rows: {n} rows, src {tuple(d_src.shape)}, out {tuple(d_out.shape)}")
    _check_threads(threads)
    _scatter_add_rows_kernel[n, threads, stream](d_out, d_rows, d_weights, d_src)
    return d_out


@cuda.jit
def _fill_kernel(x, value):
    rows, n = x.shape
    for k in range(cuda.grid(1), rows * n, cuda.gridsize(1)):
        r = k // n
        x[r, k - r * n] = value


def fill(d_x, value: float = 0.0, threads: int = DEFAULT_THREADS, stream=0):
    """d_x (rows, n) = value, in place. Returns d_x."""
    _check_threads(threads)
    _fill_kernel[_blocks(d_x.shape[0] * d_x.shape[1], threads), threads, stream](d_x, np.float32(value))
    return d_x

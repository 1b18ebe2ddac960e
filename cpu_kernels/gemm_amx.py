"""Prefill on AMX tiles (bf16): gemm_i8's weight tiles dequantized to bfloat16, multiplied by TDPBF16PS.

Where the CPU has AMX (amx_tile + amx_bf16, Sapphire Rapids and later) and Linux lends the tile registers, a prompt's
products of the 4-, 5- and 6-bit types run here instead of on gemm_i8's vpdpbusd micro-kernel:

* weights: each tile of 32 rows is unpacked by gemm_i8's `_unpack16` (codes, scl, mins: w = scl * code - mins) and
  dequantized to bf16 (`_to_bf16`: float32 w rounded to nearest even by vcvtne2ps2bf16), laid out as the B operand
  wants: wt[p, c] = (bf16 w[c, 2p], bf16 w[c, 2p + 1]) as one uint32, 32 columns a row (4 KB per 64 codes);
* activations: float32 rounded to bf16 once per prompt (`to_bf16`), stored tile by tile (each 16 tokens x 32 k tile
  load's 1 KB contiguous), rows padded with zeros to a multiple of 32;
* per 32 tokens x 32 weight rows: four C tiles (float32 16 x 16) accumulate A (16 tokens x 32 k) . B (32 k x 16
  rows) over the whole row (TDPBF16PS sums in float32), the next steps' A and B lines prefetched into L1, the sums
  stored once at the end (straight into the output when the 32 x 32 block is whole). No per-block epilogue: the
  scales are in the bf16 weights. Every tile operand starts on a 64-byte line: a tile row that straddles two lines
  made the same loop ~3x slower (78 vs 25 ns a 32 x 32 x 32 step in L1), which is what the 2026-12-05 bf16 attempt
  measured (docs/performance.md).

Why bf16 and not int8 (TDPBSUD on gemm_i8's int8 activations): the block scales (every 32 codes) need the int32 sums
of every block scaled in float, so each 16 x 16 x 32 product has to be stored and read back by vector loads; on this
Xeon those reads of tile-stored lines do not overlap the tile work (~80-90 ns a 16 x 32 x 32 block, the tile work
alone ~33 and the scaling alone ~39), and the whole GEMM ran no faster than the vpdpbusd kernel. In bf16 the scales
go into the weights and the tiles run the whole row. The result is not bit-equal to gemm_i8's (activations rounded
to bf16 instead of int8 per 32: 8 significant bits each instead of ~7 below the block's largest; weights rounded to
bf16 after dequantization): ~2.4e-3 from the float product on random rows against ~5e-3 for the int8 path; the
numpy twin in tests/test_gemm_amx.py multiplies the same rounded operands in float64.

Linux lends the tile registers to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) before its
first tile instruction: `ready()` asks once. No AMX, another OS, a refusal, EDGEQ_AMX=0: gemm_i8's vpdpbusd driver.
The instructions are LLVM inline assembly (llvmlite has no AMX types), AT&T operand order (`tdpbf16ps %tmm_b, %tmm_a,
%tmm_c` is Intel's TDPBF16PS tmm_c, tmm_a, tmm_b). The tile config is per thread: each parallel iteration loads it
(ldtilecfg) and releases the tiles at its end (tilerelease).
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
import sys
import types as pytypes

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import gemm_i8
from .linear import _FAST, _JIT
from .simd import F32, I32, I64, _IR, _prefetch, _vec, data_ptrs

from edgeq.formats.quants import QTYPES

# Numba's JIT compiles inline assembly only with LLVM's native asm parser (without it LLVM aborts the process): set up
# on import, before any of the intrinsics below can be compiled
llvm.initialize_native_asmparser()

SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18
TOKENS = 32             # token rows per kernel call: two A tiles of 16 (activations padded to a multiple)
_R = 32                 # weight rows per parallel iteration: gemm_i8's tile with 512-bit VNNI, two B tiles of 16
# the types whose tiles gemm_i8 unpacks 16 rows at once, but Q8_0: its 8-bit codes times the scale need more than
# bf16's 8 significant bits (rounding would double its error), it stays on the int8 kernel
TYPES = frozenset(gemm_i8.UNPACK16) - {"Q8_0"}
# fewer prompt rows than this stay on gemm_i8: the weights' unpacking and rounding to bf16 is paid per call, whatever
# T (2 threads, SmolLM2's Q4_1 and Gemma 3's Q4_K shapes, AMX time over vpdpbusd time: T = 16 1.6-1.7x, 24 1.25-1.3x,
# 32 1.04-1.06x, 64 0.63-0.73x; docs/performance.md "Prefill on AMX bf16 tiles")
MIN_T = 40
# the A tiles PF_DIST steps ahead into L1 (PF_A: 1 = on, both 16-token tiles), the B tiles too (PF_B); measured on
# SmolLM2's shapes, one thread: 5-15% faster than none, 1-4 steps ahead alike within the noise
PF_DIST, PF_A, PF_B = 2, 1, 1


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """amx_tile, amx_bf16 and avx512_bf16 in cpuinfo's first flags line (Linux x86-64)."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open(cpuinfo) as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"amx_tile", "amx_bf16", "avx512_bf16"} <= set(flags)


def request_tiles() -> int:
    """Ask Linux for the tile data state (once per process, for all its threads): 0 when granted, else the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0:
        return 0
    return ctypes.get_errno() or -1


@functools.cache
def ready() -> bool:
    """Whether prefill runs on the tiles in this process: an AMX CPU, gemm_i8's 32-row tiles with 16-row unpacking,
    the tile state granted, EDGEQ_AMX not "0". Asks for the tile state on the first call."""
    if os.environ.get("EDGEQ_AMX", "1").strip() == "0" or not TYPES or gemm_i8._TILE_ROWS != _R:
        return False
    return cpu_has_amx() and request_tiles() == 0


def use(qtype: str, T: int) -> bool:
    """Whether a prompt of T rows times a matrix of `qtype` runs here."""
    return T >= MIN_T and qtype in TYPES and ready()


# ---------------------------------------------------------------- activations
@intrinsic
def _round_row(typingctx, row, out, at):
    """One activation row (float32 bits, uint32) into its A tiles: bfloat16 bits of columns 32 kc .. 32 kc + 31,
    rounded to nearest even ((b + 0x7FFF + bit 16 of b) >> 16: finite values; inf stays inf), at out[at + 512 kc ..]
    (out uint16, flat)."""
    sig = types.void(row, out, types.intp)

    def codegen(context, builder, signature, args):
        x = _IR(builder)
        pr, po = data_ptrs(context, builder, signature, args, (0, 1))
        n = cgutils.unpack_tuple(builder, context.make_array(signature.args[0])(context, builder, args[0]).shape, 1)[0]
        c = lambda v: ir.Constant(I64, v)  # noqa: E731
        v16i, v16s = _vec(I32, 16), _vec(ir.IntType(16), 16)
        with cgutils.for_range(builder, builder.udiv(n, c(16))) as loop:
            q = loop.index                                   # 16 columns 16 q ..
            b = x.at(pr, builder.mul(q, c(64)), v16i)
            odd = builder.and_(builder.lshr(b, x.const(I32, 16, 16)), x.const(I32, 16, 1))
            h = builder.trunc(builder.lshr(builder.add(builder.add(b, x.const(I32, 16, 0x7FFF)), odd),
                                           x.const(I32, 16, 16)), v16s)
            kc, half = builder.udiv(q, c(2)), builder.urem(q, c(2))
            dst = builder.add(builder.add(args[2], builder.mul(kc, c(512))), builder.mul(half, c(16)))
            builder.store(h, builder.bitcast(builder.gep(po, [builder.mul(dst, c(2))]), v16s.as_pointer()), align=2)
        return context.get_dummy_value()
    return sig, codegen


@njit(parallel=True, **_JIT)
def _round_tiles(bits, out):
    """out[i, kc, r, j] = bf16 of bits[16 i + r, 32 kc + j] for the rows of bits (out flat, the rest left as is).
    A row per parallel iteration, its tiles in a serial function (views inside the parallel body cost atomic
    reference counts)."""
    nk = bits.shape[1] // 32
    for t in prange(bits.shape[0]):
        _round_row(bits[t], out, (t // 16) * nk * 512 + (t % 16) * 32)


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """np.empty whose data starts on a 64-byte line: a tile row load that straddles two lines costs ~3x (measured:
    25 vs 78 ns a 32 x 32 x 32 step, n = 256 in L1)."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    buf = np.empty(size + 64, np.uint8)
    off = -buf.ctypes.data % 64
    return buf[off:off + size].view(dtype).reshape(shape)


def to_bf16(X: np.ndarray) -> np.ndarray:
    """X (T, n) float32 -> the A tiles: (T'/16, n/32, 16, 32) uint16 on 64-byte lines, [i, kc] = bfloat16 bits
    (rounded to nearest even) of rows 16i..16i+15, columns 32kc..32kc+31, one tile load's 1 KB in a row; T' = T
    rounded up to a multiple of TOKENS (zero rows)."""
    T, n = X.shape
    out = aligned_empty((-(-T // TOKENS) * TOKENS // 16, n // 32, 16, 32), np.uint16)
    out[T // 16:] = 0  # the padding rows (those of the last tiles that _round_tiles writes are written again)
    _round_tiles(np.ascontiguousarray(X, dtype=np.float32).view(np.uint32), out.reshape(-1))
    return out


def from_bf16(xa: np.ndarray, T: int) -> np.ndarray:
    """to_bf16's tiles back to (T, n) float32 (for tests)."""
    n_t, nk = xa.shape[:2]
    rows = xa.transpose(0, 2, 1, 3).reshape(n_t * 16, nk * 32)[:T]
    return (rows.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- inline assembly
def _asm(builder, text: str, args: list, constraints: str, ret=None):
    fty = ir.FunctionType(ret or ir.VoidType(), [a.type for a in args])
    return builder.call(ir.InlineAsm(fty, text, constraints, side_effect=ret is None), args)


def tile_config() -> np.ndarray:
    """ldtilecfg's 64 bytes, palette 1, every tile 16 rows x 64 bytes: tmm0-3 = C (float32; tmm 2i + j for token
    rows 16i.. and weight rows 16j..), tmm4-5 = A (16 tokens x 32 bf16), tmm6-7 = B (16 pairs of k x 16 rows)."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    cfg[16:48].view(np.uint16)[:8] = 64
    cfg[48:56] = 16
    return cfg


@intrinsic
def _tiles_begin(typingctx, cfg):
    """ldtilecfg: this thread's tile shapes (tile_config)."""
    def codegen(context, builder, signature, args):
        _asm(builder, "ldtilecfg ($0)", data_ptrs(context, builder, signature, args, (0,)), "r,~{memory}")
        return context.get_dummy_value()
    return types.void(cfg), codegen


@intrinsic
def _tiles_end(typingctx):
    """tilerelease: the tiles back to their initial state (nothing for a context switch to save)."""
    def codegen(context, builder, signature, args):
        _asm(builder, "tilerelease", [], "~{memory}")
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _line_offset(typingctx, arr):
    """Bytes from arr's data to the next 64-byte line (0..63)."""
    def codegen(context, builder, signature, args):
        (p,) = data_ptrs(context, builder, signature, args, (0,))
        a = builder.ptrtoint(p, I64)
        return builder.and_(builder.sub(ir.Constant(I64, 0), a), ir.Constant(I64, 63))
    return types.intp(arr), codegen


@intrinsic
def _to_bf16(typingctx, tile, scl, mins, n, wt):
    """wt[p, c] = bf16(w[c, 2p]) | bf16(w[c, 2p + 1]) << 16 for c < 32, w = scl * code - mins of gemm_i8's unpacked
    tile (tile uint32 (n/4, 32): codes 4g..4g+3 of row c in tile[g, c]; scl, mins float32 (n/16, 32)); wt uint32
    (n/2, 32). vcvtne2ps2bf16 rounds to nearest even (as to_bf16)."""
    sig = types.void(tile, scl, mins, types.intp, wt)

    def codegen(context, builder, signature, args):
        x = _IR(builder)
        pt, ps, pm, pw = data_ptrs(context, builder, signature, args, (0, 1, 2, 4))
        c = lambda v: ir.Constant(I64, v)  # noqa: E731
        v16i, v16f, v32s = _vec(I32, 16), _vec(F32, 16), _vec(ir.IntType(16), 32)
        pairs = ir.Constant(_vec(I32, 32), [i // 2 + 16 * (i % 2) for i in range(32)])  # (lo 0, hi 0, lo 1, ...)
        with cgutils.for_range(builder, builder.udiv(args[3], c(4))) as loop:
            g = loop.index
            for h in (0, 1):
                col = c(16 * h)
                v = x.at(pt, builder.mul(builder.add(builder.mul(g, c(_R)), col), c(4)), v16i)
                srow = builder.add(builder.mul(builder.udiv(g, c(4)), c(_R)), col)
                s = x.at(ps, builder.mul(srow, c(4)), v16f)
                m = builder.fneg(x.at(pm, builder.mul(srow, c(4)), v16f))
                w = []
                for j in range(4):
                    code = builder.and_(builder.lshr(v, x.const(I32, 16, 8 * j)), x.const(I32, 16, 255))
                    w.append(x.intr("llvm.fma.v16f32", v16f, [builder.sitofp(code, v16f), s, m]))
                for p in (0, 1):
                    # AT&T: vcvtne2ps2bf16 b, a, dst -> dst words 0-15 from b, 16-31 from a
                    packed = _asm(builder, "vcvtne2ps2bf16 $2, $1, $0", [w[2 * p + 1], w[2 * p]], "=v,v,v",
                                  ret=v32s)
                    out = builder.shuffle_vector(packed, ir.Constant(v32s, ir.Undefined), pairs)
                    at = builder.mul(builder.add(builder.mul(builder.add(builder.mul(g, c(2)), c(p)), c(_R)), col),
                                     c(4))
                    builder.store(out, builder.bitcast(builder.gep(pw, [at]), v32s.as_pointer()), align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _dot_tiles(typingctx, wt, xa, t, n, dst, off, ldc):
    """dst.flat[off + m ldc + c] = sum over k < n of x[t + m, k] * w[c, k] (m < 32, c < 32) in float32: xa the bf16
    activations as to_bf16's A tiles, wt uint32 (n/2, 32) bf16 weight pairs (_to_bf16), dst a C-contiguous float32
    array (the product's rows, or a 32 x 32 buffer); the tiles configured by _tiles_begin(tile_config()); t a multiple
    of 32, t + 32 <= the rows of xa, n a multiple of 32, the 32 x 32 block inside dst; xa and wt on 64-byte lines
    (aligned_empty, _line_offset) for speed."""
    sig = types.void(wt, xa, types.intp, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        pw, pa, pr = data_ptrs(context, builder, signature, args, (0, 1, 4))
        x = _IR(builder)
        t, n, off, ldc = args[2], args[3], args[5], args[6]
        c = lambda v: ir.Constant(I64, v)  # noqa: E731
        mem = "r,r,~{memory}"
        _asm(builder, "tilezero %tmm0\n\ttilezero %tmm1\n\ttilezero %tmm2\n\ttilezero %tmm3", [], "")
        tile_bytes = builder.mul(builder.udiv(n, c(32)), c(1024))   # one 16-token tile row of to_bf16's
        a0 = builder.gep(pa, [builder.mul(builder.udiv(t, c(16)), tile_bytes)])
        a1 = builder.gep(a0, [tile_bytes])
        with cgutils.for_range(builder, builder.udiv(n, c(32))) as loop:
            kc = loop.index
            ka = builder.mul(kc, c(1024))                     # the A tiles of columns 32 kc ..
            b = builder.gep(pw, [builder.mul(kc, c(16 * _R * 4))])  # 16 pair rows of the weight tile
            for line in range(16 * PF_A):  # the A tiles PF_DIST steps ahead into L1 (prefetch never faults)
                for a in (a0, a1):
                    _prefetch(x, builder.gep(a, [builder.add(ka, c(PF_DIST * 1024 + 64 * line))]))
            for line in range(32 * PF_B):
                _prefetch(x, builder.gep(b, [c(PF_DIST * 16 * _R * 4 + 64 * line)]))
            _asm(builder, "tileloadd ($0,$1,1), %tmm4", [builder.gep(a0, [ka]), c(64)], mem)
            _asm(builder, "tileloadd ($0,$1,1), %tmm5", [builder.gep(a1, [ka]), c(64)], mem)
            _asm(builder, "tileloadd ($0,$1,1), %tmm6", [b, c(_R * 4)], mem)
            _asm(builder, "tileloadd ($0,$1,1), %tmm7", [builder.gep(b, [c(64)]), c(_R * 4)], mem)
            _asm(builder, "tdpbf16ps %tmm6, %tmm4, %tmm0\n\ttdpbf16ps %tmm7, %tmm4, %tmm1\n\t"
                          "tdpbf16ps %tmm6, %tmm5, %tmm2\n\ttdpbf16ps %tmm7, %tmm5, %tmm3", [], "")
        row = builder.mul(ldc, c(4))
        base = builder.gep(pr, [builder.mul(off, c(4))])
        for i in (0, 1):
            for j in (0, 1):
                _asm(builder, f"tilestored %tmm{2 * i + j}, ($0,$1,1)",
                     [builder.gep(base, [builder.add(builder.mul(c(16 * i), row), c(64 * j))]), row], mem)
        return context.get_dummy_value()
    return sig, codegen


# ---------------------------------------------------------------- the parallel driver, one per type
_unpack_16 = None
_block_elems = _block_bytes = 0


def _gemm_template(raw, n_in, xa, out, cfg):
    """out[t, r] = W[r] . x[t] for t < out.shape[0] (xa: to_bf16's tiles of x), W = raw's rows (type
    bound by _specialize) dequantized to bf16: gemm_i8._gemm_template's tiles, products on AMX."""
    T, n_out = out.shape
    R = 32
    row_bytes = (n_in // _block_elems) * _block_bytes
    for g in prange((n_out + R - 1) // R):
        r0 = g * R
        nr = min(R, n_out - r0)
        tile = np.empty((n_in // 4, R), np.uint32)  # every column written below
        scl = np.empty((n_in // 16, R), np.float32)
        mins = np.empty((n_in // 16, R), np.float32)
        for c in range(0, R, 16):
            if c < nr:
                _unpack_16(raw, (r0 + c) * row_bytes, row_bytes, min(16, nr - c), n_in, tile, c, scl, mins)
            else:  # past the last row
                tile[:, c:c + 16] = 0
                scl[:, c:c + 16] = 0
                mins[:, c:c + 16] = 0
        buf = np.empty(n_in // 2 * R + 16, np.uint32)
        o = _line_offset(buf) // 4
        wt = buf[o:o + n_in // 2 * R].reshape((n_in // 2, R))
        _to_bf16(tile, scl, mins, n_in, wt)
        res = np.empty((32, R), np.float32)
        _tiles_begin(cfg)
        for t in range(0, T, 32):
            if t + 32 <= T and nr == R:  # the C tiles straight into out
                _dot_tiles(wt, xa, t, n_in, out, t * n_out + r0, n_out)
                continue
            _dot_tiles(wt, xa, t, n_in, res, 0, R)
            for jj in range(min(32, T - t)):
                out[t + jj, r0:r0 + nr] = res[jj, :nr]
        _tiles_end()


def _specialize(qtype: str):
    """The parallel driver for `qtype` (a function with its own globals, as gemm_i8._specialize)."""
    q = QTYPES[qtype]
    bound = dict(_gemm_template.__globals__, _block_elems=q.block_size, _block_bytes=q.block_bytes,
                 _unpack_16=gemm_i8._unpack16(qtype))
    name = "_gemm_amx_" + qtype.lower()
    fn = pytypes.FunctionType(_gemm_template.__code__, bound, name)
    fn.__qualname__ = name
    fn.__doc__ = f"gemm_amx._gemm_template for {qtype}"
    return njit(parallel=True, cache=True, fastmath=_FAST, nogil=True)(fn)


_DRIVERS = {q: _specialize(q) for q in sorted(TYPES)}
_CONFIG = tile_config()


def matmul(raw: np.ndarray, qtype: str, n_in: int, xa: np.ndarray, out: np.ndarray) -> None:
    """out (T, n_out) = X . W^T on the tiles, xa = to_bf16(X), out C-contiguous (the caller checked use(qtype, T)).
    Refuses to run
    where ready() is false: a tile instruction without the tile state kills the process (SIGILL)."""
    if not ready():
        raise RuntimeError("gemm_amx: AMX tiles are not available in this process")
    if not out.flags.c_contiguous or out.dtype != np.float32:
        raise ValueError("gemm_amx: out must be a C-contiguous float32 array")
    if xa.shape[0] % 2 or 16 * xa.shape[0] < out.shape[0] or 32 * xa.shape[1] != n_in or xa.shape[2:] != (16, 32):
        raise ValueError(f"gemm_amx: activation tiles of shape {xa.shape} for {out.shape[0]} rows of {n_in}")
    _DRIVERS[qtype](raw, n_in, xa, out, _CONFIG)

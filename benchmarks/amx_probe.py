#!/usr/bin/env python3
"""Can edgeq's kernels use AMX here, and how fast is an int8 tile product? The probe that led to the prompt GEMM on
AMX (cpu_kernels/gemm_amx.py, which uses the bf16 tiles: its docstring says why not these int8 ones).

    python benchmarks/amx_probe.py

On an x86-64 Linux CPU with amx_int8 (Sapphire Rapids and later) it:
1. asks the kernel for the tile data state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): once per process,
   before any tile instruction, or the first one faults);
2. compiles a Numba intrinsic whose AMX instructions are LLVM inline assembly (llvmlite has no AMX types; Numba's
   JIT needs llvmlite's native asm parser initialized to accept inline asm): ldtilecfg, tileloadd, TDPBSUD (signed
   int8 activations x unsigned bytes, the sign pair edgeq's int8 GEMM uses: activations int8, 4-bit codes 0..15),
   tilestored, tilerelease;
3. checks one 16 x 64 by 64 x 16 product against numpy (B in the VNNI layout: row k4, bytes 4n..4n+3 = B[4k4..4k4+3, n]);
4. times TDPBSUD back to back on one C tile (K = 64), and the shape a block-scaled GEMM needs: one 32-wide block
   (K = 32, the scale block of Q4_0 / Q4_1 / Q8_0) per product, the C tile zeroed before and stored after each (the
   float epilogue that applies the scales would read it from there).

AT&T operand order: `tdpbsud %tmm_b, %tmm_a, %tmm_c` (Intel: TDPBSUD tmm_c, tmm_a, tmm_b).
"""
from __future__ import annotations

import sys
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgeq.cpu_kernels.gemm_amx import _asm, request_tiles  # importing it sets up LLVM's native asm parser
from edgeq.cpu_kernels.simd import I64, data_ptrs


def has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_int8" in flags and "amx_tile" in flags


@intrinsic
def _tiles(typingctx, cfg, a, b, c, reps, blocks):
    """reps times: blocks == 0: C += A . B (one TDPBSUD); else: C = 0, C += A . B, C stored to c (per block)."""
    sig = types.void(cfg, a, b, c, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        pc, pa, pb, po = data_ptrs(context, builder, signature, args, range(4))
        stride = ir.Constant(I64, 64)
        _asm(builder, "ldtilecfg ($0)", [pc], "r,~{memory}")
        _asm(builder, "tileloadd ($0,$1,1), %tmm0", [po, stride], "r,r,~{memory}")
        _asm(builder, "tileloadd ($0,$1,1), %tmm1", [pa, stride], "r,r,~{memory}")
        _asm(builder, "tileloadd ($0,$1,1), %tmm2", [pb, stride], "r,r,~{memory}")
        blocked = builder.icmp_signed("!=", args[5], ir.Constant(I64, 0))
        with builder.if_else(blocked) as (per_block, plain):
            with per_block:
                with cgutils.for_range(builder, args[4]):
                    _asm(builder, "tilezero %tmm0", [], "~{memory}")
                    _asm(builder, "tdpbsud %tmm2, %tmm1, %tmm0", [], "~{memory}")
                    _asm(builder, "tilestored %tmm0, ($0,$1,1)", [po, stride], "r,r,~{memory}")
            with plain:
                with cgutils.for_range(builder, args[4]):
                    _asm(builder, "tdpbsud %tmm2, %tmm1, %tmm0", [], "~{memory}")
                _asm(builder, "tilestored %tmm0, ($0,$1,1)", [po, stride], "r,r,~{memory}")
        _asm(builder, "tilerelease", [], "~{memory}")
        return context.get_dummy_value()
    return sig, codegen


@njit
def _run(cfg, a, b, c, reps, blocks):
    _tiles(cfg, a, b, c, reps, blocks)


def tile_config(k: int) -> np.ndarray:
    """palette 1: tmm0 = C (16 x 16 int32), tmm1 = A (16 x k int8), tmm2 = B (k/4 x 64 bytes)."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    colsb, rows = cfg[16:48].view(np.uint16), cfg[48:64]
    colsb[0], rows[0] = 64, 16
    colsb[1], rows[1] = k, 16
    colsb[2], rows[2] = 64, k // 4
    return cfg


def vnni(bm: np.ndarray) -> np.ndarray:
    """B (K, 16) -> the tile layout (K/4, 64): row k4 holds B[4k4 + j, n] at byte 4n + j."""
    k = bm.shape[0]
    return np.ascontiguousarray(bm.reshape(k // 4, 4, 16).transpose(0, 2, 1).reshape(k // 4, 64))


def main() -> int:
    if sys.platform != "linux" or not has_amx():
        print("no AMX (amx_tile + amx_int8) on this CPU: nothing to probe")
        return 0
    err = request_tiles()
    if err != 0:
        print(f"arch_prctl(ARCH_REQ_XCOMP_PERM) refused (errno {err}): the kernel does not lend AMX")
        return 1
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (16, 64)).astype(np.int8)
    bm = rng.integers(0, 16, (64, 16)).astype(np.uint8)
    c = np.zeros((16, 16), np.int32)
    _run(tile_config(64), a, vnni(bm), c, 1, 0)
    ok = np.array_equal(c, a.astype(np.int32) @ bm.astype(np.int32))
    print(f"TDPBSUD 16x64 . 64x16 against numpy: {'equal' if ok else 'DIFFERENT'}")
    if not ok:
        return 1
    n = 1_000_000
    t = time.perf_counter()
    _run(tile_config(64), a, vnni(bm), c, n, 0)
    dt = (time.perf_counter() - t) / n
    print(f"back to back on one C tile, K = 64: {dt * 1e9:.2f} ns each = {16 * 16 * 64 / dt / 1e9:.0f} GMAC/s a thread")
    a32 = np.zeros((16, 64), np.int8)
    a32[:, :32] = a[:, :32]
    c[:] = 0
    _run(tile_config(32), a32, vnni(bm[:32]), c, 1, 1)
    ok = np.array_equal(c, a[:, :32].astype(np.int32) @ bm[:32].astype(np.int32))
    t = time.perf_counter()
    _run(tile_config(32), a32, vnni(bm[:32]), c, n, 1)
    dt = (time.perf_counter() - t) / n
    print(f"one 32-wide block a product (zero, TDPBSUD, store C; {'equal' if ok else 'DIFFERENT'} to numpy): "
          f"{dt * 1e9:.2f} ns each = {16 * 16 * 32 / dt / 1e9:.0f} GMAC/s a thread")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

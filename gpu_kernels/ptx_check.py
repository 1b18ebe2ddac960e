"""Compile every CUDA kernel to PTX without a GPU: `python -m edgeq.gpu_kernels.ptx_check [--cc 8.0]`.

The simulator runs the kernels as Python, so it cannot catch what only the CUDA target rejects
(typing, unsupported functions, float64 slipping into the arithmetic). This check runs the real
compiler (NVVM, from the `nvidia-nvvm` wheel that `numba-cuda[cu12]`/`[cu13]` installs) for a chosen
compute capability. Exit 0: all compiled; 2: no NVVM/NVRTC here (nothing checked); 1: a kernel failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import types


def _signatures():
    import numba

    from . import linear, ops

    u8, f1 = numba.uint8[::1], numba.float32[::1]
    f2, f3 = numba.float32[:, ::1], numba.float32[:, :, ::1]
    i64, f32 = numba.int64, numba.float32
    for qtype in linear.QTYPE_BLOCKS:
        w = f1 if qtype == "F32" else u8  # F32 weights are uploaded as float32 values
        yield f"matmul {qtype}", linear.matmul_kernel(qtype), (w, i64, f2, i64, f2)
    yield "rmsnorm", ops._rmsnorm(ops.DEFAULT_THREADS), (f2, f1, f32, f2)
    yield "rope", ops._rope_kernel, (f3, numba.int32[::1], f1, numba.boolean)
    yield "attention", ops._attention(ops.DEFAULT_THREADS), (f3, f3, f3, i64, f32, i64, f3)
    yield "silu_mul", ops._silu_mul_kernel, (f2, f2, f2)
    yield "gelu_mul", ops._gelu_mul_kernel, (f2, f2, f2)
    yield "add", ops._add_kernel, (f2, f2, f32)
    yield "add_bias", ops._add_bias_kernel, (f2, f1)
    yield "store_kv", ops._store_kv_kernel, (f3, f3, i64)
    i32 = numba.int32[::1]
    yield "scale_prefix", ops._scale_prefix_kernel, (f3, i64, f32)
    yield "gather_rows", ops._gather_rows_kernel, (f2, i32, f2)
    yield "scatter_add_rows", ops._scatter_add_rows_kernel, (f2, i32, f1, f2)
    yield "fill", ops._fill_kernel, (f2, f32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", default="8.0", help="compute capability, e.g. 8.0 (A100), 9.0 (H100)")
    args = ap.parse_args(argv)
    cc = tuple(int(v) for v in args.cc.split("."))
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "0":
        print("ptx_check: unset NUMBA_ENABLE_CUDASIM (the simulator has no compiler)", file=sys.stderr)
        return 2
    from numba import cuda
    import numba.cuda.dispatcher as dispatcher

    # Device functions are compiled for the current device's compute capability; without a GPU there is
    # none, so stand in one with the requested capability (this process only compiles, never launches).
    if not cuda.is_available():
        dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    failed = 0
    for name, kernel, sig in _signatures():
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
        except Exception as e:  # report every kernel, not just the first failure
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "NVVM" in msg or "libnvvm" in msg.lower() or "libnvrtc" in msg.lower():
                print(f"ptx_check: CUDA toolkit libraries not found ({msg}); install numba-cuda[cu12] or [cu13]",
                      file=sys.stderr)
                return 2
            print(f"FAIL {name}: {msg}")
            failed += 1
            continue
        print(f"ok   {name}: {len(ptx.splitlines())} PTX lines for sm_{cc[0]}{cc[1]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

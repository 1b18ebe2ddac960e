"""One attention kernel per pair of cache layouts: each compiles its own layouts' code only (the first run's compile
time; docs/performance.md "First run")."""
import types

import numpy as np
from numba import njit

from edgeq.cpu_kernels import attention_q as aq


def _llvm_ir(layout: int) -> str:
    """The loader as _specialize binds it, compiled here without the on-disk cache (Numba cannot show the IR of
    code it loaded from there)."""
    template = aq._load_rows_template
    load = njit(fastmath=True)(types.FunctionType(template.__code__, dict(template.__globals__, _SIDE_LAYOUT=layout),
                                                  "probe_load_rows"))
    side = tuple(aq.new_side(aq._LAYOUT_NAMES[layout], 1, 32, 32))
    buf, cs, cm = np.zeros((32, 32), np.float32), np.zeros(32, np.float32), np.zeros(32, np.float32)
    load(side, 0, 0, 0, 4, 32, 0, buf, cs, cm)
    return "".join(load.inspect_llvm().values())


def test_a_layouts_row_loader_holds_no_other_layouts_code():
    """Every layout but float32 converts half bits with f16_row_to_f32 (a call, not inlined): the float32
    loader has no such call because its layout is a constant and the other branches were pruned before typing."""
    assert "f16_row_to_f32" in _llvm_ir(aq.FLOAT16)
    assert "f16_row_to_f32" not in _llvm_ir(aq.FLOAT32)


def test_one_kernel_pair_per_layout_pair():
    a = aq.attention_kernels(aq.INT8_PER_TOKEN, aq.FLOAT16)
    assert aq.attention_kernels(aq.INT8_PER_TOKEN, aq.FLOAT16) is a  # made once, compiled at first call
    b = aq.attention_kernels(aq.FLOAT16, aq.INT8_PER_TOKEN)
    assert {f.py_func.__name__ for f in a + b} == {
        "attend_kernel__int8_per_token__float16", "attend_decode_kernel__int8_per_token__float16",
        "attend_kernel__float16__int8_per_token", "attend_decode_kernel__float16__int8_per_token"}

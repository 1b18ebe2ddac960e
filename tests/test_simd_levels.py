"""The explicit-SIMD row dots (cpu_kernels/simd.py) on every instruction level this machine can run.

The default run uses the best level of the CPU (vnni here); the other levels are compiled in a child
process with EDGEQ_SIMD set (each level has its own Numba cache folder, edgeq/_numba_env.py) and must
pass the same exact-against-numpy checks of tests/test_linear.py, tests/test_kv_cache.py (the q8 cache's
attention intrinsics) and tests/test_gemm_i8.py (the int8 prefill GEMM). The portable level also runs with the integer f16 conversion (EDGEQ_SOFT_HALF=1),
the path of x86 CPUs without F16C."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeq.cpu_kernels.simd import host_levels

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("level", ["vnni", "avx2", "generic"])
def test_row_dots_exact_on_level(level):
    if level not in host_levels():
        pytest.skip(f"this CPU cannot run the {level} level")
    env = dict(os.environ, EDGEQ_SIMD=level, EDGEQ_SOFT_HALF="1" if level == "generic" else "0")
    env.pop("NUMBA_CACHE_DIR", None)  # let edgeq/_numba_env.py pick the folder of this level
    probe = subprocess.run([sys.executable, "-c", "import edgeq.cpu_kernels.simd as s; print(s.LEVEL)"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.strip() == level, probe.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/test_linear.py"),
                        str(ROOT / "tests/test_kv_cache.py"), str(ROOT / "tests/test_gemm_i8.py"),
                        str(ROOT / "tests/test_batch_dot.py"), "-k",
                        "integer_path_exact or attention_against_twins or int8_gemm_exact or multi_row_equals"],
                       env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def test_bad_level_is_one_clear_error():
    env = dict(os.environ, EDGEQ_SIMD="sse9")
    r = subprocess.run([sys.executable, "-c", "import edgeq.cpu_kernels.simd"], env=env, capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode != 0 and "EDGEQ_SIMD must be vnni, avx2 or generic" in r.stderr

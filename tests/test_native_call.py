"""cpu_kernels/native_call.py: a kernel calling another through its address equals the direct call, a call with
arguments of other types is a typing error (never a call with the wrong layout), and the callee's exception reaches
the caller's Python caller."""
import numpy as np
import pytest
from numba import errors, njit, types

from edgeq.cpu_kernels import native_call


@njit(no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _scaled_sum(x, a, out):
    if a < 0:
        raise ValueError("negative scale")
    s = 0.0
    for v in x:
        s += v
    out[0] = s * a


native_call.declare(_scaled_sum, (types.float64[::1], types.float64, types.float64[::1]))


@njit
def _caller(x, a, out, fn):
    native_call.call(_scaled_sum, fn, (x, a, out))


@njit
def _caller_int_scale(x, a, out, fn):
    native_call.call(_scaled_sum, fn, (x, np.int64(a), out))  # converts to the declared float64


@njit
def _caller_wrong_layout(x, out, fn):
    native_call.call(_scaled_sum, fn, (x[::2], 1.0, out))  # a strided array: not the declared C layout


def test_call_equals_the_direct_result():
    x = np.arange(10.0)
    out = np.zeros(1)
    _caller(x, 2.5, out, native_call.address(_scaled_sum))
    assert out[0] == 2.5 * 45.0
    _caller_int_scale(x, 3, out, native_call.address(_scaled_sum))
    assert out[0] == 3.0 * 45.0


def test_wrong_argument_types_fail_at_compile_time():
    with pytest.raises(errors.TypingError, match="native_call: _scaled_sum takes"):
        _caller_wrong_layout(np.arange(10.0), np.zeros(1), native_call.address(_scaled_sum))


def test_undeclared_callee_fails_at_compile_time():
    @njit(no_cpython_wrapper=True)
    def undeclared(x):
        x[0] = 1.0

    @njit
    def caller(x, fn):
        native_call.call(undeclared, fn, (x,))

    with pytest.raises(errors.TypingError, match="no declared signature"):
        caller(np.zeros(1), 0)


def test_callee_exception_propagates():
    with pytest.raises(ValueError, match="negative scale"):
        _caller(np.arange(3.0), -1.0, np.zeros(1), native_call.address(_scaled_sum))


def test_address_is_stable_and_nonzero():
    a = native_call.address(_scaled_sum)
    assert a != 0 and native_call.address(_scaled_sum) == a

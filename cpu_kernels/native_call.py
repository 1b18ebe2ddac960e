"""One Numba kernel calling another through its machine-code address, instead of through its linked-in code.

When a jitted function calls another, Numba links the callee's LLVM IR into the caller's module and optimizes and
generates code for the whole again (numba/core/codegen.py: `_final_module.link_in`, then the module passes): each
caller pays its callees' compile a second time. The attention decode kernel re-compiled its job, row stores and row
loads that way (its module 906k characters of IR, the job's 447k): 8 s of a first run's 13 on a 2.6 GHz Zen 4.

`call(fn, addr, args)` calls `fn` (a dispatcher with one declared signature, `declare`) through `addr`, the address
of its compiled native function, which the caller receives as a runtime argument (`address(fn)`, from Python): the
caller's module holds one indirect call, so its compile no longer includes the callee's, and the caller's cached
machine code holds no address of this process. The callee's arguments are cast to the declared types at the call;
a call whose arguments do not convert is a typing error of the caller (never a call with the wrong layout). A
callee that raises propagates its exception as a direct call does. For callees that do real work per call (a
block of rows, an attention job): the call cannot be inlined.
"""
from __future__ import annotations

from numba import types
from numba.core import errors
from numba.extending import intrinsic

_SIGNATURES: dict[object, tuple] = {}  # dispatcher -> its declared argument types (the only ones it is called with)
_ADDRESSES: dict[object, int] = {}


def declare(fn, argtypes: tuple) -> None:
    """The argument types `fn` (a void njit dispatcher) is compiled for and called with through `call`."""
    _SIGNATURES[fn] = tuple(argtypes)


def address(fn) -> int:
    """The address of `fn`'s native function for its declared types: compiled, or loaded from the disk cache, at the
    first call in this process."""
    addr = _ADDRESSES.get(fn)
    if addr is None:
        sig = _SIGNATURES[fn]
        fn.compile(sig)
        cres = fn.overloads[sig]
        if cres.signature.return_type != types.none:
            raise TypeError(f"native_call: {fn.__name__} must return nothing, not {cres.signature.return_type}")
        addr = _ADDRESSES[fn] = cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
    return addr


@intrinsic
def call(typingctx, fn, addr, args):
    """fn(*args) through addr = address(fn) (an integer); args: a tuple."""
    if not isinstance(fn, types.Dispatcher) or not isinstance(args, types.BaseTuple):
        raise errors.TypingError("native_call.call(fn, addr, args): fn a jitted function, args a tuple")
    want = _SIGNATURES.get(fn.dispatcher)
    if want is None:
        raise errors.TypingError(f"native_call: {fn.dispatcher.__name__} has no declared signature")
    got = tuple(args)
    if len(got) != len(want) or any(g != w and typingctx.can_convert(g, w) is None for g, w in zip(got, want)):
        raise errors.TypingError(f"native_call: {fn.dispatcher.__name__} takes {want}, called with {got}")
    if not isinstance(addr, types.Integer):
        raise errors.TypingError("native_call: addr must be an integer")
    sig = types.void(fn, addr, args)

    def codegen(context, builder, signature, llargs):
        conv = context.call_conv
        vals = [context.cast(builder, builder.extract_value(llargs[2], i), g, w)
                for i, (g, w) in enumerate(zip(got, want))]
        fnty = conv.get_function_type(types.none, want)
        callee = builder.inttoptr(context.cast(builder, llargs[1], addr, types.intp), fnty.as_pointer())
        status, _ = conv.call_function(builder, callee, types.none, want, vals)
        with builder.if_then(status.is_error, likely=False):
            conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return sig, codegen

"""Explicit SIMD row dots for the decode matvec: LLVM vector IR written through Numba intrinsics.

Why: LLVM does not turn the plain-Python block loops of cpu_kernels/linear.py into the byte dot-product
instructions (vpdpbusd, vpmaddubsw), and it reduces every block to a scalar (a horizontal add per 32
weights). Here each block's integer dot stays in a vector of 8 int32 lanes, is converted to float once,
scaled by the block scale and accumulated into a vector of 8 floats; one horizontal sum per row.
This is llama.cpp's ggml_vec_dot_* design, written as IR instead of C intrinsics.

One function per weight type builds the IR of one block (`_block_<type>`); `_row_dot(qtype, block)` wraps
it in the loop over the blocks of a row and returns a Numba intrinsic (`ROW_DOTS[qtype]`) with the signature

    dot(raw uint8[:], off intp, nb intp, qx int8[:], dx float32[:], bsums int32[:]) -> float32

(`raw[off:]` = the row's bytes, nb = blocks per row; qx/dx/bsums as produced by linear._quantize_act).
The caller validates every size (linear._check): the IR does no bounds checks.

The byte dot product `udot(u, s)` (32 unsigned x 32 signed bytes -> 8 int32 sums of 4) is chosen once by
the CPU: AVX512-VNNI / AVX-VNNI `vpdpbusd`, AVX2 `vpmaddubsw` + `vpmaddwd`, or portable IR (widening
multiply and adds) elsewhere; EDGEQ_SIMD=vnni|avx2|generic overrides (tests run all three).
On AVX-512 VNNI CPUs (`_ZMM`) Q4_K dots two 32-weight blocks per 512-bit vpdpbusd (1.2x at T=1 over the
256-bit path, ~2x when the weights come from cache), and so do the 32-weight types, two consecutive blocks per
vpdpbusd (PAIR_IR: Q8_0 0.76 -> 0.54 ns a block from L2, Q4_1 1.06 -> 0.77; the decode products of a Qwen3-1.7B
Q8_0 file 22-24 -> 29-30 GB/s on one Zen 4 thread, 32-35 -> 37-38 with two: benchmarks/decode_profile.py --matrices).
The k-quants run vectorized over a super-block's 8 sub-blocks: scales, mins and activation sums as vectors,
one lane broadcast per sub-block, four accumulators (Q4_K 1.5-1.8x, Q6_K 1.2-1.3x per thread over one
scalar chain per sub-block: benchmarks/decode_profile.py --matrices). Below AVX-512 (SUPER_ACT) Q4_K/Q5_K/Q6_K
take activations quantized per super-block and sum a super-block in integers, as llama.cpp's AVX2 dots do
(a Qwen3-1.7B-shape Q4_K_M decode's products 11% less CPU time on a Zen 3 core than with per-32 float sums).
The numpy twins are gguf-py's dequantizers (tests/test_linear.py compares every type on every level).
"""
from __future__ import annotations

import os
import platform

from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from edgeq.formats.quants import KVALUES_IQ4NL, QTYPES

from .host import proc_field

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _vec(t, n):
    return ir.VectorType(t, n)


def host_levels() -> list[str]:
    """The instruction levels this CPU can run, best first (always ending with "generic")."""
    levels = ["generic"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        f = llvm_binding.get_host_cpu_features()
        if f.get("avx2"):
            levels.insert(0, "avx2")
        if (f.get("avx512vnni") and f.get("avx512vl")) or f.get("avxvnni"):
            levels.insert(0, "vnni")
    return levels


def _detect_level() -> str:
    forced = os.environ.get("EDGEQ_SIMD", "").strip().lower()
    if forced:
        if forced not in ("vnni", "avx2", "generic"):
            raise ValueError(f"EDGEQ_SIMD must be vnni, avx2 or generic, not {forced!r}")
        return forced
    return host_levels()[0]


LEVEL = _detect_level()
# 512-bit byte dots (two 32-weight blocks per vpdpbusd) where the CPU has AVX-512 VNNI, not only AVX-VNNI
_ZMM = LEVEL == "vnni" and all(llvm_binding.get_host_cpu_features().get(f) for f in ("avx512vnni", "avx512bw"))
# The k-quant types whose row dots take activations quantized per super-block of 256 (one scale per 256, as
# llama.cpp's Q8_K) and sum each super-block in integers (byte pairs to int16, times the int16 sub-block scales to
# int32: vpmaddubsw + vpmaddwd), so a super-block costs one int -> float conversion and one FMA instead of one per
# 32 weights. Not on _ZMM: the 512-bit dots there keep per-32 activation scales (a float path measured on those CPUs).
SUPER_ACT = frozenset() if _ZMM else frozenset({"Q4_K", "Q5_K", "Q6_K"})
# The largest weight code of each type as the unsigned operand of the byte dots takes it (Q8_0's signed bytes + 128),
# and the activations' (linear._quantize_block rounds them onto +-127): vpmaddubsw's int16 pair sums stay exact
# for int16_runs(code) groups of 4 bytes.
UNSIGNED_CODE_MAX = {"Q8_0": 255, "Q4_0": 15, "Q4_1": 15, "Q5_0": 31, "Q5_1": 31, "Q4_K": 15, "Q5_K": 31, "Q6_K": 63}
ACT_CODE_MAX = 127


def int16_runs(code_max: int) -> int:
    """How many 4-byte groups' vpmaddubsw pair sums (unsigned codes up to code_max times activation codes) add up in
    int16 before one widening without overflow (|pair| <= 2 * code_max * ACT_CODE_MAX): 4-bit codes 8, 5-bit 4,
    6-bit 2, 8-bit 1."""
    return max(1, 32767 // (2 * code_max * ACT_CODE_MAX))
# f16 -> f32 in hardware where LLVM has it (x86 F16C, any ARM64); EDGEQ_SOFT_HALF=1 forces the integer path
_HW_HALF = os.environ.get("EDGEQ_SOFT_HALF", "") != "1" and (
    platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86")
    or bool(llvm_binding.get_host_cpu_features().get("f16c", False)))


class _IR:
    """Small helpers over an llvmlite IRBuilder: unaligned loads at byte offsets, splats, the byte dot."""

    def __init__(self, builder: ir.IRBuilder):
        self.b = builder
        self.mod = builder.module
        self.nb = None  # the row's block count (i64), where the row loop sets it: kquant_min_sums' offset

    def i64(self, v) -> ir.Value:
        return ir.Constant(I64, v) if isinstance(v, int) else v

    def at(self, base, off, ty) -> ir.Value:
        """Load a value of type `ty` from byte offset `off` of the i8* `base` (align 1)."""
        p = self.b.bitcast(self.b.gep(base, [self.i64(off)]), ty.as_pointer())
        return self.b.load(p, align=1)

    def off(self, o, c: int) -> ir.Value:
        return self.b.add(o, ir.Constant(I64, c))

    def byte(self, base, off) -> ir.Value:
        """Unsigned byte at `off` as i32."""
        return self.b.zext(self.at(base, off, I8), I32)

    def act(self, qx, b) -> ir.Value:
        """The 32 int8 activation codes of block b."""
        return self.at(qx, self.b.mul(b, ir.Constant(I64, 32)), _vec(I8, 32))

    def elem(self, base, idx, ty) -> ir.Value:
        """base[idx] for a typed pointer-as-i8* `base` with elements of `ty` (4-byte f32/i32)."""
        p = self.b.bitcast(base, ty.as_pointer())
        return self.b.load(self.b.gep(p, [self.i64(idx)]), align=4)

    def half(self, base, off) -> ir.Value:
        """IEEE half at byte offset `off` -> float (finite values; scales never hold inf/nan)."""
        h = self.at(base, off, I16)
        if _HW_HALF:
            return self.b.fpext(self.b.bitcast(h, ir.HalfType()), F32)
        # x86 without F16C. Not a copy of half.f16_to_f32 (the intrinsics build IR, with no Numba function
        # to call): the float-register method, magnitude bits moved into float position, times 2^112
        # re-biases the exponent (subnormal halves come out right too), then the sign
        h32 = self.b.zext(h, I32)
        mag = self.b.bitcast(self.b.shl(self.b.and_(h32, ir.Constant(I32, 0x7FFF)), ir.Constant(I32, 13)), F32)
        mag = self.b.bitcast(self.b.fmul(mag, ir.Constant(F32, 2.0 ** 112)), I32)
        sign = self.b.shl(self.b.and_(h32, ir.Constant(I32, 0x8000)), ir.Constant(I32, 16))
        return self.b.bitcast(self.b.or_(mag, sign), F32)

    def gather16(self, base, offsets) -> ir.Value:
        """<16 x i32>: the dwords at byte offsets `offsets` (<16 x i32>) from the i8* `base` (vpgatherdd, scale 1;
        AVX-512 only)."""
        v16, m16 = _vec(I32, 16), _vec(ir.IntType(1), 16)
        fn = cgutils.get_or_insert_function(self.mod, ir.FunctionType(v16, [v16, I8.as_pointer(), v16, m16, I32]),
                                            "llvm.x86.avx512.mask.gather.dpi.512")
        return self.b.call(fn, [ir.Constant(v16, None), base, offsets, ir.Constant(m16, [1] * 16), ir.Constant(I32, 1)])

    def splat(self, v, n) -> ir.Value:
        vt = _vec(v.type, n)
        one = self.b.insert_element(ir.Constant(vt, ir.Undefined), v, ir.Constant(I32, 0))
        return self.b.shuffle_vector(one, ir.Constant(vt, ir.Undefined), ir.Constant(_vec(I32, n), [0] * n))

    @staticmethod
    def const(ty, n, v) -> ir.Constant:
        return ir.Constant(_vec(ty, n), [v] * n)

    def concat(self, a, c) -> ir.Value:
        n = a.type.count
        return self.b.shuffle_vector(a, c, ir.Constant(_vec(I32, 2 * n), list(range(2 * n))))

    def half_of(self, v, which: int) -> ir.Value:
        n = v.type.count // 2
        return self.b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                                     ir.Constant(_vec(I32, n), list(range(which * n, which * n + n))))

    def intr(self, name, ret, args) -> ir.Value:
        fn = cgutils.get_or_insert_function(self.mod, ir.FunctionType(ret, [a.type for a in args]), name)
        return self.b.call(fn, args)

    def udot(self, u, s) -> ir.Value:
        """<32 x i8> unsigned (each < 128) . <32 x i8> signed -> <8 x i32>, lane i = sum of bytes 4i..4i+3."""
        v8 = _vec(I32, 8)
        if LEVEL == "vnni":
            return self.intr("llvm.x86.avx512.vpdpbusd.256", v8,
                             [ir.Constant(v8, None), self.b.bitcast(u, v8), self.b.bitcast(s, v8)])
        if LEVEL == "avx2":
            # pairs of u*s in int16 (|sum| <= 2*127*128: no saturation), then pairs of those in int32
            p16 = self.intr("llvm.x86.avx2.pmadd.ub.sw", _vec(I16, 16), [u, s])
            return self.intr("llvm.x86.avx2.pmadd.wd", v8, [p16, self.const(I16, 16, 1)])
        return self.sum4(self.b.mul(self.b.zext(u, _vec(I32, 32)), self.b.sext(s, _vec(I32, 32))))

    def udot64(self, u, s) -> ir.Value:
        """<64 x i8> unsigned (each < 128) . <64 x i8> signed -> <16 x i32> (_ZMM only: one zmm vpdpbusd)."""
        v16 = _vec(I32, 16)
        return self.intr("llvm.x86.avx512.vpdpbusd.512", v16,
                         [ir.Constant(v16, None), self.b.bitcast(u, v16), self.b.bitcast(s, v16)])

    def sdot64(self, w, s) -> ir.Value:
        """<64 x i8> signed . <64 x i8> signed (codes in [-127, 127]) -> <16 x i32> (_ZMM only), as `sdot`."""
        zero = ir.Constant(w.type, None)
        neg = self.b.icmp_signed("<", w, zero)
        return self.udot64(self.b.select(neg, self.b.sub(zero, w), w), self.b.select(neg, self.b.sub(zero, s), s))

    def lut64(self, idx, table) -> ir.Value:
        """<64 x i8> indices 0..15 -> table[idx] (_ZMM only: one 512-bit vpshufb, the table once per 128 bits)."""
        return self.intr("llvm.x86.avx512.pshuf.b.512", _vec(I8, 64), [ir.Constant(_vec(I8, 64), list(table) * 4), idx])

    def pairs16(self, u, s) -> ir.Value:
        """<32 x i8> unsigned (each < 64) . <32 x i8> signed -> <16 x i16>, lane i = u[2i] s[2i] + u[2i+1] s[2i+1]
        (|sum| <= 2 * 63 * 128: no saturation)."""
        if LEVEL in ("vnni", "avx2"):
            return self.intr("llvm.x86.avx2.pmadd.ub.sw", _vec(I16, 16), [u, s])
        return self._pair_sums(self.b.mul(self.b.zext(u, _vec(I16, 32)), self.b.sext(s, _vec(I16, 32))))

    def madd16(self, p, w) -> ir.Value:
        """<16 x i16> . <16 x i16> -> <8 x i32>, lane i = p[2i] w[2i] + p[2i+1] w[2i+1]."""
        if LEVEL in ("vnni", "avx2"):
            return self.intr("llvm.x86.avx2.pmadd.wd", _vec(I32, 8), [p, w])
        return self._pair_sums(self.b.mul(self.b.sext(p, _vec(I32, 16)), self.b.sext(w, _vec(I32, 16))))

    def _pair_sums(self, v) -> ir.Value:
        """<2n x T> -> <n x T>: lane i = v[2i] + v[2i+1] (portable IR)."""
        n = v.type.count // 2
        undef = ir.Constant(v.type, ir.Undefined)
        return self.b.add(*(self.b.shuffle_vector(v, undef, ir.Constant(_vec(I32, n), list(range(j, 2 * n, 2))))
                            for j in (0, 1)))

    def sdot(self, w, s) -> ir.Value:
        """<32 x i8> signed . <32 x i8> signed (codes in [-127, 127]) -> <8 x i32> like `udot`."""
        if LEVEL == "generic":
            prod = self.b.mul(self.b.sext(w, _vec(I32, 32)), self.b.sext(s, _vec(I32, 32)))
            return self.sum4(prod)
        # the x86 byte dots take one unsigned operand: |w| . (s * sign(w)), as llama.cpp does
        zero = ir.Constant(w.type, None)
        neg = self.b.icmp_signed("<", w, zero)
        return self.udot(self.b.select(neg, self.b.sub(zero, w), w),   # |-128| = 0x80 = 128 as unsigned
                         self.b.select(neg, self.b.sub(zero, s), s))

    def sum4(self, prod) -> ir.Value:
        """<32 x i32> -> <8 x i32>: lane i = sum of lanes 4i..4i+3."""
        v8 = _vec(I32, 8)
        lanes = [self.b.shuffle_vector(prod, ir.Constant(prod.type, ir.Undefined),
                                       ir.Constant(v8, [4 * i + k for i in range(8)])) for k in range(4)]
        return self.b.add(self.b.add(lanes[0], lanes[1]), self.b.add(lanes[2], lanes[3]))

    def fma8(self, a, c, acc) -> ir.Value:
        v = _vec(F32, 8)
        return self.intr("llvm.fma.v8f32", v, [a, c, acc])

    def hsum8(self, v) -> ir.Value:
        lo, hi = self.half_of(v, 0), self.half_of(v, 1)
        s4 = self.b.fadd(lo, hi)
        s2 = self.b.fadd(self.half_of(s4, 0), self.half_of(s4, 1))
        return self.b.fadd(self.b.extract_element(s2, ir.Constant(I32, 0)),
                           self.b.extract_element(s2, ir.Constant(I32, 1)))

    def lut16(self, idx, table) -> ir.Value:
        """<32 x i8> indices 0..15 -> <32 x i8> table[idx] for a constant 16-entry int8 table: one vpshufb
        (per 128-bit lane, so the table is given twice) on the x86 levels; elsewhere a tree of 15 vector
        selects on the index bits (portable IR: LLVM has no variable byte shuffle)."""
        if LEVEL in ("vnni", "avx2"):
            return self.intr("llvm.x86.avx2.pshuf.b", _vec(I8, 32), [ir.Constant(_vec(I8, 32), list(table) * 2), idx])
        level = [self.const(I8, 32, int(v)) for v in table]
        for bit in range(4):
            on = self.b.icmp_unsigned("!=", self.b.and_(idx, self.const(I8, 32, 1 << bit)), self.const(I8, 32, 0))
            level = [self.b.select(on, level[2 * k + 1], level[2 * k]) for k in range(len(level) // 2)]
        return level[0]

    def nibbles(self, w) -> ir.Value:
        """<16 x i8> packed 4-bit codes -> <32 x i8>: the 16 low nibbles, then the 16 high nibbles."""
        n = w.type.count
        lo = self.b.and_(w, self.const(I8, n, 15))
        hi = self.b.lshr(w, self.const(I8, n, 4))
        return self.concat(lo, hi)


class _Acc:
    """A row's running sums: `vecs` (_N_ACC vectors of 8 floats, block dot * scale) and `sc` (scalar terms
    such as mins). Several vector sums, not one: a k-quant super-block adds 8-9 products, and one sum would
    chain them through the FMA latency (4 cycles each), which bounded Q4_K/Q6_K at ~13 GB/s per thread."""

    def __init__(self, x: _IR):
        self.x = x
        self.vecs = [cgutils.alloca_once_value(x.b, ir.Constant(_vec(F32, 8), None)) for _ in range(_N_ACC)]
        # <16 x float> sums of the zmm dots (_ZMM); created here, before the block loop, where their zeroing
        # runs once (unused ones vanish in LLVM's mem2reg)
        self.wide = [cgutils.alloca_once_value(x.b, ir.Constant(_vec(F32, 16), None)) for _ in range(_N_ACC if _ZMM else 0)]
        self.sc = [cgutils.alloca_once_value(x.b, ir.Constant(F32, 0.0)) for _ in range(2)]
        # <2 x float> sums of a block pair's offset terms (_emit_pair: one lane per block)
        self.two = [cgutils.alloca_once_value(x.b, ir.Constant(_vec(F32, 2), None)) for _ in range(2)]
        self.shift = 0  # added to every slot: _row_dot's odd blocks of a pair run on other sums than the even ones

    def add_dot(self, idot, scale, slot: int = 0) -> None:
        """vecs[slot] += float(idot) * scale, for an <8 x i32> block dot and a float scale."""
        self.fma(self.x.b.sitofp(idot, _vec(F32, 8)), self.x.splat(scale, 8), slot)

    def fma(self, a, c, slot: int) -> None:
        """vecs[slot] += a * c for <8 x float> a, c."""
        p = self.vecs[(slot + self.shift) % _N_ACC]
        self.x.b.store(self.x.fma8(a, c, self.x.b.load(p)), p)

    def fma16(self, a, c, slot: int) -> None:
        """wide[slot] += a * c for <16 x float> a, c."""
        p = self.wide[(slot + self.shift) % _N_ACC]
        v = _vec(F32, 16)
        self.x.b.store(self.x.intr("llvm.fma.v16f32", v, [a, c, self.x.b.load(p)]), p)

    def fma2(self, a, c) -> None:
        """two[shift] += a * c for <2 x float> a, c."""
        p = self.two[self.shift % 2]
        self.x.b.store(self.x.intr("llvm.fma.v2f32", _vec(F32, 2), [a, c, self.x.b.load(p)]), p)

    def add(self, v) -> None:
        p = self.sc[self.shift % 2]
        self.x.b.store(self.x.b.fadd(self.x.b.load(p), v), p)

    def total(self) -> ir.Value:
        b = self.x.b
        vs = [b.load(p) for p in self.vecs]
        for p in self.wide:
            w = b.load(p)
            vs[0] = b.fadd(vs[0], b.fadd(self.x.half_of(w, 0), self.x.half_of(w, 1)))
        while len(vs) > 1:
            vs = [b.fadd(vs[i], vs[i + 1]) for i in range(0, len(vs), 2)]
        two = b.fadd(b.load(self.two[0]), b.load(self.two[1]))
        two = b.fadd(b.extract_element(two, ir.Constant(I32, 0)), b.extract_element(two, ir.Constant(I32, 1)))
        return b.fadd(self.x.hsum8(vs[0]), b.fadd(b.fadd(b.load(self.sc[0]), b.load(self.sc[1])), two))


_N_ACC = 4  # independent vector sums per row (a power of 2)
# the 32-weight block types: _row_dot runs their blocks in pairs, the second on other sums (Acc.shift). One block's
# terms in one chain of vector FMAs (4 cycles each) and scalar adds bounded a row at ~34 bytes per 4 cycles: Q8_0
# on Qwen3-1.7B's 151936 x 2048 classifier, 2 threads, 28-35 -> 45-47 GB/s (49 GB/s machine), its decode 14.0-15.6
# -> 17.4-20.9 t/s (`edgeq bench -p 16 -n 48`, interleaved runs)
_PAIRED = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"}


def data_ptrs(context, builder, signature, args, which) -> list:
    """The data pointers (as i8*) of the array arguments numbered `which` of an intrinsic's call."""
    return [builder.bitcast(context.make_array(signature.args[i])(context, builder, args[i]).data, I8.as_pointer())
            for i in which]


def _prefetch(x, ptr, locality: int = 3) -> None:
    """llvm.prefetch (a read, into the data cache) of the line at the i8* `ptr`: locality 3 prefetcht0 (into L1), 2
    prefetcht1 (into L2). Never faults, so an address past the data is harmless."""
    fn = cgutils.get_or_insert_function(x.mod, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
                                        "llvm.prefetch.p0i8")
    x.b.call(fn, [ptr, ir.Constant(I32, 0), ir.Constant(I32, locality), ir.Constant(I32, 1)])


def _prefetch_ahead(x, row, o, span: int, ahead: int, locality: int = 3) -> None:
    """Software prefetch (_prefetch; into L1 by default) of the `span` bytes `ahead` bytes past byte offset `o` of the
    i8* `row`: one per 64-byte line, issued as the block loop reaches the bytes before them (reaching past the row or
    the matrix is harmless). ahead 0: none."""
    if not ahead:
        return
    for i in range(0, span, 64):
        _prefetch(x, x.b.gep(row, [x.off(o, ahead + i)]), locality)


def _prefetch_levels(x, row, o, span: int, near: int, far: int) -> None:
    """_prefetch_ahead of the same span into L1 `near` bytes ahead and into L2 `far` bytes ahead (0: none): the
    decode dots' two-level prefetch (ROW_NEAR / ROW_FAR below)."""
    _prefetch_ahead(x, row, o, span, near)
    _prefetch_ahead(x, row, o, span, far, 2)


def _row_dot(qtype: str, block, ahead: int = 0, far: int = 0):
    """Numba intrinsic dot(raw, off, nb, qx, dx, bsums) -> float32 looping `block` over the row's nb blocks, the lines
    `ahead` bytes on prefetched into L1 and those `far` bytes on into L2 as it goes (0: none).

    block(x, acc, row, o, b, qx, dx, bsums): emit the IR of one block at byte offset `o` (i64) of the i8*
    `row`, block index `b` (i64); qx/dx/bsums are i8* to the quantized activation row. The block stride is
    the registry's (formats/quants.py)."""
    block_bytes = QTYPES[qtype].block_bytes

    def impl(typingctx, raw, off, nb, qx, dx, bsums):
        sig = types.float32(raw, types.intp, types.intp, qx, dx, bsums)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            row0, pqx, pdx, pbsums = data_ptrs(context, builder, signature, args, (0, 3, 4, 5))
            row = builder.gep(row0, [args[1]])
            acc = _Acc(x)
            x.nb = args[2]

            def emit(b, shift: int = 0):  # block b (i64) on the sums of `shift`
                acc.shift = shift
                block(x, acc, row, builder.mul(b, ir.Constant(I64, block_bytes)), b, pqx, pdx, pbsums)

            def fetch(b, blocks: int):  # the lines `ahead` (L1) and `far` (L2) of the `blocks` blocks from block b
                o = builder.mul(b, ir.Constant(I64, block_bytes))
                _prefetch_levels(x, row, o, blocks * block_bytes, ahead, far)

            if qtype in PAIR_IR:  # _ZMM: two blocks per 512-bit byte dot, two pairs (on other sums) per turn
                def emit_pair(b, shift: int = 0):
                    acc.shift = shift
                    _emit_pair(x, acc, PAIR_IR[qtype], row, builder.mul(b, ir.Constant(I64, block_bytes)),
                               block_bytes, b, pqx, pdx, pbsums)

                c = lambda v: ir.Constant(I64, v)  # noqa: E731
                nb = args[2]
                with cgutils.for_range(builder, builder.sdiv(nb, c(4))) as loop:
                    fetch(builder.mul(loop.index, c(4)), 4)
                    for k in range(2):
                        emit_pair(builder.add(builder.mul(loop.index, c(4)), c(2 * k)), k)
                rest = builder.srem(nb, c(4))
                with cgutils.for_range(builder, builder.sdiv(rest, c(2))):  # a last pair
                    emit_pair(builder.sub(nb, rest))
                with cgutils.for_range(builder, builder.srem(nb, c(2))):  # an odd count's last block
                    emit(builder.sub(nb, c(1)))
            elif qtype in _PAIRED:
                two = ir.Constant(I64, 2)
                with cgutils.for_range(builder, builder.sdiv(args[2], two)) as loop:
                    fetch(builder.mul(loop.index, two), 2)
                    for k in range(2):
                        emit(builder.add(builder.mul(loop.index, two), ir.Constant(I64, k)), k)
                with cgutils.for_range(builder, builder.srem(args[2], two)):  # an odd count's last block
                    emit(builder.sub(args[2], ir.Constant(I64, 1)))
            else:
                with cgutils.for_range(builder, args[2]) as loop:
                    fetch(loop.index, 1)
                    emit(loop.index)
            return acc.total()
        return sig, codegen
    impl.__doc__ = f"{qtype} row . quantized activations"
    impl.__name__ = impl.__qualname__ = "dot_" + qtype.lower()
    return intrinsic(impl)


def _bsum_pair(x, bsums, b):
    """Integer sum of the 32 activation codes of block b (two 16-sums), as float."""
    i = x.b.mul(b, ir.Constant(I64, 2))
    s = x.b.add(x.elem(bsums, i, I32), x.elem(bsums, x.b.add(i, ir.Constant(I64, 1)), I32))
    return x.b.sitofp(s, F32)


def _block_q4_0(x, acc, row, o, b, qx, dx, bsums):
    # 18 bytes: d (f16), 16 bytes of nibbles (low = weights 0..15, high = 16..31); w = d * (q - 8)
    d = x.half(row, o)
    q = x.nibbles(x.at(row, x.b.add(o, ir.Constant(I64, 2)), _vec(I8, 16)))
    s = x.act(qx, b)
    dd = x.b.fmul(d, x.elem(dx, b, F32))
    acc.add_dot(x.udot(q, s), dd)
    acc.add(x.b.fmul(x.b.fmul(dd, ir.Constant(F32, -8.0)), _bsum_pair(x, bsums, b)))


def _block_q4_1(x, acc, row, o, b, qx, dx, bsums):
    # 20 bytes: d, m (f16), 16 bytes of nibbles; w = d * q + m
    d = x.half(row, o)
    m = x.half(row, x.b.add(o, ir.Constant(I64, 2)))
    q = x.nibbles(x.at(row, x.b.add(o, ir.Constant(I64, 4)), _vec(I8, 16)))
    s = x.act(qx, b)
    xd = x.elem(dx, b, F32)
    acc.add_dot(x.udot(q, s), x.b.fmul(d, xd))
    acc.add(x.b.fmul(x.b.fmul(m, xd), _bsum_pair(x, bsums, b)))


def _block_q8_0(x, acc, row, o, b, qx, dx, bsums):
    # 34 bytes: d (f16), 32 signed bytes; w = d * q.  udot needs an unsigned operand: |w| . (x * sign(w))
    d = x.half(row, o)
    w = x.at(row, x.b.add(o, ir.Constant(I64, 2)), _vec(I8, 32))
    s = x.act(qx, b)
    acc.add_dot(x.sdot(w, s), x.b.fmul(d, x.elem(dx, b, F32)))


def _high_bits(x, qh32, shift: int) -> ir.Value:
    """The 32 bits of an i32 as <32 x i8> of (bit << shift): Q5's fifth bits (kmov + masked move on AVX-512)."""
    bits = x.b.zext(x.b.bitcast(qh32, _vec(ir.IntType(1), 32)), _vec(I8, 32))
    return x.b.shl(bits, x.const(I8, 32, shift))


def _block_q5_0(x, acc, row, o, b, qx, dx, bsums):
    # 22 bytes: d (f16), qh (32 fifth bits), 16 bytes of nibbles; w = d * (q - 16)
    d = x.half(row, o)
    q = x.b.or_(x.nibbles(x.at(row, x.off(o, 6), _vec(I8, 16))), _high_bits(x, x.at(row, x.off(o, 2), I32), 4))
    dd = x.b.fmul(d, x.elem(dx, b, F32))
    acc.add_dot(x.udot(q, x.act(qx, b)), dd)
    acc.add(x.b.fmul(x.b.fmul(dd, ir.Constant(F32, -16.0)), _bsum_pair(x, bsums, b)))


def _block_q5_1(x, acc, row, o, b, qx, dx, bsums):
    # 24 bytes: d, m (f16), qh, 16 bytes of nibbles; w = d * q + m
    d = x.half(row, o)
    m = x.half(row, x.off(o, 2))
    q = x.b.or_(x.nibbles(x.at(row, x.off(o, 8), _vec(I8, 16))), _high_bits(x, x.at(row, x.off(o, 4), I32), 4))
    xd = x.elem(dx, b, F32)
    acc.add_dot(x.udot(q, x.act(qx, b)), x.b.fmul(d, xd))
    acc.add(x.b.fmul(x.b.fmul(m, xd), _bsum_pair(x, bsums, b)))


def _k_scales_mins(x, row, o):
    """Q4_K/Q5_K: the 8 six-bit scales and the 8 mins of a super-block (12 packed bytes at row + o) as two
    <8 x i32>, unpacked with 32-bit masks (llama.cpp's utmp/kmask trick) instead of 16 scalar extractions."""
    c = lambda v: ir.Constant(I32, v)  # noqa: E731
    u0, u1, u2 = (x.at(row, x.off(o, 4 * i), I32) for i in range(3))
    lo6, lo4, lo2 = c(0x3F3F3F3F), c(0x0F0F0F0F), c(0x03030303)
    top2 = lambda u: x.b.shl(x.b.and_(x.b.lshr(u, c(6)), lo2), c(4))  # noqa: E731  bits 6-7 of each byte -> 4-5
    scales = (x.b.and_(u0, lo6), x.b.or_(x.b.and_(u2, lo4), top2(u0)))
    mins = (x.b.and_(u1, lo6), x.b.or_(x.b.and_(x.b.lshr(u2, c(4)), lo4), top2(u1)))

    def widen(pair):
        v = ir.Constant(_vec(I32, 2), None)
        for i, u in enumerate(pair):
            v = x.b.insert_element(v, u, c(i))
        return x.b.zext(x.b.bitcast(v, _vec(I8, 8)), _vec(I32, 8))
    return widen(scales), widen(mins)


def _lane(x, v, k: int) -> ir.Value:
    """<8 x T> with every lane = lane k of v."""
    return x.b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(_vec(I32, 8), [k] * 8))


def _super_act(x, b, dx, bsums):
    """The activation side of super-block b (8 blocks of 32): dx[8b:8b+8] as <8 x float> and the sums of the
    codes of each block (bsums[16b:16b+16] added in pairs) as <8 x i32>."""
    dxv = x.at(dx, x.b.mul(b, ir.Constant(I64, 32)), _vec(F32, 8))
    bs = x.at(bsums, x.b.mul(b, ir.Constant(I64, 64)), _vec(I32, 16))
    undef = ir.Constant(bs.type, ir.Undefined)
    even = x.b.shuffle_vector(bs, undef, ir.Constant(_vec(I32, 8), list(range(0, 16, 2))))
    odd = x.b.shuffle_vector(bs, undef, ir.Constant(_vec(I32, 8), list(range(1, 16, 2))))
    return dxv, x.b.add(even, odd)


def kquant_min_sums(x, bsums, b):
    """<8 x float> dx_k * (sum of the 32 codes of block k) for the 8 blocks of super-block b: the float32 tail of
    linear._quantized's bsums, after the row's nb * 16 sums of 16 (x.nb: the row's super-blocks, which every row
    loop emitting BLOCK_IR sets: _row_dot, batch_dot._rows_dot)."""
    if x.nb is None:
        raise TypeError("kquant_min_sums: the row loop must set x.nb (the row's super-blocks) before its blocks")
    return x.at(bsums, x.b.mul(x.b.add(x.b.mul(x.nb, ir.Constant(I64, 16)), x.b.mul(b, ir.Constant(I64, 8))),
                               ir.Constant(I64, 4)), _vec(F32, 8))


def _kquant_super(x, acc, b, d, dmin, sc8, mn8, codes, qx, dx, bsums, pairs=None):
    """A Q4_K/Q5_K super-block, vectorized over its 8 sub-blocks: w = d * sc * q - dmin * mn, so the row dot
    is sum_k d sc_k dx_k (q_k . s_k) - dmin sum_k mn_k dx_k bsum_k. codes(k) -> <32 x i8> of sub-block k;
    pairs(c) -> <64 x i8> of sub-blocks 2c, 2c+1 (their activations are adjacent too), for the zmm dots.
    The min term reads dx_k bsum_k as computed once per activation row (kquant_min_sums) where the row loop says
    where they are (x.nb): one load and multiply a super-block instead of the 16 sums' pairwise add (vphaddd),
    lane fix-up (vpermq), integer multiply (vpmulld) and conversion, 6 of the Q4_K loop's 81 instructions (its hot
    speed on one thread 17.2 -> 17.6-18.4 GB/s, `edgeq bench` decode of the 1.7B Q4_K_M 19.50 -> 19.74 t/s,
    medians of 5 alternated runs, each pair in its favour; the 3B 11.45 -> 11.54, 3 of 3)."""
    dxv = x.at(dx, x.b.mul(b, ir.Constant(I64, 32)), _vec(F32, 8))
    mins = kquant_min_sums(x, bsums, b)                                              # dx_k bsum_k
    acc.fma(x.b.fmul(x.b.sitofp(mn8, _vec(F32, 8)), mins), x.splat(x.b.fneg(dmin), 8), _N_ACC - 1)
    coef = x.b.fmul(x.b.fmul(x.splat(d, 8), x.b.sitofp(sc8, _vec(F32, 8))), dxv)   # d sc_k dx_k
    kb0 = x.b.mul(b, ir.Constant(I64, 8))
    if _ZMM and pairs is not None:
        undef = ir.Constant(coef.type, ir.Undefined)
        for c in range(4):
            s = x.at(qx, x.b.mul(x.b.add(kb0, ir.Constant(I64, 2 * c)), ir.Constant(I64, 32)), _vec(I8, 64))
            p = x.b.sitofp(x.udot64(pairs(c), s), _vec(F32, 16))
            acc.fma16(p, x.b.shuffle_vector(coef, undef, ir.Constant(_vec(I32, 16), [2 * c] * 8 + [2 * c + 1] * 8)), c)
        return
    for k in range(8):
        p = x.udot(codes(k), x.act(qx, x.b.add(kb0, ir.Constant(I64, k))))
        acc.fma(x.b.sitofp(p, _vec(F32, 8)), _lane(x, coef, k), k)


def _int_sum(x, vs) -> ir.Value:
    """The sum of integer vectors vs, added pairwise (a tree, not one serial chain)."""
    while len(vs) > 1:
        vs = [x.b.add(vs[i], vs[i + 1]) for i in range(0, len(vs) - 1, 2)] + vs[len(vs) - len(vs) % 2:]
    return vs[0]


def _kquant_int(x, acc, b, d, dmin, sc8, mn8, codes, qx, dx, bsums):
    """A Q4_K/Q5_K super-block on activations quantized per super-block (SUPER_ACT: dx[8b] is its one scale):
    the row dot is d dx (sum_k sc_k (q_k . s_k)) - dmin dx (sum_k mn_k bsum_k), the first sum in integers (byte
    pairs to int16, times sc_k to int32)."""
    kb0 = x.b.mul(b, ir.Constant(I64, 8))
    dx0 = x.elem(dx, kb0, F32)
    _, bs = _super_act(x, b, dx, bsums)
    sc16 = x.b.trunc(sc8, _vec(I16, 8))
    undef = ir.Constant(sc16.type, ir.Undefined)
    sums = []
    for k in range(8):
        p = x.pairs16(codes(k), x.act(qx, x.b.add(kb0, ir.Constant(I64, k))))
        sums.append(x.madd16(p, x.b.shuffle_vector(sc16, undef, ir.Constant(_vec(I32, 16), [k] * 16))))
    acc.fma(x.b.sitofp(_int_sum(x, sums), _vec(F32, 8)), x.splat(x.b.fmul(d, dx0), 8), 0)
    acc.fma(x.b.sitofp(x.b.mul(mn8, bs), _vec(F32, 8)), x.splat(x.b.fmul(x.b.fneg(dmin), dx0), 8), _N_ACC - 1)


def _nibble_pair(x, w) -> ir.Value:
    """<32 x i8> packed nibbles -> <64 x i8>: the 32 low nibbles, then the 32 high ones (one zmm shift by 0 | 4
    per half and one mask)."""
    ww = x.b.bitcast(x.concat(w, w), _vec(I16, 32))
    sh = x.b.lshr(ww, ir.Constant(_vec(I16, 32), [0] * 16 + [4] * 16))
    return x.b.and_(x.b.bitcast(sh, _vec(I8, 64)), x.const(I8, 64, 15))


def _block_q4_k(x, acc, row, o, b, qx, dx, bsums):
    # 144 bytes: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles: each 32 bytes hold
    # sub-block 2c in the low nibbles and 2c+1 in the high ones
    d, dmin = x.half(row, o), x.half(row, x.off(o, 2))
    sc8, mn8 = _k_scales_mins(x, row, x.off(o, 4))
    w = [x.at(row, x.off(o, 16 + 32 * c), _vec(I8, 32)) for c in range(4)]

    def codes(k):
        return x.b.and_(w[k >> 1], x.const(I8, 32, 15)) if k % 2 == 0 else x.b.lshr(w[k >> 1], x.const(I8, 32, 4))
    if "Q4_K" in SUPER_ACT:
        _kquant_int(x, acc, b, d, dmin, sc8, mn8, codes, qx, dx, bsums)
        return
    _kquant_super(x, acc, b, d, dmin, sc8, mn8, codes, qx, dx, bsums, lambda c: _nibble_pair(x, w[c]))


def _block_q5_k(x, acc, row, o, b, qx, dx, bsums):
    # 176 bytes: d, dmin, 12 bytes of scales/mins, qh[32] (bit k of byte j = fifth bit of sub-block k), qs[128]
    d, dmin = x.half(row, o), x.half(row, x.off(o, 2))
    sc8, mn8 = _k_scales_mins(x, row, x.off(o, 4))
    qh = x.at(row, x.off(o, 16), _vec(I8, 32))
    w = [x.at(row, x.off(o, 48 + 32 * c), _vec(I8, 32)) for c in range(4)]

    def codes(k):
        q = x.b.and_(w[k >> 1], x.const(I8, 32, 15)) if k % 2 == 0 else x.b.lshr(w[k >> 1], x.const(I8, 32, 4))
        hi = x.b.shl(x.b.and_(x.b.lshr(qh, x.const(I8, 32, k)), x.const(I8, 32, 1)), x.const(I8, 32, 4))
        return x.b.or_(q, hi)
    if "Q5_K" in SUPER_ACT:
        _kquant_int(x, acc, b, d, dmin, sc8, mn8, codes, qx, dx, bsums)
        return
    _kquant_super(x, acc, b, d, dmin, sc8, mn8, codes, qx, dx, bsums)


def _sub16(x, acc, q, b, k, s0, s1, d, offset: int, qx, dx, bsums):
    """Sub-block k (32 weights, two scales s0, s1 of 16) of super-block b: w = d * s * (q - offset)."""
    kb = x.b.add(x.b.mul(b, ir.Constant(I64, 8)), ir.Constant(I64, k))
    xd = x.b.fmul(d, x.elem(dx, kb, F32))
    scv = x.concat(x.splat(s0, 4), x.splat(s1, 4))
    acc.add_dot(x.b.mul(x.udot(q, x.act(qx, kb)), scv), xd)
    i = x.b.mul(kb, ir.Constant(I64, 2))
    corr = x.b.add(x.b.mul(s0, x.elem(bsums, i, I32)), x.b.mul(s1, x.elem(bsums, x.b.add(i, ir.Constant(I64, 1)), I32)))
    acc.add(x.b.fmul(x.b.fmul(xd, ir.Constant(F32, float(-offset))), x.b.sitofp(corr, F32)))


def _block_q6_k(x, acc, row, o, b, qx, dx, bsums):
    # 210 bytes: ql[128] low nibbles, qh[64] 2-bit high parts, 16 int8 scales (one per 16), d (f16);
    # w = d * sc * (q - 32). Half h covers sub-blocks 4h..4h+3 from ql[64h:64h+64] and qh[32h:32h+32].
    # Vectorized over the super-block: the dot of sub-block k is d dx_k sum_{j=0,1} sc_{2k+j} (q . s over its
    # 16 weights), and the offset term -32 d sum_k dx_k (sc_2k bsum_2k + sc_2k+1 bsum_2k+1) is one vector;
    # in integers with one dx per super-block (SUPER_ACT, _q6_k_int), else in floats two sub-blocks per zmm dot.
    d = x.half(row, x.off(o, 208))
    if "Q6_K" in SUPER_ACT:
        _q6_k_int(x, acc, row, o, b, d, qx, dx, bsums)
        return
    dxv = x.at(dx, x.b.mul(b, ir.Constant(I64, 32)), _vec(F32, 8))
    coef = x.b.fmul(x.splat(d, 8), dxv)                                               # d dx_k
    s16 = x.b.sext(x.at(row, x.off(o, 192), _vec(I8, 16)), _vec(I32, 16))
    bs = x.at(bsums, x.b.mul(b, ir.Constant(I64, 64)), _vec(I32, 16))
    prod, undef = x.b.mul(s16, bs), ir.Constant(_vec(I32, 16), ir.Undefined)
    pair = [x.b.shuffle_vector(prod, undef, ir.Constant(_vec(I32, 8), list(range(j, 16, 2)))) for j in (0, 1)]
    acc.fma(x.b.sitofp(x.b.add(*pair), _vec(F32, 8)), x.b.fmul(coef, x.const(F32, 8, -32.0)), _N_ACC - 1)
    _q6_k_zmm(x, acc, row, o, b, qx, s16, coef)   # SUPER_ACT holds every k-quant but on _ZMM


def _q6_k_codes(x, row, o, h: int, kk: int) -> ir.Value:
    """Q6_K's 6-bit codes (0..63) of sub-block 4h + kk: a nibble of ql[64h:64h+64] and two bits of qh[32h:32h+32]."""
    lo = x.at(row, x.off(o, 64 * h + 32 * (kk % 2)), _vec(I8, 32))
    lo = x.b.and_(lo, x.const(I8, 32, 15)) if kk < 2 else x.b.lshr(lo, x.const(I8, 32, 4))
    hb = x.at(row, x.off(o, 128 + 32 * h), _vec(I8, 32))
    hi = x.b.shl(x.b.and_(x.b.lshr(hb, x.const(I8, 32, 2 * kk)), x.const(I8, 32, 3)), x.const(I8, 32, 4))
    return x.b.or_(lo, hi)


def _q6_k_int(x, acc, row, o, b, d, qx, dx, bsums):
    """Q6_K on activations quantized per super-block (SUPER_ACT): the row dot is
    d dx (sum_j sc_j (q_j . s_j) - 32 sum_j sc_j bsum_j) over the 16 groups j of 16 weights, all in integers."""
    kb0 = x.b.mul(b, ir.Constant(I64, 8))
    s8 = x.at(row, x.off(o, 192), _vec(I8, 16))
    s16, undef = x.b.sext(s8, _vec(I16, 16)), ir.Constant(_vec(I16, 16), ir.Undefined)
    bs = x.at(bsums, x.b.mul(b, ir.Constant(I64, 64)), _vec(I32, 16))
    prod = x.b.mul(x.b.sext(s8, _vec(I32, 16)), bs)
    # only the total of the 8 lanes matters (the row's sum adds them): the two halves, not neighbouring lanes, added
    corr = x.b.add(x.half_of(prod, 0), x.half_of(prod, 1))
    sums = [x.b.mul(corr, x.const(I32, 8, -32))]
    for k in range(8):
        p = x.pairs16(_q6_k_codes(x, row, o, k // 4, k % 4), x.act(qx, x.b.add(kb0, ir.Constant(I64, k))))
        scv = x.b.shuffle_vector(s16, undef, ir.Constant(_vec(I32, 16), [2 * k] * 8 + [2 * k + 1] * 8))
        sums.append(x.madd16(p, scv))
    acc.fma(x.b.sitofp(_int_sum(x, sums), _vec(F32, 8)), x.splat(x.b.fmul(d, x.elem(dx, kb0, F32)), 8), 0)


def _q6_k_zmm(x, acc, row, o, b, qx, s16, coef):
    """Q6_K's codes dotted two sub-blocks per 512-bit vpdpbusd: sub-blocks 4h+2c and 4h+2c+1 take the low (c=0) or
    high (c=1) nibbles of ql[64h:64h+64] and bits 4c..4c+3 of qh[32h:32h+32], and their activations are adjacent.
    The 16 scales go into the float coefficients (d dx_k sc_j, one per 16 weights) instead of an integer multiply
    per sub-block."""
    undef8 = ir.Constant(_vec(F32, 8), ir.Undefined)
    c16 = x.b.fmul(x.b.sitofp(s16, _vec(F32, 16)),                                     # d dx_(j/2) sc_j
                   x.b.shuffle_vector(coef, undef8, ir.Constant(_vec(I32, 16), [j // 2 for j in range(16)])))
    undef = ir.Constant(c16.type, ir.Undefined)
    for h in range(2):
        ql = x.b.bitcast(x.at(row, x.off(o, 64 * h), _vec(I8, 64)), _vec(I16, 32))
        hb = x.at(row, x.off(o, 128 + 32 * h), _vec(I8, 32))
        hh = x.b.bitcast(x.concat(hb, hb), _vec(I16, 32))
        for c in range(2):
            lo = x.b.and_(x.b.bitcast(x.b.lshr(ql, x.const(I16, 32, 4 * c)), _vec(I8, 64)), x.const(I8, 64, 15))
            hs = x.b.lshr(hh, ir.Constant(_vec(I16, 32), [4 * c] * 16 + [4 * c + 2] * 16))
            hi = x.b.shl(x.b.and_(x.b.bitcast(hs, _vec(I8, 64)), x.const(I8, 64, 3)), x.const(I8, 64, 4))
            k = 4 * h + 2 * c
            s = x.at(qx, x.b.mul(x.b.add(x.b.mul(b, ir.Constant(I64, 8)), ir.Constant(I64, k)), ir.Constant(I64, 32)),
                     _vec(I8, 64))
            p = x.b.sitofp(x.udot64(x.b.or_(lo, hi), s), _vec(F32, 16))
            sc = x.b.shuffle_vector(c16, undef, ir.Constant(_vec(I32, 16), [2 * k + j // 4 for j in range(16)]))
            acc.fma16(p, sc, 2 * h + c)


def _block_q2_k(x, acc, row, o, b, qx, dx, bsums):
    # 84 bytes: 16 scale bytes (low nibble scale, high nibble min, per 16 weights), qs[64] 2-bit codes,
    # d, dmin (f16); w = d * sc * q - dmin * mn.  Sub-block k uses qs[32(k>>2):+32] >> 2(k&3).
    d, dmin = x.half(row, x.off(o, 80)), x.half(row, x.off(o, 82))
    for half in range(2):
        w = x.at(row, x.off(o, 16 + 32 * half), _vec(I8, 32))
        for j in range(4):
            k = 4 * half + j
            q = x.b.and_(x.b.lshr(w, x.const(I8, 32, 2 * j)), x.const(I8, 32, 3))
            c0, c1 = x.byte(row, x.off(o, 2 * k)), x.byte(row, x.off(o, 2 * k + 1))
            lo = lambda v: x.b.and_(v, ir.Constant(I32, 15))  # noqa: E731
            _sub16(x, acc, q, b, k, lo(c0), lo(c1), d, 0, qx, dx, bsums)
            kb = x.b.add(x.b.mul(b, ir.Constant(I64, 8)), ir.Constant(I64, k))
            i = x.b.mul(kb, ir.Constant(I64, 2))
            mins = x.b.add(x.b.mul(x.b.lshr(c0, ir.Constant(I32, 4)), x.elem(bsums, i, I32)),
                           x.b.mul(x.b.lshr(c1, ir.Constant(I32, 4)), x.elem(bsums, x.b.add(i, ir.Constant(I64, 1)), I32)))
            acc.add(x.b.fmul(x.b.fmul(dmin, x.elem(dx, kb, F32)), x.b.fsub(ir.Constant(F32, 0.0),
                                                                             x.b.sitofp(mins, F32))))


def _q3_scale(x, row, o, i: int):
    """Q3_K: signed 6-bit scale i (0..15) from the 12 packed bytes at row + o, as i32."""
    c = lambda v: ir.Constant(I32, v)  # noqa: E731
    lo = x.b.and_(x.byte(row, x.off(o, i)), c(15)) if i < 8 else x.b.lshr(x.byte(row, x.off(o, i - 8)), c(4))
    hi = x.b.and_(x.b.lshr(x.byte(row, x.off(o, 8 + (i & 3))), c(2 * (i >> 2))), c(3))
    return x.b.sub(x.b.or_(lo, x.b.shl(hi, c(4))), c(32))


def _block_q3_k(x, acc, row, o, b, qx, dx, bsums):
    # 110 bytes: hmask[32] (bit k of byte j = third bit of sub-block k), qs[64] 2-bit codes, 12 bytes of
    # 6-bit scales (one per 16), d (f16); w = d * sc * (q - 4)
    d = x.half(row, x.off(o, 108))
    hm = x.at(row, x.off(o, 0), _vec(I8, 32))
    for half in range(2):
        w = x.at(row, x.off(o, 32 + 32 * half), _vec(I8, 32))
        for j in range(4):
            k = 4 * half + j
            q = x.b.and_(x.b.lshr(w, x.const(I8, 32, 2 * j)), x.const(I8, 32, 3))
            hi = x.b.shl(x.b.and_(x.b.lshr(hm, x.const(I8, 32, k)), x.const(I8, 32, 1)), x.const(I8, 32, 2))
            _sub16(x, acc, x.b.or_(q, hi), b, k, _q3_scale(x, row, x.off(o, 96), 2 * k),
                   _q3_scale(x, row, x.off(o, 96), 2 * k + 1), d, 4, qx, dx, bsums)


_IQ4_TABLE = [int(v) for v in KVALUES_IQ4NL]


def _iq4_codes(x, row, o) -> ir.Value:
    """The 32 signed table levels of the 16 index bytes at row + o (low nibbles, then high nibbles)."""
    return x.lut16(x.nibbles(x.at(row, o, _vec(I8, 16))), _IQ4_TABLE)


def _block_iq4_nl(x, acc, row, o, b, qx, dx, bsums):
    # 18 bytes: d (f16), 16 bytes of 4-bit indices into the non-linear table; w = d * table[q].
    # The levels are signed (-127..113): sdot moves their signs onto the activations (as llama.cpp's psignb)
    d = x.half(row, o)
    acc.add_dot(x.sdot(_iq4_codes(x, row, x.off(o, 2)), x.act(qx, b)), x.b.fmul(d, x.elem(dx, b, F32)))


def _block_iq4_xs(x, acc, row, o, b, qx, dx, bsums):
    # 136 bytes: d (f16), scales_h (u16: 2 high bits per sub-block), scales_l[4] (4 low bits per sub-block),
    # qs[128] (16 bytes per 32 weights); w = d * (scale - 32) * table[q]
    d = x.half(row, o)
    sh = x.b.zext(x.at(row, x.off(o, 2), I16), I32)
    c = lambda v: ir.Constant(I32, v)  # noqa: E731
    for k in range(8):
        lo = x.b.and_(x.b.lshr(x.byte(row, x.off(o, 4 + k // 2)), c(4 * (k % 2))), c(15))
        hi = x.b.and_(x.b.lshr(sh, c(2 * k)), c(3))
        ls = x.b.sub(x.b.or_(lo, x.b.shl(hi, c(4))), c(32))
        kb = x.b.add(x.b.mul(b, ir.Constant(I64, 8)), ir.Constant(I64, k))
        scale = x.b.fmul(x.b.fmul(d, x.b.sitofp(ls, F32)), x.elem(dx, kb, F32))
        acc.add_dot(x.sdot(_iq4_codes(x, row, x.off(o, 8 + 16 * k)), x.act(qx, kb)), scale, k)  # 4 chains


# ---- block pairs on _ZMM: the 32-weight types' two consecutive blocks as one <64 x i8> of codes, so one 512-bit
# vpdpbusd, conversion and FMA serve both (their activations are adjacent too). pair(x, row, o0, o1) = (codes,
# signed, <2 x float> scales d of the two blocks, <2 x float> offsets e or None): weight w = d * code + e.
def _halves2(x, row, o0, o1, at: int) -> ir.Value:
    """The two f16 at row + o0 + at and row + o1 + at as <2 x float>."""
    v = ir.Constant(_vec(F32, 2), None)
    for i, o in enumerate((o0, o1)):
        v = x.b.insert_element(v, x.half(row, x.off(o, at)), ir.Constant(I32, i))
    return v


def _scale_min2(x, row, o0, o1):
    """Q4_1/Q5_1: the (d, m) f16 pairs at the head of both blocks, as (<2 x float> d, <2 x float> m): one 4-lane
    conversion (vcvtph2ps; EDGEQ_SOFT_HALF's software conversion one half at a time)."""
    if not _HW_HALF:
        return _halves2(x, row, o0, o1, 0), _halves2(x, row, o0, o1, 2)
    dm = ir.Constant(_vec(I32, 2), None)
    for i, o in enumerate((o0, o1)):
        dm = x.b.insert_element(dm, x.at(row, o, I32), ir.Constant(I32, i))
    f = x.b.fpext(x.b.bitcast(dm, _vec(ir.HalfType(), 4)), _vec(F32, 4))
    undef = ir.Constant(f.type, ir.Undefined)
    return tuple(x.b.shuffle_vector(f, undef, ir.Constant(_vec(I32, 2), [j, j + 2])) for j in (0, 1))


def _nibbles64(x, row, o0, o1, at: int) -> ir.Value:
    """The 16 packed bytes at o0 + at and at o1 + at -> <64 x i8>: block 0's 16 low nibbles, its 16 high ones, then
    block 1's (each block's weights in order): one zmm shift by 0 | 4 per 16-bit lane and one mask."""
    a, c = (x.at(row, x.off(o, at), _vec(I8, 16)) for o in (o0, o1))
    ac = x.concat(a, c)
    both = x.b.shuffle_vector(ac, ir.Constant(ac.type, ir.Undefined),
                              ir.Constant(_vec(I32, 64), list(range(16)) * 2 + list(range(16, 32)) * 2))
    sh = x.b.lshr(x.b.bitcast(both, _vec(I16, 32)), ir.Constant(_vec(I16, 32), ([0] * 8 + [4] * 8) * 2))
    return x.b.and_(x.b.bitcast(sh, _vec(I8, 64)), x.const(I8, 64, 15))


def _high64(x, row, o0, o1, at: int) -> ir.Value:
    """Q5's fifth bits of both blocks (the i32 at o0 + at, then o1 + at) as <64 x i8> of bit << 4."""
    lo, hi = (x.b.zext(x.at(row, x.off(o, at), I32), I64) for o in (o0, o1))
    bits = x.b.or_(lo, x.b.shl(hi, ir.Constant(I64, 32)))
    return x.b.shl(x.b.zext(x.b.bitcast(bits, _vec(ir.IntType(1), 64)), _vec(I8, 64)), x.const(I8, 64, 4))


def _times(x, v, k: float) -> ir.Value:
    return x.b.fmul(v, ir.Constant(_vec(F32, 2), [k, k]))


def _pair_q4_0(x, row, o0, o1):
    d = _halves2(x, row, o0, o1, 0)
    return _nibbles64(x, row, o0, o1, 2), False, d, _times(x, d, -8.0)


def _pair_q4_1(x, row, o0, o1):
    return (_nibbles64(x, row, o0, o1, 4), False) + _scale_min2(x, row, o0, o1)


def _pair_q5_0(x, row, o0, o1):
    d = _halves2(x, row, o0, o1, 0)
    return x.b.or_(_nibbles64(x, row, o0, o1, 6), _high64(x, row, o0, o1, 2)), False, d, _times(x, d, -16.0)


def _pair_q5_1(x, row, o0, o1):
    q = x.b.or_(_nibbles64(x, row, o0, o1, 8), _high64(x, row, o0, o1, 4))
    return (q, False) + _scale_min2(x, row, o0, o1)


def _pair_q8_0(x, row, o0, o1):
    # the signed codes + 128 as unsigned bytes (one xor per 64 codes: w = d * (u - 128), the 128 taken back through
    # the activations' sums), not the sign moved onto the activations (sdot64: a compare, two negations, two
    # selects). Decode, `edgeq bench FILE -p 128 -n 48 -t 2`, fresh processes alternated (2026-12-06, Xeon):
    # Qwen3-1.7B-shape Q8_0 13.2-14.0 -> 14.5-15.1 t/s, Qwen2.5-0.5B-shape Q8_0 44.4-46.5 -> 45.9-47.2. IQ4_NL's
    # pairs the same way (the table + 128) went 21.3-21.9 -> 18.3-18.8 t/s (1.7B shape), so they keep the sign move.
    w = x.concat(*(x.at(row, x.off(o, 2), _vec(I8, 32)) for o in (o0, o1)))
    d = _halves2(x, row, o0, o1, 0)
    return x.b.xor(w, x.const(I8, 64, -128)), False, d, _times(x, d, -128.0)


def _pair_iq4_nl(x, row, o0, o1):
    return x.lut64(_nibbles64(x, row, o0, o1, 2), _IQ4_TABLE), True, _halves2(x, row, o0, o1, 0), None


def _emit_pair(x, acc, pair, row, o0, block_bytes: int, b, qx, dx, bsums) -> None:
    """Blocks b and b + 1 of a row (at byte offsets o0, o0 + block_bytes) into acc: wide sum 0 (of acc.shift) takes
    d dx (c . q) of both in one <16 x float> FMA, the two-lane sum their offsets e dx sum(q)."""
    codes, signed, d, e = pair(x, row, o0, x.off(o0, block_bytes))
    s = x.at(qx, x.b.mul(b, ir.Constant(I64, 32)), _vec(I8, 64))
    p = x.b.sitofp((x.sdot64 if signed else x.udot64)(codes, s), _vec(F32, 16))
    dx2 = x.at(dx, x.b.mul(b, ir.Constant(I64, 4)), _vec(F32, 2))
    coef = x.b.fmul(d, dx2)
    acc.fma16(p, x.b.shuffle_vector(coef, ir.Constant(coef.type, ir.Undefined),
                                    ir.Constant(_vec(I32, 16), [0] * 8 + [1] * 8)), 0)
    if e is not None:
        bs = x.at(bsums, x.b.mul(b, ir.Constant(I64, 8)), _vec(I32, 4))  # two 16-code sums per block
        acc.fma2(x.b.fmul(e, dx2), x.b.sitofp(x._pair_sums(bs), _vec(F32, 2)))


# qtype -> its pair IR, where the CPU has 512-bit byte dots (the single-row dots use them; one block alone, a row's
# odd last one, takes BLOCK_IR)
PAIR_IR = {"Q4_0": _pair_q4_0, "Q4_1": _pair_q4_1, "Q5_0": _pair_q5_0, "Q5_1": _pair_q5_1, "Q8_0": _pair_q8_0,
           "IQ4_NL": _pair_iq4_nl} if _ZMM else {}

# qtype -> the IR of one block (the row dots here, the multi-row dots of cpu_kernels/batch_dot.py)
BLOCK_IR = {
    "Q8_0": _block_q8_0, "Q4_0": _block_q4_0, "Q4_1": _block_q4_1, "Q5_0": _block_q5_0, "Q5_1": _block_q5_1,
    "Q2_K": _block_q2_k, "Q3_K": _block_q3_k, "Q4_K": _block_q4_k, "Q5_K": _block_q5_k, "Q6_K": _block_q6_k,
    "IQ4_NL": _block_iq4_nl, "IQ4_XS": _block_iq4_xs}
# Bytes ahead of each block that the decode row dots prefetch, a line per 64 bytes as their block loop goes (0: none;
# linear._mm_template then prefetches a row's span ahead in one burst before each row). Intel (the Xeon, 2 threads,
# every >= 2048-row matrix of the Qwen3-1.7B files in turn in huge pages, `python benchmarks/prefetch_distance.py FILE
# --distances 1536 --in-loop 1024 1536 2048 2560`, medians of 9 passes): against the burst 1536 ahead, Q4_K 24.2 ->
# 27.7 GB/s, Q6_K 27.0 -> 31.1, Q8_0 27.6 -> 31.8 (1536-2560 within 2-4% of each other; into L2 instead of L1:
# Q4_K 25.8, Q6_K 28.8: linear._prefetch's note on L1 prefetches holds for a burst of a row's lines, not for one line
# at a time). Decode (`edgeq bench FILE -p 16 -n 64 -t 2`, alternated): Qwen3-1.7B Q4_K_M 19.3 -> 22.0 t/s, Q8_0 13.8
# -> 14.3, Llama-3.2-3B Q4_K_M 10.8 -> 12.5, Qwen2.5-0.5B Q4_K_M 43-47 -> 52-53, SmolLM2 135-140 -> 169-171, Gemma 3
# 74-75 -> 76-78. The AMD hosts were measured with the burst only, so they keep it. The half rows (HALF_DOTS) prefetch
# ROW_AHEAD into L1; the row dots, and batch_dot's tiles and lanes, two levels (below).
ROW_AHEAD = 2048 if proc_field("/proc/cpuinfo", "vendor_id") == "GenuineIntel" else 0
# The single-row dots (ROW_DOTS) instead prefetch in two levels where ROW_AHEAD is on: into L2 ROW_FAR bytes ahead and
# into L1 ROW_NEAR ahead, the L1 prefetch then served from L2 (an L1 prefetch from DRAM holds one of the core's few
# L1 miss buffers for a DRAM round trip). The Xeon, 2 threads, huge pages, `python benchmarks/prefetch_distance.py
# FILE --distances --in-loop 2048 512 --l2 0 3072`-style variants alternated in one process, medians of 15 passes,
# GB/s: Qwen3-1.7B Q4_K 25.1 -> 26.1, Q6_K 26.5 -> 29.3 (one thread 12.8 -> 13.2, 12.9 -> 14.1), Q8_0 27.3 -> 29.0;
# Qwen2.5-0.5B's Q5_0 19.2 -> 19.8, Q8_0 29.6 -> 30.9 (medians of 15); 256 / 2048 no better than one level, 4096 or
# 6144 into L2 no better than 3072. Decode (`edgeq bench FILE -p 16 -n 96 -t 2`, the two alternated, 2026-12-06
# evening): SmolLM2 119.7-120.7 -> 150.1-153.3 t/s (its 96 MB of weights fit in the 480 MB of L3 this host reports:
# the far prefetch seems to hide its latency), Gemma 3 61.7-63.2 -> 76.5-76.9, Qwen2.5-0.5B Q4_K_M 51.9-54.8 ->
# 54.9-56.3, Qwen3-1.7B Q4_K_M 21.0-21.7 -> 23.0-23.4, Llama-3.2-3B Q4_K_M 12.3-12.4 -> 12.9-13.1.
ROW_NEAR, ROW_FAR = (512, 3072) if ROW_AHEAD else (0, 0)

# qtype -> its row dot intrinsic
ROW_DOTS = {qtype: _row_dot(qtype, block, ROW_NEAR, ROW_FAR) for qtype, block in BLOCK_IR.items()}


def _half_row_dot(qtype: str, ahead: int):
    """Numba intrinsic dot(W, i, X, t) -> float32: row i of W (R, n) uint16 F16/BF16 bits . row t of X (T, n) float32
    (both C-contiguous; the caller keeps i < R, t < T). 64 weights a turn, converted 16 at a time (vcvtph2ps for F16;
    BF16 the top half of a float32) into four vector sums, the lines `ahead` bytes on prefetched as the loop goes;
    the last n % 64 one at a time. F16 needs hardware conversion (_HW_HALF)."""
    bf16 = qtype == "BF16"
    V, H = _vec(F32, 16), _vec(I16, 16)

    def impl(typingctx, W, i, X, t):
        sig = types.float32(W, types.intp, X, types.intp)

        def codegen(context, builder, signature, args):
            x = _IR(builder)
            c = lambda v: ir.Constant(I64, v)  # noqa: E731
            aw, ax = (context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 2))
            n = cgutils.unpack_tuple(builder, aw.shape, 2)[1]
            w = builder.gep(builder.bitcast(aw.data, I8.as_pointer()),
                            [builder.mul(args[1], cgutils.unpack_tuple(builder, aw.strides, 2)[0])])
            xr = builder.gep(builder.bitcast(ax.data, I8.as_pointer()),
                             [builder.mul(args[3], cgutils.unpack_tuple(builder, ax.strides, 2)[0])])

            def conv(h):  # <16 x i16> or i16 bits -> float32s
                vec = isinstance(h.type, ir.VectorType)
                i32, f32 = (_vec(I32, 16), V) if vec else (I32, F32)
                if bf16:
                    return builder.bitcast(builder.shl(builder.zext(h, i32), ir.Constant(i32, [16] * 16 if vec else 16)),
                                           f32)
                return builder.fpext(builder.bitcast(h, _vec(ir.HalfType(), 16) if vec else ir.HalfType()), f32)
            sums = [cgutils.alloca_once_value(builder, ir.Constant(V, None)) for _ in range(4)]
            with cgutils.for_range(builder, builder.udiv(n, c(64))) as loop:
                k0 = builder.mul(loop.index, c(64))
                o = builder.mul(k0, c(2))  # byte offset in the row
                _prefetch_ahead(x, w, o, 128, ahead)
                for u, p in enumerate(sums):
                    xv = x.at(xr, builder.mul(builder.add(k0, c(16 * u)), c(4)), V)
                    builder.store(x.intr("llvm.fma.v16f32", V, [conv(x.at(w, x.off(o, 32 * u), H)), xv,
                                                               builder.load(p)]), p)
            tot = builder.fadd(builder.fadd(builder.load(sums[0]), builder.load(sums[1])),
                               builder.fadd(builder.load(sums[2]), builder.load(sums[3])))
            for _ in range(4):
                tot = builder.fadd(x.half_of(tot, 0), x.half_of(tot, 1))
            rest = cgutils.alloca_once_value(builder, builder.extract_element(tot, ir.Constant(I32, 0)))
            with cgutils.for_range_slice(builder, builder.sub(n, builder.urem(n, c(64))), n, c(1)) as (k, _):
                f = conv(x.at(w, builder.mul(k, c(2)), I16))
                builder.store(builder.fadd(builder.load(rest), builder.fmul(f, x.at(xr, builder.mul(k, c(4)), F32))), rest)
            return builder.load(rest)
        return sig, codegen
    impl.__doc__ = f"{qtype} row . float32 row"
    impl.__name__ = impl.__qualname__ = "dot_" + qtype.lower()
    return intrinsic(impl)


# F16/BF16 -> the decode row dot over the 16-bit weights in place (F16 where the CPU converts halves)
HALF_DOTS = {q: _half_row_dot(q, ROW_AHEAD) for q in (("F16", "BF16") if _HW_HALF else ("BF16",))}

"""The key/value cache: per layer, keys and values in their own cache type, allocated once.

Cache types, the user's vocabulary (keys and values chosen independently); each side stores its type in one of
the storage layouts of cpu_kernels/attention_q.py (float32, float16, int8_per_token, uint4_per_token,
uint4_per_channel, uint8_per_channel; _LAYOUT_K / _LAYOUT_V). "q8" and "q4" give each side the layout that
suits it (KIVI): keys per channel (groups of 32 positions with a half scale + min per channel; the not-yet-full
group kept in half precision), values per token (blocks of 32 along head_dim). Keys have outlier channels
(Qwen2.5's k_proj biases reach +-145 on a few channels): a per-token scale is set by the outlier and crushes the
token's other channels, which cost 4.2% perplexity on Qwen2.5-0.5B with per-token int8 keys.
  "f16"  half precision (2 bytes/element)
  "q8"   8-bit: keys per channel (1.125 bytes/element), values int8 per token with a half scale per 32
         elements along head_dim (1.0625 bytes/element)
  "q8c"  the per-channel 8-bit layout by name (keys only; what "q8" gives keys)
  "q8t"  int8 per token by name (what "q8" gives values; for keys, the old default and a comparison point)
  "q4"   4-bit with a half scale + min per 32 (0.625 bytes/element): keys per channel, values per token.
         Per-token 4-bit keys cost ~6% perplexity on SmolLM2, per-channel ones ~1%.
  "q4c"  the per-channel 4-bit layout by name (keys only; what "q4" gives keys)
  "q4t"  the per-token 4-bit layout by name (what "q4" gives values; for keys, a comparison point)
  "f32"  float32, for debugging
None means DEFAULT_K / DEFAULT_V (q8 / q8).

`store(il, pos0, k, v)` writes positions pos0..pos0+T-1 (and forgets anything stored at or after pos0: this
is how the engine rewinds to a common prefix); `attend(il, q, pos0, scale)` runs causal attention of the new
queries over the cache, reading the quantized blocks directly (cpu_kernels/attention_q.py).

A decode token (one position of one or several caches) goes through `DecodeStep` (the caches' `decode_step`):
store and attend in one kernel call per layer, for all the slots of a `KVPool` at once (the server's caches:
slices of one array per layer and side).

Sliding-window layers (layout.window > 0) keep a ring of window + max_batch slots instead of n_ctx: memory is
bounded, but a rewind further back than the ring still holds is impossible: ask `can_rewind_to(pos)` first.
"""
from __future__ import annotations

import contextlib
import mmap

import numba
import numpy as np

from edgeq.cpu_kernels import attention_q as aq
from edgeq.cpu_kernels.half import from_half, to_half

CACHE_TYPES = ("f16", "q8", "q8c", "q8t", "q4", "q4c", "q4t", "f32")
KEY_ONLY = ("q8c", "q4c")
# user-facing cache type -> storage layout of cpu_kernels/attention_q.py, per side
_LAYOUT_K = {"f16": "float16", "q8": "uint8_per_channel", "q8c": "uint8_per_channel", "q8t": "int8_per_token",
             "q4": "uint4_per_channel", "q4c": "uint4_per_channel", "q4t": "uint4_per_token", "f32": "float32"}
_LAYOUT_V = {"f16": "float16", "q8": "int8_per_token", "q8t": "int8_per_token", "q4": "uint4_per_token",
             "q4t": "uint4_per_token", "f32": "float32"}
DEFAULT_K = "q8"
DEFAULT_V = "q8"
MAX_BATCH = 512  # positions stored at once (the engine's prefill batch): the ring's slack

_QB = aq.QBLOCK


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class _Store:
    """One side (keys or values) of one layer: an attention_q.KVSide in storage layout `layout`."""

    def __init__(self, layout: str, n_kv: int, nslots: int, D: int, side: aq.KVSide | None = None):
        self.layout = layout
        self.side = aq.new_side(layout, n_kv, nslots, D) if side is None else side
        self.kernel_arg = tuple(self.side)  # what the attention kernels take (see attention_q.KVSide)
        self.nslots = nslots
        self.marked: tuple[int, np.ndarray] | None = None  # (position, its group's half-precision rows before it)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.side if isinstance(a, np.ndarray))

    def mark(self, pos: int) -> None:
        """Keep the pending rows of position pos's group (per-channel layouts): a later rewind to pos reopens the
        group with them, as they were, instead of dequantizing it (that group is quantized once it fills)."""
        head = pos % _QB
        if self.layout in aq.PER_CHANNEL and head:
            self.marked = (pos, self.side.pending[:, :head].copy())
        else:
            self.marked = None

    def write(self, x: np.ndarray, pos0: int, n_before: int) -> None:
        """x (T, Hkv, D) float32 contiguous at positions pos0..; n_before = positions held before this call."""
        T = x.shape[0]
        if self.marked is not None and pos0 < self.marked[0]:
            self.marked = None  # rows before the mark change: it no longer describes them
        slots = np.arange(pos0, pos0 + T, dtype=np.int64) % self.nslots
        a = self.side
        if self.layout == "float32":
            a.float32[:, slots] = x.transpose(1, 0, 2)
        elif self.layout == "float16":
            a.float16[:, slots] = x.astype(np.float16).view(np.uint16).transpose(1, 0, 2)
        elif self.layout == "int8_per_token":
            aq.quantize_int8_per_token(x, slots, a.int8_codes.view(np.int8), a.scales)
        elif self.layout == "uint4_per_token":
            aq.quantize_uint4_per_token(x, slots, a.uint4_codes, a.scales, a.mins)
        else:
            self._write_per_channel(x, pos0, n_before)

    def _write_per_channel(self, x: np.ndarray, pos0: int, n_before: int) -> None:
        a, n_kv, D = self.side, x.shape[1], x.shape[2]
        g0 = pos0 // _QB
        head = pos0 - g0 * _QB              # positions of group g0 already held, before pos0
        gs0 = (g0 * _QB % self.nslots) // _QB
        u8 = self.layout == "uint8_per_channel"
        reopen = head and n_before >= (g0 + 1) * _QB  # rewound into a group that was already quantized
        if reopen and self.marked is not None and self.marked[0] == pos0:
            # a marked position (the same prompt again): the group's rows as they were, so the continuation
            # computes what it computed the first time
            a.pending[:, :head] = self.marked[1]
        elif reopen:
            # reopen the group from its codes (its first `head` positions)
            tmp = np.empty((n_kv, head, D), np.float32)
            if u8:
                aq.dequantize_uint8_per_channel_group(a.uint8_channel_codes, a.scales, a.mins, gs0, head, tmp)
            else:
                aq.dequantize_uint4_per_channel_group(a.uint4_channel_codes, a.scales, a.mins, gs0, head, tmp)
            a.pending[:, :head] = to_half(tmp)
        # half bits in Numba (cpu_kernels/half.py), not numpy's astype(float16): 1.6 ns a value there
        x16 = to_half(x)
        if head + x.shape[0] < _QB:  # no group completes (most decode steps): the rows only join the pending group
            a.pending[:, head:head + x.shape[0]] = x16.transpose(1, 0, 2)
            return
        # C order (concatenate follows the transposed view's strides): from_half and the quantizer compile once,
        # for C arrays (a second compilation for another layout would cost 0.5 s of a first run)
        seq16 = np.ascontiguousarray(np.concatenate([a.pending[:, :head].transpose(1, 0, 2), x16])) if head else x16
        seq = from_half(seq16)
        n_full = seq.shape[0] // _QB
        if n_full:
            grps = ((g0 + np.arange(n_full, dtype=np.int64)) * _QB % self.nslots) // _QB
            groups = seq[:n_full * _QB].reshape(n_full, _QB, n_kv, D)
            if u8:
                aq.quantize_uint8_per_channel(groups, grps, a.uint8_channel_codes, a.scales, a.mins)
            else:
                aq.quantize_uint4_per_channel(groups, grps, a.uint4_channel_codes, a.scales, a.mins)
        rest = seq16[n_full * _QB:]  # the positions left pending, as the half bits they are
        if rest.shape[0]:
            a.pending[:, :rest.shape[0]] = rest.transpose(1, 0, 2)


def _n_slots(layout, n_ctx: int, layout_k: str, layout_v: str, max_batch: int) -> int:
    """Cache slots of one layer: n_ctx (rounded up to whole groups for per-channel layouts), or on a
    sliding-window layer a ring of a window plus one batch when that is smaller."""
    window = max(0, int(layout.window))
    if window and window + max_batch < n_ctx:
        return _round_up(window + max_batch, _QB)
    per_channel = layout_k in aq.PER_CHANNEL or layout_v in aq.PER_CHANNEL
    return _round_up(n_ctx, _QB) if per_channel else n_ctx


class _Layer:
    def __init__(self, layout, n_ctx: int, layout_k: str, layout_v: str, max_batch: int,
                 sides: tuple[aq.KVSide, aq.KVSide] | None = None):
        self.n_kv, self.D, self.window = layout.n_kv_heads, layout.head_dim, max(0, int(layout.window))
        self.nslots = _n_slots(layout, n_ctx, layout_k, layout_v, max_batch)
        self.ring = self.nslots < n_ctx
        k_side, v_side = sides or (None, None)
        self.k = _Store(layout_k, self.n_kv, self.nslots, self.D, k_side)
        self.v = _Store(layout_v, self.n_kv, self.nslots, self.D, v_side)
        self.n = 0  # positions held: 0..n-1 (the oldest nslots of them on a ring)
        self.decode_kernel = None  # (kernel, fns) once looked up (_decode_kernel)
        # what the decode kernel reads: tuple(KVSide)s with a leading sequence axis (a KVPool sets its own)
        self.pooled = tuple((s.layout,) + tuple(a[None] for a in s[1:]) for s in (self.k.side, self.v.side))

    def keeps(self, lo: int, hi: int) -> bool:
        """Whether positions lo..hi-1 are all still held."""
        return lo >= hi or (0 <= lo and hi <= self.n and lo >= self.n - self.nslots)

    def can_rewind_to(self, pos: int) -> bool:
        if pos < 0 or pos > self.n:
            return False
        return self.keeps(max(0, pos - self.window + 1) if self.window else 0, pos)


class KVCache:
    """Keys/values of every layer; `store`, `attend`, `can_rewind_to`, `nbytes` (see the module docstring)."""

    def __init__(self, layouts, n_ctx: int, type_k: str | None = None, type_v: str | None = None,
                 max_batch: int = MAX_BATCH, pool: "KVPool | None" = None, index: int = 0):
        type_k, type_v = _check_types(layouts, type_k, type_v)
        self.n_ctx = n_ctx
        self.layouts = layouts
        self.type_k, self.type_v = type_k, type_v
        self.max_batch = max_batch
        self.pool, self.index = pool, index  # a KVPool's cache: sequence `index` of its arrays
        pooled = pool.sides if pool is not None else [None] * len(layouts)
        self.layers = [_Layer(L, n_ctx, _LAYOUT_K[type_k], _LAYOUT_V[type_v], max_batch,
                              None if kv is None else (aq.side_at(kv[0], index), aq.side_at(kv[1], index)))
                       for L, kv in zip(layouts, pooled)]
        if pool is not None:
            for L, kv in zip(self.layers, pooled):
                L.pooled = tuple(tuple(side) for side in kv)
        self.group = pool if pool is not None else self  # caches of one group decode together (DecodeStep)

    @staticmethod
    def decode_step(caches: list["KVCache"], positions: np.ndarray) -> "DecodeStep":
        """One decode token for each of `caches` (what models' forward passes call: they never import the
        runtime)."""
        return DecodeStep(caches, positions)

    def decode_tables(self):
        """The layers' arrays as cpu_kernels/decode_pass.py's compiled decode step reads them (its CacheTables),
        made once for this cache's group (a KVPool's are the pool's) and kept on it."""
        group = self.group
        tables = getattr(group, "_decode_tables", None)
        if tables is None:
            from edgeq.cpu_kernels import decode_pass

            layers = self.layers
            kernel, fns = layers[0].decode_kernel or _decode_kernel(layers[0])
            if any((L.decode_kernel or _decode_kernel(L))[0] is not kernel for L in layers):
                raise ValueError("KV cache: the compiled decode step needs one cache layout on every layer")
            kv = np.array([[decode_pass.kv_row(side) for side in L.pooled] for L in layers], np.int64)
            tables = group._decode_tables = decode_pass.CacheTables(
                kv, np.array([[side[0] for side in L.pooled] for L in layers], np.int64),
                np.array([L.window for L in layers], np.int64), np.array([L.nslots for L in layers], np.int64),
                decode_pass.attend_address(kernel), fns, [L.pooled for L in layers])
        return tables

    def mark(self, pos: int) -> None:
        """Remember what a rewind to pos (which every layer holds) needs to continue exactly as from here: the
        engine marks the end of a prompt whose logits it keeps, and a repeated prompt then continues with the
        same bits as its first run (a reopened per-channel key group would otherwise come back dequantized)."""
        for L in self.layers:
            L.k.mark(pos)
            L.v.mark(pos)

    def pretend_filled(self, n: int) -> None:
        """Mark positions 0..n-1 of every layer held without storing them (they read as zeros): for scratch passes
        that take the decode path without first compiling the prompt path (runtime/warmup.py)."""
        for L in self.layers:
            L.n = n

    @property
    def nbytes(self) -> int:
        """Bytes of every cache array (exact: data, scales, mins, pending groups)."""
        return sum(L.k.nbytes + L.v.nbytes for L in self.layers)

    def can_rewind_to(self, pos: int) -> bool:
        """Whether storing from position `pos` (forgetting pos..) leaves every position it needs still held.

        False when a sliding-window ring has already overwritten part of the window before `pos`: the engine
        must then evaluate from position 0 again."""
        return all(L.can_rewind_to(pos) for L in self.layers)

    def store(self, il: int, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        L = self.layers[il]
        T = k.shape[0]
        if k.ndim != 3 or k.shape != (T, L.n_kv, L.D) or v.shape != k.shape:
            raise ValueError(f"KV cache store: k {k.shape} / v {v.shape}, expected (T, {L.n_kv}, {L.D})")
        if pos0 + T > self.n_ctx:
            raise ValueError(f"KV cache full: positions {pos0}..{pos0 + T} > n_ctx {self.n_ctx}")
        if not L.can_rewind_to(pos0):
            raise ValueError(f"KV cache: cannot store at position {pos0} (layer {il} holds {L.n} positions, "
                             f"ring of {L.nslots}): check can_rewind_to first")
        if L.ring and T > L.nslots - L.window + 1:
            raise ValueError(f"KV cache: {T} positions at once overflow the sliding-window ring "
                             f"(at most {L.nslots - L.window + 1})")
        n_before = L.n
        L.n = pos0  # forget pos0.. first: a rewind followed by a failed write leaves no stale positions
        L.k.write(np.ascontiguousarray(k, dtype=np.float32), pos0, n_before)
        L.v.write(np.ascontiguousarray(v, dtype=np.float32), pos0, n_before)
        L.n = pos0 + T

    def attend(self, il: int, q: np.ndarray, pos0: int, scale: float) -> np.ndarray:
        L = self.layers[il]
        if q.ndim != 3 or q.shape[2] != L.D or q.shape[1] % L.n_kv != 0:
            raise ValueError(f"KV cache attend: q {q.shape} does not match (T, H*{L.n_kv}, {L.D})")
        T = q.shape[0]
        lo = max(0, pos0 - L.window + 1) if L.window else 0
        if T < 1 or pos0 < 0 or not L.keeps(lo, pos0 + T):
            raise ValueError(f"KV cache attend: positions {lo}..{pos0 + T} are not all held "
                             f"(layer {il} holds {L.n}, ring of {L.nslots})")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if T == 1:
            return _decode(L, np.array([self.index]), np.array([pos0]), np.array([L.n]), q, _NO_KV, _NO_KV, False,
                           scale)
        out = np.empty_like(q)
        n_blocks = -(-(pos0 + T - lo) // _QB) + 1
        threads = numba.get_num_threads()
        jobs = L.n_kv * -(-T // aq.TILE_Q)  # kv heads x tiles of queries, times the key splits
        n_split = max(1, min(n_blocks, -(-4 * threads // jobs)))
        kl, vl = L.k.side.layout, L.v.side.layout
        aq.attention_kernels(kl, vl)[0](q, L.k.kernel_arg, L.v.kernel_arg, L.n_kv, pos0, np.float32(scale), L.window,
                                        L.nslots, n_split, L.n // _QB * _QB, out, aq.addresses(kl, vl, aq.LOADS))
        return out


_NO_KV = np.zeros((1, 1, 1), np.float32)  # k, v of a decode kernel call that only attends


def _decode(L: _Layer, seqs: np.ndarray, positions: np.ndarray, held: np.ndarray, q: np.ndarray, k: np.ndarray,
            v: np.ndarray, store: bool, scale: float, threads: int | None = None) -> np.ndarray:
    """attention_q's decode kernel on layer L's pooled arrays: sequences seqs at positions (B,), holding `held`
    positions after the optional store of k, v (B, Hkv, D) -> (B, H, D)."""
    out = np.empty(q.shape, np.float32)
    kernel, fns = L.decode_kernel or _decode_kernel(L)
    kernel(q, k, v, L.pooled[0], L.pooled[1], seqs, positions, held, store, L.n_kv, np.float32(scale), L.window,
           L.nslots, numba.get_num_threads() if threads is None else threads, out, fns)
    return out


def _decode_kernel(L: _Layer) -> tuple:
    """(decode kernel, its `fns`) for layer L's cache layouts, kept on the layer: a decode token looks them up
    once per layer, and every lookup after a matrix product has streamed the caches costs microseconds."""
    kl, vl = L.k.side.layout, L.v.side.layout
    L.decode_kernel = (aq.attention_kernels(kl, vl)[1], aq.addresses(kl, vl))
    return L.decode_kernel


class _HugePageArena:
    """Zeroed arrays carved out of anonymous memory maps advised into 2 MB pages (Linux's transparent huge pages,
    where the system allows them on request; elsewhere ordinary pages): a server's pool is hundreds of small arrays,
    each below the 4 MB from which numpy asks for huge pages itself, and a decode step's attention visits every
    one of them, so each job's rows otherwise start with TLB misses (SmolLM2's 8 sequences at 300 positions, 30
    layers from memory: 4.71-4.95 -> 4.55-4.67 ms of batch attention a step). Maps of CHUNK bytes (or the array's size), 64-byte aligned
    arrays; what a pool never writes stays unmapped."""
    CHUNK = 64 << 20

    def __init__(self):
        self.buf, self.off = None, 0

    def zeros(self, shape: tuple, dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n == 0:
            return np.zeros(shape, dtype)
        off = -(-self.off // 64) * 64
        if self.buf is None or off + n > self.buf.size:
            size = max(self.CHUNK, n)
            if hasattr(mmap, "MAP_PRIVATE"):  # private: a shared anonymous map is shmem, whose huge pages are off
                m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            else:
                m = mmap.mmap(-1, size)  # zero-filled, mapped as pages are first written
            with contextlib.suppress(AttributeError, OSError, ValueError):
                m.madvise(mmap.MADV_HUGEPAGE)
            self.buf, off = np.frombuffer(m, np.uint8), 0
        self.off = off + n
        return self.buf[off:off + n].view(dtype).reshape(shape)


class KVPool:
    """`n` caches (`caches`) of the same layers and types whose arrays are slices of one array per layer and side
    (the server's slots): a decode step over several of them stores and attends in one kernel call per layer
    (`DecodeStep`) instead of one store and one attend per cache, each a parallel launch for a few microseconds of
    work. Each cache is an ordinary KVCache otherwise (prompts, rewinds, `attend`)."""

    def __init__(self, layouts, n_ctx: int, n: int, type_k: str | None = None, type_v: str | None = None,
                 max_batch: int = MAX_BATCH):
        type_k, type_v = _check_types(layouts, type_k, type_v)
        lk, lv = _LAYOUT_K[type_k], _LAYOUT_V[type_v]
        self.sides = []  # per layer: (keys, values), each a KVSide with a leading axis of n sequences
        arena = _HugePageArena()
        for L in layouts:
            nslots = _n_slots(L, n_ctx, lk, lv, max_batch)
            self.sides.append(tuple(aq.new_side(t, L.n_kv_heads, nslots, L.head_dim, n, arena.zeros)
                                    for t in (lk, lv)))
        self.caches = [KVCache(layouts, n_ctx, type_k, type_v, max_batch, pool=self, index=i) for i in range(n)]


class DecodeStep:
    """One decode token for each of several caches: `attend(il, q, k, v, scale)` stores k[b], v[b] (B, Hkv, D) at
    positions[b] of caches[b] and attends q[b] (B, H, D) on it, layer by layer. Distinct caches of one group (a
    KVPool's, or a single cache), each appending right after the positions it holds, take one decode kernel call
    per layer; any others one `store` and one `attend` per cache (the same kernel, the same bits)."""

    def __init__(self, caches: list[KVCache], positions: np.ndarray):
        self.caches = caches
        self.positions = np.ascontiguousarray(positions, dtype=np.int64)
        self.plist = self.positions.tolist()
        self.seqs = np.array([c.index for c in caches], np.int64)
        self.held = self.positions + 1
        self.together = bool(caches) and all(c.group is caches[0].group for c in caches) and \
            len(set(self.seqs.tolist())) == len(caches) and all(0 <= p < c.n_ctx for c, p in zip(caches, self.plist))
        self.threads = numba.get_num_threads()  # the pool this step runs on, asked once a step, not once a layer

    def attend(self, il: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
        caches = self.caches
        if self.together and all(c.layers[il].n == p for c, p in zip(caches, self.plist)):
            L, B = caches[0].layers[il], len(caches)
            if q.ndim != 3 or q.shape[0] != B or q.shape[2] != L.D or q.shape[1] % L.n_kv or \
                    k.shape != (B, L.n_kv, L.D) or v.shape != k.shape:
                raise ValueError(f"KV cache decode: q {q.shape}, k {k.shape}, v {v.shape} do not match "
                                 f"{B} sequences of (H*{L.n_kv}, {L.D})")
            out = _decode(L, self.seqs, self.positions, self.held, np.ascontiguousarray(q, dtype=np.float32),
                          np.ascontiguousarray(k, dtype=np.float32), np.ascontiguousarray(v, dtype=np.float32), True,
                          scale, self.threads)
            for c, p in zip(caches, self.plist):
                c.layers[il].n = p + 1
            return out
        out = np.empty((len(caches),) + q.shape[1:], np.float32)
        for i, (cache, p) in enumerate(zip(caches, self.plist)):
            cache.store(il, p, k[i:i + 1], v[i:i + 1])
            out[i] = cache.attend(il, q[i:i + 1], p, scale)[0]
        return out


def _check_types(layouts, type_k: str | None, type_v: str | None) -> tuple[str, str]:
    """Resolve None to the defaults and validate; every problem is one EdgeqError line."""
    from edgeq.errors import EdgeqError

    type_k = DEFAULT_K if type_k is None else str(type_k).lower()
    type_v = DEFAULT_V if type_v is None else str(type_v).lower()
    for side, t in (("keys", type_k), ("values", type_v)):
        if t not in CACHE_TYPES or (side == "values" and t in KEY_ONLY):
            ok = [c for c in CACHE_TYPES if side == "keys" or c not in KEY_ONLY]
            raise EdgeqError(f"unknown cache type {t!r} for {side} (choose from {', '.join(ok)})")
    for L in layouts:
        if (type_k not in ("f16", "f32") or type_v not in ("f16", "f32")) and L.head_dim % _QB:
            raise EdgeqError(f"quantized KV cache needs head_dim divisible by {_QB} (got {L.head_dim}): use f16")
    return type_k, type_v


def make_kv_cache(layouts, n_ctx: int, type_k: str | None = None, type_v: str | None = None,
                  max_batch: int = MAX_BATCH) -> KVCache:
    """The cache for these layer layouts; type None means the default type."""
    return KVCache(layouts, n_ctx, type_k, type_v, max_batch)

"""Fuzzing the whole load path: mutations of a small valid model file's header, metadata and tensor infos go
through `edgeq.load(path)` (reader, hyperparameters, weights, tokenizer, chat template) plus a render and an
encode, in a child process with 2 GB of address space and a time limit per case. Every case must load or end
in one of edgeq's own one-line errors: no other exception, no hang, no death by memory.

CI runs a few hundred cases; set EDGEQ_FUZZ_EXAMPLES for a longer local run (e.g. 100000).
"""
from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from _hostile import Loader, is_clean, write_tiny

EXAMPLES = int(os.environ.get("EDGEQ_FUZZ_EXAMPLES", "300"))
EXTREMES = [0, 1, 2, 3, 7, 8, 31, 32, 0x7F, 0x80, 0xFF, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
            2**63 - 1, 2**63, 2**64 - 1, 536_870_976]


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    from edgeq.formats.gguf_file import GGUFFile

    d = tmp_path_factory.mktemp("fuzz")
    path = write_tiny(d / "seed.gguf")
    with GGUFFile(path) as gf:
        header_end = gf.data_offset  # mutations land before the tensor data, where the parsing is
    return d, path.read_bytes(), header_end


@pytest.fixture(scope="module")
def loader():
    lo = Loader(memory=2 << 30, seconds=20.0)
    yield lo
    lo.close()


@st.composite
def mutants(draw, blob: bytes, header_end: int):
    b = bytearray(blob)
    for _ in range(draw(st.integers(1, 4), label="n_mutations")):
        pos = draw(st.integers(0, header_end - 1), label="pos")
        kind = draw(st.sampled_from(["byte", "u32", "u64", "f32"]), label="kind")
        if kind == "byte":
            b[pos] = draw(st.integers(0, 255), label="byte")
        elif kind == "f32":
            v = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e30, -1e-30]), label="float")
            b[pos:pos + 4] = struct.pack("<f", v)
        else:
            n = 4 if kind == "u32" else 8
            v = draw(st.sampled_from(EXTREMES) | st.integers(0, 2 ** (8 * n) - 1), label="value") % 2 ** (8 * n)
            b[pos:pos + n] = v.to_bytes(n, "little")
    if draw(st.integers(0, 9), label="truncate?") == 0:
        del b[draw(st.integers(0, len(b)), label="cut"):]
    return bytes(b[:len(blob) + 64])


_counter = [0]


def test_fuzz_load_path(seed_file, loader):
    d, blob, header_end = seed_file
    assert loader.load(d / "seed.gguf")["outcome"] == "ok"  # the seed itself loads

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=mutants(blob, header_end))
    def case(data):
        _counter[0] += 1
        path = d / f"m{_counter[0]}.gguf"
        path.write_bytes(data)
        try:
            r = loader.load(path)
        finally:
            path.unlink()
        assert is_clean(r), r

    case()


# Values of the right shape for the container but wrong for the model: every key of the tiny model may be
# dropped or replaced by a value of another type or range, so the cases reach the hyperparameter, tokenizer and
# template checks (byte mutations mostly stop in the reader).
_TEMPLATES = ["{{ 10**(10**9) }}", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
              "{{ ('a'*3*10**9)|length }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "{{ x.__class__ }}",
              "{% for m in messages %}{{ m.content }}", "{{ range(10**12)|list }}", ""]
_VALUES = (st.sampled_from(EXTREMES).map(lambda v: v - 2**63 if v >= 2**63 else v) | st.integers(-2**31, 2**31 - 1)
           | st.floats(allow_nan=True, allow_infinity=True, width=32) | st.text(max_size=12) | st.booleans()
           | st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=6)
           | st.lists(st.text(max_size=6), min_size=1, max_size=6) | st.just([]) | st.sampled_from(_TEMPLATES))


@st.composite
def metadata_changes(draw):
    from _hostile import tiny_metadata

    keys = sorted(tiny_metadata())
    changed = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=4, unique=True), label="keys")
    set_, drop, typed = {}, [], {}
    for k in changed:
        action = draw(st.sampled_from(["value", "drop", "cut"]), label="action")
        v = tiny_metadata()[k]
        if action == "drop":
            drop.append(k)
        elif action == "cut" and isinstance(v, list):
            set_[k] = v[:draw(st.integers(0, len(v)), label="keep")]
        else:
            set_[k] = draw(_VALUES, label="value")
    for k in [k for k, v in set_.items() if v == [] or (isinstance(v, list) and any(type(x) is bool for x in v))]:
        from gguf.constants import GGUFValueType as VT

        typed[k] = (set_.pop(k), VT.ARRAY, VT.INT32)
    return dict(set=set_, drop=tuple(drop), typed=typed)


def test_fuzz_metadata_values(seed_file, loader):
    d = seed_file[0]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(change=metadata_changes())
    def case(change):
        _counter[0] += 1
        path = d / f"v{_counter[0]}.gguf"
        write_tiny(path, **change)
        try:
            r = loader.load(path)
        finally:
            path.unlink()
        assert is_clean(r), (change, r)

    case()

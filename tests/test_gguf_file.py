"""The GGUF container: write → read round trips, agreement with gguf-py, and malformed files failing cleanly."""
from __future__ import annotations

import os
import struct
import time
import tracemalloc

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as VT
from hypothesis import given, settings, strategies as st

from edgeq.formats.errors import FormatError
from edgeq.formats.gguf_file import GGUFFile
from edgeq.formats.gguf_write import GGUFOutput, atomic_output, copy_metadata, infer_type, write_gguf


# --------------------------------------------------------------------------- a small, varied file

METADATA = {
    "general.name": "tiny",
    "tiny.block_count": 2,
    "tiny.context_length": 128,
    "tiny.rope.freq_base": 10000.0,
    "tiny.flag": True,
    "tiny.negative": -5,
    "tiny.big": 2**40,
    "tiny.per_layer": [4, 4],
    "tiny.signed_list": [-1, 2, 3],
    "tiny.floats": [0.5, 1.0, -2.25],
    "tiny.bools": [True, False, True],
    "tokenizer.ggml.tokens": ["<s>", "</s>", "héllo", "", "▁a"],
    "tokenizer.chat_template": "{{ messages }}",
}
EXPLICIT = {  # keys written with a given type, to check types survive
    "tiny.u8": (7, VT.UINT8, None),
    "tiny.i16": (-300, VT.INT16, None),
    "tiny.f64": (1.0 / 3.0, VT.FLOAT64, None),
    "tiny.i64_list": ([1, 2], VT.ARRAY, VT.INT64),
    "tiny.empty": ([], VT.ARRAY, VT.INT32),
}
TENSORS = [  # name, qtype, numpy shape
    ("token_embd.weight", "Q8_0", (10, 64)),
    ("blk.0.attn_q.weight", "Q4_K", (3, 256)),
    ("blk.0.attn_norm.weight", "F32", (64,)),
    ("blk.0.ffn_up.weight", "F16", (2, 3, 32)),
    ("blk.1.ffn_down.weight", "Q4_0", (5, 32)),
    ("output.weight", "BF16", (1, 1, 1, 32)),
]


def nbytes(qtype, shape):
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return int(np.prod(shape)) // bs * ts


def tensor_bytes(seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.integers(0, 256, nbytes(q, s), dtype=np.uint8) for name, q, s in TENSORS}


def write_tiny(path, seed=0):
    raws = tensor_bytes(seed)
    with GGUFOutput(path, "tiny") as out:
        for k, v in METADATA.items():
            out.add_metadata(k, v)
        for k, (v, t, sub) in EXPLICIT.items():
            out.add_metadata(k, v, t, sub)
        for name, q, s in TENSORS:
            out.add_tensor_info(name, q, s)
        for name, _, _ in TENSORS:
            out.write_tensor(name, raws[name])
    return raws


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny(path)


def plain(v):
    return v.tolist() if isinstance(v, np.ndarray) else v


# --------------------------------------------------------------------------- round trips

def test_roundtrip_metadata_and_types(tiny):
    path, _ = tiny
    with GGUFFile(path) as gf:
        assert gf.arch == "tiny"
        assert gf.get("general.architecture") == "tiny"
        assert gf.get("no.such.key", 42) == 42
        for k, v in METADATA.items():
            assert plain(gf.metadata[k]) == v, k
            assert gf.metadata_types[k] == infer_type(k, v)
        for k, (v, t, sub) in EXPLICIT.items():
            assert gf.metadata[k] == pytest.approx(v) if t == VT.FLOAT64 else plain(gf.metadata[k]) == v, k
            assert gf.metadata_types[k] == (t, sub)
        assert gf.metadata_types["tiny.block_count"] == (VT.UINT32, None)
        assert gf.metadata_types["tiny.negative"] == (VT.INT32, None)
        assert gf.metadata_types["tiny.big"] == (VT.UINT64, None)
        assert gf.metadata_types["tiny.rope.freq_base"] == (VT.FLOAT32, None)
        assert gf.metadata_types["tiny.signed_list"] == (VT.ARRAY, VT.INT32)
        assert gf.metadata_types["tokenizer.ggml.tokens"] == (VT.ARRAY, VT.STRING)
        assert set(gf.metadata) == {"general.architecture", *METADATA, *EXPLICIT}


def test_roundtrip_tensors(tiny):
    path, raws = tiny
    with GGUFFile(path) as gf:
        assert list(gf.tensors) == [name for name, _, _ in TENSORS]
        for name, q, shape in TENSORS:
            t = gf.tensors[name]
            assert (t.name, t.qtype, t.shape) == (name, q, shape)
            assert t.n_elements == int(np.prod(shape)) and t.nbytes == raws[name].nbytes
            assert t.data.dtype == np.uint8 and t.data.ndim == 1 and not t.data.flags.writeable
            np.testing.assert_array_equal(t.data, raws[name])
            assert t.offset % 32 == 0
            with open(path, "rb") as f:  # offset is the absolute position of the bytes
                f.seek(t.offset)
                assert f.read(t.nbytes) == raws[name].tobytes()


def test_gguf_py_reads_our_files(tiny):
    path, raws = tiny
    r = gguf.GGUFReader(path)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    with GGUFFile(path) as gf:
        assert set(fields) == set(gf.metadata)
        for k, f in fields.items():
            assert f.contents() == plain(gf.metadata[k]), k
            assert f.types[0] == gf.metadata_types[k][0]
    assert [t.name for t in r.tensors] == [name for name, _, _ in TENSORS]
    for t, (name, q, shape) in zip(r.tensors, TENSORS):
        assert t.tensor_type.name == q
        assert tuple(int(d) for d in reversed(t.shape)) == shape
        assert np.asarray(t.data).tobytes() == raws[name].tobytes()


def test_copy_metadata_keeps_types(tiny, tmp_path):
    path, raws = tiny
    with GGUFFile(path) as src:
        with GGUFOutput(tmp_path / "copy.gguf", src.arch) as out:
            copy_metadata(src, out, skip={"general.name"})
        with GGUFFile(tmp_path / "copy.gguf") as dst:
            expected = {k: plain(v) for k, v in src.metadata.items() if k != "general.name"}
            assert {k: plain(v) for k, v in dst.metadata.items()} == expected
            assert dst.metadata_types == {k: src.metadata_types[k] for k in expected}
            assert dst.tensors == {}


def test_write_gguf_and_alignment(tmp_path):
    raw = np.arange(64 * 4, dtype=np.uint8)
    path = tmp_path / "a.gguf"
    write_gguf(path, "tiny", {"general.alignment": 64, "x": 1},
               [("a", "F32", (64,), raw), ("b", "F32", (64,), raw)], metadata_types={"x": (VT.INT16, None)})
    with GGUFFile(path) as gf:
        assert gf.alignment == 64 and gf.metadata["general.alignment"] == 64
        assert gf.metadata_types["x"] == (VT.INT16, None)
        assert all(t.offset % 64 == 0 for t in gf.tensors.values())
        np.testing.assert_array_equal(gf.tensors["b"].data, raw)


def test_infer_type():
    assert infer_type("k", 3) == (VT.UINT32, None)
    assert infer_type("k", -3) == (VT.INT32, None)
    assert infer_type("k", 2**33) == (VT.UINT64, None)
    assert infer_type("k", -2**33) == (VT.INT64, None)
    assert infer_type("k", True) == (VT.BOOL, None)
    assert infer_type("k", 1.5) == (VT.FLOAT32, None)
    assert infer_type("k", np.float32(1.5)) == (VT.FLOAT32, None)
    assert infer_type("k", "s") == (VT.STRING, None)
    assert infer_type("k", [1, 2.5]) == (VT.ARRAY, VT.FLOAT32)
    assert infer_type("k", np.arange(3)) == (VT.ARRAY, VT.UINT32)
    for bad in ([], [[1]], ["a", 1], {"a": 1}, 2**64):
        with pytest.raises(ValueError):
            infer_type("k", bad)


# --------------------------------------------------------------------------- writer failures

def test_writer_exception_leaves_nothing(tmp_path):
    dest = tmp_path / "out.gguf"
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with GGUFOutput(dest, "tiny") as out:
                out.add_metadata("general.name", "x")
                out.add_tensor_info("a", "F32", (64,))
                out.add_tensor_info("b", "F32", (64,))
                out.write_tensor("a", np.zeros(64, np.float32))
                raise exc("stop")
        assert os.listdir(tmp_path) == []


def test_outputs_get_the_umask_permissions_not_mkstemps_private_ones(tmp_path):
    # a converted model or a saved imatrix is a file like any other: 0600 from mkstemp would surprise a user
    umask = os.umask(0o022)
    try:
        with GGUFOutput(tmp_path / "out.gguf", "tiny") as out:
            out.add_tensor_info("a", "F32", (64,))
            out.write_tensor("a", np.zeros(64, np.float32))
        with atomic_output(tmp_path / "other.bin") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x")
    finally:
        os.umask(umask)
    for name in ("out.gguf", "other.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert sorted(os.listdir(tmp_path)) == ["other.bin", "out.gguf"]


def test_atomic_output_leaves_nothing_when_interrupted(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with atomic_output(dest) as tmp:
                with open(tmp, "wb") as f:
                    f.write(b"half")
                raise exc("stop")
    assert os.listdir(tmp_path) == ["out.bin"] and dest.read_bytes() == b"old"


def test_writer_failure_keeps_existing_destination(tmp_path):
    dest = tmp_path / "out.gguf"
    dest.write_bytes(b"old")
    with pytest.raises(ValueError, match="never written"):
        with GGUFOutput(dest, "tiny") as out:
            out.add_tensor_info("a", "F32", (64,))
            out.add_tensor_info("b", "F32", (64,))
            out.write_tensor("a", np.zeros(64, np.float32))
    assert os.listdir(tmp_path) == ["out.gguf"] and dest.read_bytes() == b"old"


def test_writer_checks(tmp_path):
    with GGUFOutput(tmp_path / "x.gguf", "tiny") as out:
        with pytest.raises(ValueError, match="block size"):
            out.add_tensor_info("q", "Q4_K", (2, 100))
        with pytest.raises(ValueError, match="unknown tensor type"):
            out.add_tensor_info("q", "Q9_X", (2, 256))
        with pytest.raises(ValueError, match="architecture"):
            out.add_metadata("general.architecture", "other")
        out.add_tensor_info("a", "Q8_0", (2, 32))
        out.add_tensor_info("b", "F16", (32,))
        with pytest.raises(ValueError, match="order"):
            out.write_tensor("b", np.zeros(32, np.float16))
        with pytest.raises(ValueError, match="bytes"):
            out.write_tensor("a", np.zeros(10, np.uint8))
        out.write_tensor("a", np.zeros(68, np.uint8))
        with pytest.raises(RuntimeError):
            out.add_metadata("late", 1)
        out.write_tensor("b", np.zeros(32, np.float16))
    assert os.listdir(tmp_path) == ["x.gguf"]


# --------------------------------------------------------------------------- the real models

@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2_path", "gemma3_path"])
def test_real_files_match_gguf_py(which, request):
    path = request.getfixturevalue(which)
    t0 = time.perf_counter()
    with GGUFFile(path) as gf:
        assert gf.metadata  # forces nothing lazy: metadata is parsed on open
        open_s = time.perf_counter() - t0
        assert open_s < 2.0, f"opening took {open_s:.2f} s"
        r = gguf.GGUFReader(path)
        fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
        assert set(fields) == set(gf.metadata)
        for k, f in fields.items():
            assert f.contents() == plain(gf.metadata[k]), k
            assert (f.types[0], f.types[1] if f.types[0] == VT.ARRAY else None) == gf.metadata_types[k], k
        assert [t.name for t in r.tensors] == list(gf.tensors)
        for t in r.tensors:
            mine = gf.tensors[t.name]
            assert mine.qtype == t.tensor_type.name
            assert mine.shape == tuple(int(d) for d in reversed(t.shape))
            assert (mine.offset, mine.nbytes, mine.n_elements) == (t.data_offset, t.n_bytes, t.n_elements)
            assert not mine.data.flags.owndata and not mine.data.flags.writeable  # a view of the mapping
        emb = gf.tensors["token_embd.weight"]
        assert np.asarray(r.get_tensor(0).data).tobytes()[:64] == gf.tensors[r.tensors[0].name].data[:64].tobytes()
        assert emb.shape[0] == len(gf.metadata["tokenizer.ggml.tokens"])


@pytest.mark.slow
def test_real_file_roundtrip(smollm2_path, tmp_path):
    dest = tmp_path / "copy.gguf"
    with GGUFFile(smollm2_path) as src:
        with GGUFOutput(dest, src.arch) as out:
            copy_metadata(src, out)
            for t in src.tensors.values():
                out.add_tensor_info(t.name, t.qtype, t.shape)
            for t in src.tensors.values():
                out.write_tensor(t.name, t.data)
        with GGUFFile(dest) as dst:
            assert {k: plain(v) for k, v in dst.metadata.items()} == {k: plain(v) for k, v in src.metadata.items()}
            assert dst.metadata_types == src.metadata_types
            for name, t in src.tensors.items():
                u = dst.tensors[name]
                assert (u.qtype, u.shape) == (t.qtype, t.shape)
                np.testing.assert_array_equal(u.data, t.data)


# --------------------------------------------------------------------------- malformed files

def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def ti(name, ne, type_id=0, offset=0) -> bytes:
    return s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + \
        struct.pack("<IQ", type_id, offset)


def gguf_bytes(kvs=(), tensors=(), data=b"", version=3, n_tensors=None, n_kv=None, magic=b"GGUF", align=32):
    kvs = [kv("general.architecture", VT.STRING, s("tiny")), *kvs]
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % align) + data


F32_64 = [ti("w", [64], 0, 0)]


def open_bytes(tmp_path, data: bytes, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return GGUFFile(p)


def test_builder_makes_valid_files(tmp_path):
    with open_bytes(tmp_path, gguf_bytes(tensors=F32_64, data=bytes(256))) as gf:
        assert gf.tensors["w"].shape == (64,)


BAD = {
    "empty": b"",
    "bad magic": b"GGML" + bytes(100),
    "text": b"this is not a model at all" * 100,
    "version 1": gguf_bytes(version=1),
    "version 4": gguf_bytes(version=4),
    "big-endian": gguf_bytes(version=3 << 24),
    "only magic": b"GGUF",
    "huge tensor count": gguf_bytes(n_tensors=2**63),
    "huge kv count": gguf_bytes(n_kv=2**64 - 1),
    "kv count too big": gguf_bytes(n_kv=5),
    "absurd key length": b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**62) + b"x" * 64,
    "absurd string value": gguf_bytes([kv("k", VT.STRING, struct.pack("<Q", 2**63) + b"abc")]),
    "absurd string array": gguf_bytes([kv("k", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2**60))]),
    "absurd int array": gguf_bytes([kv("k", VT.ARRAY, struct.pack("<IQ", VT.UINT64, 2**61))]),
    "string array item too long": gguf_bytes([kv("k", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2) + s("a") +
                                                 struct.pack("<Q", 10**9))]),
    "unknown value type": gguf_bytes([kv("k", 13, b"\0" * 8)]),
    "unknown array item type": gguf_bytes([kv("k", VT.ARRAY, struct.pack("<IQ", 99, 1) + b"\0" * 8)]),
    "nested array": gguf_bytes([kv("k", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1) + struct.pack("<IQ", 4, 0))]),
    "duplicate key": gguf_bytes([kv("k", VT.UINT8, b"\1"), kv("k", VT.UINT8, b"\2")]),
    "alignment not power of 2": gguf_bytes([kv("general.alignment", VT.UINT32, struct.pack("<I", 48))]),
    "alignment zero": gguf_bytes([kv("general.alignment", VT.UINT32, struct.pack("<I", 0))]),
    "alignment a string": gguf_bytes([kv("general.alignment", VT.STRING, s("32"))]),
    "unknown ggml type": gguf_bytes(tensors=[ti("w", [64], 4, 0)], data=bytes(256)),
    "huge ggml type": gguf_bytes(tensors=[ti("w", [64], 2**32 - 1, 0)], data=bytes(256)),
    "n_dims 0": gguf_bytes(tensors=[ti("w", [], 0, 0)], data=bytes(256)),
    "n_dims 5": gguf_bytes(tensors=[ti("w", [1, 1, 1, 1, 64], 0, 0)], data=bytes(256)),
    "zero dim": gguf_bytes(tensors=[ti("w", [64, 0], 0, 0)], data=bytes(256)),
    "row not a multiple of the block": gguf_bytes(tensors=[ti("w", [48, 2], 12, 0)], data=bytes(4096)),
    "huge dims": gguf_bytes(tensors=[ti("w", [2**63, 2**63, 2**63, 2**63], 0, 0)], data=bytes(256)),
    "data past end": gguf_bytes(tensors=[ti("w", [128], 0, 0)], data=bytes(256)),
    "offset past end": gguf_bytes(tensors=[ti("w", [64], 0, 2**40)], data=bytes(256)),
    "offset near 2**64": gguf_bytes(tensors=[ti("w", [64], 0, 2**64 - 32)], data=bytes(256)),
    "misaligned offset": gguf_bytes(tensors=[ti("w", [8], 0, 4)], data=bytes(256)),
    "overlap": gguf_bytes(tensors=[ti("a", [64], 0, 0), ti("b", [64], 0, 128)], data=bytes(512)),
    "duplicate tensor": gguf_bytes(tensors=[ti("a", [8], 0, 0), ti("a", [8], 0, 32)], data=bytes(64)),
    "no tensor data at all": gguf_bytes(tensors=F32_64),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed(case, tmp_path):
    with pytest.raises(FormatError) as e:
        open_bytes(tmp_path, BAD[case], "bad file.gguf")
    msg = str(e.value)
    assert "bad file.gguf" in msg and "\n" not in msg


def test_long_keys_and_names(tmp_path):
    # a 70,000-byte key is over the GGUF limit (65,535): one flipped length byte once made a 67 MB key
    with pytest.raises(FormatError, match="over the limit"):
        open_bytes(tmp_path, gguf_bytes([kv("k" * 70_000, VT.UINT8, b"\1")]))
    # a long key or tensor name that is an error's subject is cut in the message
    for data in (gguf_bytes([kv("k" * 60_000, VT.UINT8, b"\1"), kv("k" * 60_000, VT.UINT8, b"\1")]),
                 gguf_bytes(tensors=[ti("t" * 1000, [64], 4, 0)], data=bytes(256))):
        with pytest.raises(FormatError) as e:
            open_bytes(tmp_path, data)
        assert len(str(e.value)) < 300, len(str(e.value))
    with pytest.raises(FormatError, match="over the limit"):
        open_bytes(tmp_path, gguf_bytes(tensors=[ti("t" * 5000, [64], 0, 0)], data=bytes(256)))


def test_numeric_arrays_are_views_not_lists(tmp_path):
    # a BOOL array as a Python list took 8x its bytes (600 MB -> 6.3 GB for `inspect`); now a view of the file
    n = 20_000_000
    data = gguf_bytes([kv("bools", VT.ARRAY, struct.pack("<IQ", VT.BOOL, n) + b"\1" * n),
                       kv("ints", VT.ARRAY, struct.pack("<IQ", VT.INT32, 4) + struct.pack("<4i", 1, -2, 3, 4))])
    path = tmp_path / "big.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with GGUFFile(path) as gf:
            bools, ints = gf.metadata["bools"], gf.metadata["ints"]
            assert isinstance(bools, np.ndarray) and bools.dtype == np.bool_ and len(bools) == n and bools.all()
            assert ints.tolist() == [1, -2, 3, 4] and not ints.flags.writeable
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, f"peak allocation {peak / 2**20:.0f} MiB"


STRING_ARRAYS = {
    "ascii": [b"a", b"", b"hello", b"<0x0A>", b""],
    "utf-8": ["▁the".encode(), "日本".encode(), b"", "é".encode(), "🙂".encode(), b"x"],
    "invalid byte": [b"ok", b"\xff", "é".encode()],
    # one character's bytes split over two strings: their concatenation decodes, each string alone does not
    "split character": [b"a\xc3", b"\xa9b", "ü".encode()],
    "starts mid-character": ["é".encode(), b"\xa9", b"z"],
    "surrogate": [b"\xed\xa0\x80", b"q"],
    "truncated at the end": [b"abc", "日".encode()[:2]],
    "empty strings only": [b"", b"", b""],
}


@pytest.mark.parametrize("case", list(STRING_ARRAYS))
def test_string_arrays_decode_item_by_item(case, tmp_path):
    # each string comes out as its own bytes decoded alone, invalid bytes replaced (U+FFFD), whatever its
    # neighbours hold; gguf-py reads the same bytes
    items = STRING_ARRAYS[case]
    arr = struct.pack("<IQ", VT.STRING, len(items)) + b"".join(s(b) for b in items)
    data = gguf_bytes([kv("k", VT.ARRAY, arr), kv("after", VT.UINT8, b"\7")])
    with open_bytes(tmp_path, data) as gf:
        assert gf.metadata["k"] == [b.decode("utf-8", "replace") for b in items]
        assert gf.metadata["after"] == 7
    r = gguf.GGUFReader(tmp_path / "bad.gguf")
    f = r.fields["k"]
    assert [bytes(f.parts[i]) for i in f.data] == items


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "nope.gguf")


def test_arch_missing_is_format_error(tmp_path):
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)
    with open_bytes(tmp_path, data) as gf:
        assert gf.metadata == {} and gf.tensors == {}
        with pytest.raises(FormatError, match="general.architecture"):
            gf.arch


@pytest.mark.slow
def test_truncated_real_header(smollm2_path, tmp_path):
    with GGUFFile(smollm2_path) as gf:
        end = gf.data_offset + gf.tensors["token_embd.weight"].nbytes // 2
    with open(smollm2_path, "rb") as f:
        head = f.read(end)
    cuts = sorted({int(c) for c in np.linspace(0, end - 1, 50)} | {3, 4, 7, 8, 23, 24, 25})
    p = tmp_path / "cut.gguf"
    for cut in cuts:
        p.write_bytes(head[:cut])
        t0 = time.perf_counter()
        with pytest.raises(FormatError):
            GGUFFile(p)
        assert time.perf_counter() - t0 < 1.0, cut


# Hypothesis: byte mutations of a small real-ish file open fine or raise FormatError — nothing else, quickly,
# without big allocations.
@pytest.fixture(scope="module")
def small_blob(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "small.gguf"
    write_tiny(path)
    return path.read_bytes()


def check_opens_or_format_error(path):
    tracemalloc.start()
    try:
        with GGUFFile(path) as gf:
            for t in gf.tensors.values():
                assert t.data.nbytes == t.nbytes and t.offset + t.nbytes <= os.path.getsize(path)
    except FormatError as e:
        assert "\n" not in str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak allocation {peak / 2**20:.0f} MiB"


EXTREMES = [0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 0x7FFFFFFF, 13, 5]


@settings(max_examples=300, deadline=2000)
@given(data=st.data())
def test_fuzz_mutations(data, small_blob, tmp_path_factory):
    blob = bytearray(small_blob)
    header_end = blob.find(b"\0" * 32, 24)  # mutations mostly land in the header, where the parsing is
    header_end = len(blob) if header_end < 0 else header_end + 32
    for _ in range(data.draw(st.integers(1, 4), label="n_mutations")):
        pos = data.draw(st.integers(0, header_end - 1), label="pos")
        kind = data.draw(st.sampled_from(["byte", "u32", "u64"]), label="kind")
        if kind == "byte":
            blob[pos] = data.draw(st.integers(0, 255), label="byte")
        else:
            n = 4 if kind == "u32" else 8
            v = data.draw(st.sampled_from(EXTREMES) | st.integers(0, 2 ** (8 * n) - 1), label="value") % 2 ** (8 * n)
            blob[pos:pos + n] = v.to_bytes(n, "little")
    if data.draw(st.booleans(), label="truncate"):
        del blob[data.draw(st.integers(0, len(blob)), label="cut"):]
    path = tmp_path_factory.getbasetemp() / "mutated.gguf"
    path.write_bytes(bytes(blob))
    check_opens_or_format_error(path)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssFile from /proc")
def test_release_pages_drops_read_pages_from_rss(tmp_path):
    """A pass over every tensor (calibration, quantize) keeps in its RSS only the pages it is using."""
    def rss_file_kb() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))

    path = tmp_path / "big.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_tensor("t", np.arange(16 << 20 >> 2, dtype=np.float32).reshape(-1, 1024))   # 16 MB
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    with GGUFFile(path) as gf:
        data = gf.tensors["t"].data
        before = rss_file_kb()
        assert float(np.asarray(data, dtype=np.uint8)[::4096].sum()) >= 0   # touch every page
        touched = rss_file_kb()
        gf.release_pages()
        after = rss_file_kb()
        assert touched - before > 12 << 10 and touched - after > 12 << 10
        assert np.asarray(data).view(np.float32)[-1] == (16 << 20 >> 2) - 1   # still readable


# --------------------------------------------------------------------------- weights read into memory

def test_read_into_memory_gives_the_same_read_only_bytes_off_the_mapping(tiny):
    path, raws = tiny
    with GGUFFile(path) as gf:
        mapped = {name: t.data for name, t in gf.tensors.items()}
        assert not gf.in_memory
        gf.read_into_memory()
        assert gf.in_memory
        for name, t in gf.tensors.items():
            assert t.data.dtype == np.uint8 and not t.data.flags.writeable and t.nbytes == raws[name].nbytes
            np.testing.assert_array_equal(t.data, raws[name])
            # its own memory, not a view of the file mapping
            assert not np.shares_memory(t.data, mapped[name])
        assert gf.tensors[TENSORS[0][0]].offset == GGUFFile(path).tensors[TENSORS[0][0]].offset
        gf.read_into_memory()  # a second call changes nothing
        np.testing.assert_array_equal(gf.tensors[TENSORS[-1][0]].data, raws[TENSORS[-1][0]])
        assert gf.metadata["general.architecture"] == "tiny"
    assert gf.tensors == {} and not gf.in_memory


def test_read_into_memory_of_a_file_that_shrank_is_one_clear_error(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny(path)
    gf = GGUFFile(path)
    try:
        with open(path, "r+b") as f:
            f.truncate(gf.data_offset + 8)
        with pytest.raises(FormatError, match="shrank"):
            gf.read_into_memory()
        assert not gf.in_memory
    finally:
        gf.close()


def test_a_background_read_moves_the_views_only_when_finished(tiny):
    path, raws = tiny
    with GGUFFile(path) as gf:
        first = TENSORS[0][0]
        before = gf.tensors[first].data
        gf.read_into_memory(background=True)
        gf.read_into_memory(background=True)  # one read at a time: a second call changes nothing
        assert gf.tensors[first].data is before  # still the mapping's view (the same bytes) until finish_read
        gf.finish_read()
        assert gf.in_memory and not np.shares_memory(gf.tensors[first].data, before)
        for name, t in gf.tensors.items():
            np.testing.assert_array_equal(t.data, raws[name])
        gf.finish_read()  # nothing left to do


def test_closing_during_a_background_read_stops_it(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny(path)
    gf = GGUFFile(path)
    gf.read_into_memory(background=True)
    threads = gf._reader[0]
    gf.close()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads) and not gf.in_memory and gf.tensors == {}
    gf.finish_read()  # after close: nothing to wait for


@pytest.mark.parametrize("background", [False, True])
def test_read_into_memory_in_several_spans_and_chunks(tiny, monkeypatch, background):
    from edgeq.formats import gguf_file

    path, raws = tiny
    monkeypatch.setattr(gguf_file, "_READ_CHUNK", 96)   # many reads per span
    monkeypatch.setattr(gguf_file, "_HUGE_PAGE", 64)    # span bounds at 64-byte steps, not 2 MiB
    monkeypatch.setattr(gguf_file.os, "cpu_count", lambda: 4)
    with GGUFFile(path) as gf:
        gf.read_into_memory(background=background)
        if background:
            assert len(gf._reader[0]) == 4  # one thread per span
        gf.finish_read()
        for name, t in gf.tensors.items():
            np.testing.assert_array_equal(t.data, raws[name])

"""Weights read into huge-page memory (GGUFFile.read_into_memory) against the file mapping: the same model, the same
logits, and the automatic choice (engine.read_weights)."""
from __future__ import annotations

import numpy as np
import pytest

import edgeq
from edgeq.runtime import engine


def test_a_model_read_into_memory_computes_what_the_mapped_one_does(smollm2_path):
    mapped = edgeq.load(str(smollm2_path), n_ctx=128, threads=2, mmap=True)
    read = edgeq.load(str(smollm2_path), n_ctx=128, threads=2, mmap=False)
    assert not mapped.gguf.in_memory and read.gguf.in_memory
    ids = mapped.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    np.testing.assert_array_equal(mapped.append(ids), read.append(ids))   # prompt kernels
    np.testing.assert_array_equal(mapped.append([ids[1]]), read.append([ids[1]]))  # decode kernels
    w = read.gguf.tensors["blk.0.ffn_up.weight"]
    file_bytes = np.frombuffer(read.gguf._mm, np.uint8)
    assert not np.shares_memory(w.data, file_bytes)
    # what the kernels run on: the model's matrices, bound after the read (none left on the mapping)
    for L in read.weights.layers:
        for lin in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down):
            assert not np.shares_memory(lin.q.raw, file_bytes)
    assert np.shares_memory(mapped.weights.layers[0].w_up.q.raw, np.frombuffer(mapped.gguf._mm, np.uint8))


class _File:
    def __init__(self, data_bytes):
        self.data_offset, self.file_size = 4096, 4096 + data_bytes


def test_the_automatic_choice(monkeypatch):
    big = _File(engine.READ_MIN_BYTES)
    monkeypatch.setattr(engine, "_huge_pages_on", lambda: True)
    monkeypatch.setattr(engine, "_meminfo_available", lambda: 2 * engine.READ_MIN_BYTES)
    assert engine.read_weights(big, None)
    assert not engine.read_weights(big, True) and engine.read_weights(_File(1), False)  # asked for: as asked
    assert not engine.read_weights(_File(engine.READ_MIN_BYTES - 1), None)  # small files stay mapped
    monkeypatch.setattr(engine, "_meminfo_available", lambda: 2 * engine.READ_MIN_BYTES - 1)
    assert not engine.read_weights(big, None)  # not enough memory for the copy beside the page cache
    monkeypatch.setattr(engine, "_meminfo_available", lambda: None)
    assert not engine.read_weights(big, None)  # no /proc/meminfo: no guess
    monkeypatch.setattr(engine, "_meminfo_available", lambda: 1 << 40)
    monkeypatch.setattr(engine, "_huge_pages_on", lambda: False)
    assert not engine.read_weights(big, None)  # no huge pages: nothing gained


@pytest.mark.parametrize("flag, in_memory", [("--no-mmap", True), ("--mmap", False)])
def test_the_cli_flag_reaches_the_loader(flag, in_memory, smollm2_path, monkeypatch, capsys):
    from edgeq.cli import main

    seen = {}
    real = engine.Model.__init__

    def spy(self, *args, **kw):
        real(self, *args, **kw)
        seen["in_memory"] = self.gguf.in_memory

    monkeypatch.setattr(engine.Model, "__init__", spy)
    assert main(["run", str(smollm2_path), "-p", "Hi", "-n", "2", "--temp", "0", flag]) == 0
    assert seen["in_memory"] is in_memory


def test_proc_fields_of_odd_or_missing_files(tmp_path, monkeypatch):
    from edgeq.cpu_kernels import host

    f = tmp_path / "cpuinfo"
    f.write_bytes(b"no colon here\nvendor_idx : not this\n\xff\xfe: junk\nvendor_id\t: GenuineIntel\nvendor_id : second\n")
    assert host.proc_field(str(f), "vendor_id") == "GenuineIntel"  # the first exact key, not a prefix of another
    assert host.proc_field(str(f), "model name") is None
    assert host.proc_field(str(tmp_path / "missing"), "vendor_id") is None
    assert host.proc_field(str(tmp_path), "vendor_id") is None  # a folder: no value, no error
    m = tmp_path / "meminfo"
    real = host.proc_field
    for text, want in (("MemAvailable:   2048 kB\n", 2048 * 1024), ("MemAvailable: lots\n", None),
                       ("MemAvailable:\n", None), ("MemTotal: 1 kB\n", None)):
        m.write_text(text)
        monkeypatch.setattr(host, "proc_field", lambda path, key, m=m: real(str(m), key))
        assert engine._meminfo_available() == want, text


def test_huge_pages_setting_of_odd_or_missing_files(tmp_path):
    f = tmp_path / "enabled"
    for text, want in (("always [madvise] never\n", True), ("[always] madvise never\n", True),
                       ("always madvise [never]\n", False), ("\xff garbage\n", True)):
        f.write_bytes(text.encode("latin-1"))
        assert engine._huge_pages_on(str(f)) is want, text
    assert engine._huge_pages_on(str(tmp_path / "missing")) is False
    assert engine._huge_pages_on(str(tmp_path)) is False  # a folder: an OSError, read as off


_PEAK_SCRIPT = """
import sys
import edgeq
from numba.core import registry
registry.cpu_target.target_context.refresh()  # Numba's own memory, before the load
m = edgeq.load(sys.argv[1], n_ctx=128, threads=2, mmap=False, warm_up=False)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(m.gguf.in_memory, int(status["VmHWM"].split()[0]), int(status["VmRSS"].split()[0]))
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_the_tokenizer_build_does_not_stack_on_the_weights_being_read(smollm2_path):
    """A load that reads the weights into memory peaks no higher than where it ends: the tokenizer's build (its
    scratch freed and handed back) comes before the read, not beside it (SmolLM2: 12 MiB above the end before,
    Qwen2.5-0.5B: 58)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(smollm2_path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    in_memory, hwm_kib, rss_kib = out.stdout.split()
    assert in_memory == "True"
    assert int(hwm_kib) - int(rss_kib) <= 4 * 1024, f"peak {hwm_kib} KiB, end {rss_kib} KiB"

"""Hostile inputs and outputs (issue #16, items 6-7): unbounded texts and prompts, FIFOs, devices and folders
where a file is expected, and outputs that would replace a device or an existing file. Each ends in one line
on stderr, reads only what the job needs, and touches nothing it was not asked to."""
from __future__ import annotations

import io
import os
import signal
import stat
from pathlib import Path

import numpy as np
import pytest

from edgeq.cli import main as cli
from edgeq.errors import EdgeqError


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) when a call blocks, e.g. opening a FIFO nobody writes to."""
    def expire(signum, frame):
        raise TimeoutError("blocked: a call hung")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def memory_cap():
    """Address space capped at what the process has now + 1 GiB: code that reads /dev/zero whole gets a
    MemoryError here instead of taking the machine's memory."""
    import resource

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def one_line_error(capsys, rc) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------ fakes: a byte-level model, no Numba
class ByteTokenizer:
    """One token per UTF-8 byte; counts what it was asked to encode."""

    vocab_size = 256
    max_token_bytes = 1
    bos_id, eos_id = 1, 2
    add_bos, add_eos = True, False

    def __init__(self):
        self.encoded_chars = 0

    def encode(self, text, add_special=True, parse_special=True):
        self.encoded_chars += len(text)
        return ([self.bos_id] if add_special and self.add_bos else []) + list(text.encode("utf-8"))

    def token_bytes(self, i):
        return bytes([i])


class FakeModel:
    device = "cpu"
    path = Path("fake.gguf")

    def __init__(self, n_ctx=64):
        self.n_ctx = n_ctx
        self.tokenizer = ByteTokenizer()
        self.generated: list[str] = []

    def logits(self, ids):
        return np.zeros((len(list(ids)), 256), np.float32)

    def generate(self, prompt, **kw):
        self.generated.append(prompt)
        return iter(["!"])


@pytest.fixture
def fake_model(monkeypatch):
    import edgeq.cli.run
    import edgeq.runtime.engine

    model = FakeModel()
    monkeypatch.setattr(edgeq.runtime.engine, "load", lambda *a, **k: model)
    monkeypatch.setattr(edgeq.cli.run, "load_model", lambda a: model)
    return model


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


# ------------------------------------------------------------ item 6: read only what the job needs
def test_perplexity_tokenizes_only_what_chunks_need(tmp_path, fake_model, capsys):
    big = tmp_path / "big.txt"
    line = "All the world's a stage, and all the men and women merely players.\n"
    big.write_text(line * (12_000_000 // len(line)))
    rc = cli(["perplexity", "m", "-f", str(big), "--ctx", "64", "--chunks", "2", "--json", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert '"tokens": 62' in capsys.readouterr().out  # 2 windows × (64/2 - 1) scored tokens
    assert fake_model.tokenizer.encoded_chars <= 2 * (1 << 20)  # one or two pieces, not the 12 MB


def test_text_pieces_give_the_tokens_of_the_whole_text(smollm2_path, hamlet_path, tmp_path, monkeypatch):
    """Tokenizing a file in small pieces (cut at line/word boundaries) gives exactly the whole text's tokens."""
    import edgeq.file_checks
    from edgeq.formats.gguf_file import GGUFFile
    from edgeq.runtime.perplexity import file_tokens, text_tokens
    from edgeq.runtime.tokenizer import Tokenizer

    with GGUFFile(smollm2_path) as gf:
        model = type("M", (), {"tokenizer": Tokenizer.from_gguf(gf)})()
    text = Path(hamlet_path).read_text(encoding="utf-8")[:60_000]
    text += "one very long line without a break " * 300 + "\n\n  indented\n"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(edgeq.file_checks, "TEXT_PIECE_BYTES", 4096)
    assert len(list(edgeq.file_checks.text_pieces(path))) > 10
    assert file_tokens(model, path).tolist() == text_tokens(model, text)
    assert file_tokens(model, path, max_tokens=500).tolist()[:500] == text_tokens(model, text)[:500]


def test_text_pieces_refuse_invalid_utf8_across_pieces(tmp_path, monkeypatch):
    import edgeq.file_checks

    path = tmp_path / "t.txt"
    path.write_bytes(b"fine text\n" * 1000 + b"\xff\xfe broken")
    monkeypatch.setattr(edgeq.file_checks, "TEXT_PIECE_BYTES", 1000)
    with pytest.raises(EdgeqError, match="not UTF-8"):
        list(edgeq.file_checks.text_pieces(path))


class CountingStream(io.RawIOBase):
    """stdin that would give `size` bytes of 'a' and counts how many were read."""

    def __init__(self, size):
        self.left, self.read_bytes = size, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.left)
        b[:n] = b"a" * n
        self.left -= n
        self.read_bytes += n
        return n


def test_run_stdin_is_capped_before_tokenizing(fake_model, monkeypatch, capsys, memory_cap):
    stream = CountingStream(8_000_000)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BufferedReader(stream)))
    err = one_line_error(capsys, cli(["run", "m"]))
    assert "prompt on stdin is over" in err and "64-token context" in err
    limit = 64 * 1  # n_ctx × the longest token (one byte in the fake vocabulary)
    assert stream.read_bytes <= limit + 8192  # one buffered read, not the 8 MB
    assert fake_model.generated == [] and fake_model.tokenizer.encoded_chars == 0


def test_run_prompt_that_fits_still_runs(fake_model, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello")))
    assert cli(["run", "m"]) == 0
    p = tmp_path / "prompt.txt"
    p.write_text("from a file")
    assert cli(["run", "m", "-f", str(p)]) == 0
    assert fake_model.generated == ["hello", "from a file"]


def test_prompt_limit_reads_the_tokenizers_longest_token(fake_model, monkeypatch, tmp_path, capsys):
    """The cap is n_ctx × the tokenizer's max_token_bytes (known once), not a walk over the vocabulary."""
    monkeypatch.setattr(fake_model.tokenizer, "max_token_bytes", 3, raising=False)
    p = tmp_path / "prompt.txt"
    p.write_bytes(b"x" * 193)
    assert "over 192 bytes" in one_line_error(capsys, cli(["run", "m", "-f", str(p)]))


def test_run_file_too_long_or_not_utf8(fake_model, tmp_path, capsys):
    p = tmp_path / "prompt.txt"
    p.write_bytes(b"x" * 65)
    assert "over 64 bytes" in one_line_error(capsys, cli(["run", "m", "-f", str(p)]))
    p.write_bytes(b"\xff\xfe\x00")
    assert "not UTF-8" in one_line_error(capsys, cli(["run", "m", "-f", str(p)]))


def _not_regular(kind, tmp_path, fifo):
    return {"fifo": fifo, "dev_zero": Path("/dev/zero"), "directory": tmp_path}[kind]


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
@pytest.mark.parametrize("verb", ["inspect", "perplexity -f", "run -f", "quantize input", "--imatrix", "--kl-base"])
def test_not_a_regular_file_is_refused_at_once(verb, kind, tmp_path, fifo, capsys, no_hang, memory_cap):
    bad = str(_not_regular(kind, tmp_path, fifo))
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 10)
    argv = {
        "inspect": ["inspect", bad],
        "perplexity -f": ["perplexity", "missing-model", "-f", bad],
        "run -f": ["run", "missing-model", "-f", bad],
        "quantize input": ["quantize", bad, str(tmp_path / "o.gguf"), "--type", "F16"],
        "--imatrix": ["quantize", str(junk), str(tmp_path / "o.gguf"), "--type", "Q4_0", "--imatrix", bad],
        "--kl-base": ["perplexity", "missing-model", "-f", str(text), "--kl-base", bad],
    }[verb]
    err = one_line_error(capsys, cli(argv))
    assert bad in err and ("not a" in err or "directory" in err), err


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
def test_convert_refuses_a_checkpoint_file_that_is_not_regular(kind, tmp_path, capsys, no_hang, memory_cap):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (src / "tokenizer.json").write_text("{}")
    weights = src / "model.safetensors"
    {"fifo": lambda: os.mkfifo(weights), "dev_zero": lambda: weights.symlink_to("/dev/zero"),
     "directory": weights.mkdir}[kind]()
    err = one_line_error(capsys, cli(["convert", str(src), "-o", str(tmp_path / "o.gguf"), "--type", "F16", "-q"]))
    assert "model.safetensors" in err and ("not a" in err or "directory" in err), err


# ------------------------------------------------------------ item 7: outputs
def test_check_output_path(tmp_path, fifo):
    from edgeq.convert.writer import check_output_path

    new = tmp_path / "new.gguf"
    assert check_output_path(new) == new
    new.write_text("keep")
    with pytest.raises(EdgeqError, match="exists.*--force"):
        check_output_path(new)
    assert check_output_path(new, force=True) == new
    link = tmp_path / "link.gguf"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(EdgeqError, match="exists"):
        check_output_path(link)
    for target in (fifo, Path("/dev/null")):
        with pytest.raises(EdgeqError, match="refusing to replace"):
            check_output_path(target, force=True)
    with pytest.raises(EdgeqError, match="is a directory"):
        check_output_path(tmp_path, force=True)


@pytest.fixture
def tiny(tmp_path):
    from test_cli import tiny_gguf

    return tiny_gguf(tmp_path / "tiny.gguf")


def test_quantize_refuses_a_pipe_as_output(tiny, fifo, capsys):
    # a FIFO in tmp_path, not /dev/null: code without the check would replace the node it is given
    err = one_line_error(capsys, cli(["quantize", str(tiny), str(fifo), "--type", "F16", "-q", "-f"]))
    assert "refusing to replace" in err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_quantize_asks_for_force_before_overwriting(tiny, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    out.write_text("precious")
    err = one_line_error(capsys, cli(["quantize", str(tiny), str(out), "--type", "F16", "-q"]))
    assert "exists" in err and "--force" in err
    assert out.read_text() == "precious"
    assert cli(["quantize", str(tiny), str(out), "--type", "F16", "-q", "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_library_quant_options_force(tiny, tmp_path):
    from edgeq.convert import QuantOptions, quantize_file

    out = tmp_path / "out.gguf"
    out.write_text("precious")
    with pytest.raises(EdgeqError, match="exists"):
        quantize_file(tiny, out, "F16")
    assert out.read_text() == "precious"
    quantize_file(tiny, out, options=QuantOptions(qtype="F16", force=True))
    assert out.read_bytes()[:4] == b"GGUF"


def test_save_imatrix_and_save_logits_ask_for_force(tiny, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.write_text("precious")
    err = one_line_error(capsys, cli(["quantize", str(tiny), str(tmp_path / "o.gguf"), "--type", "Q4_0",
                                      "--imatrix", str(tiny), "--save-imatrix", str(existing)]))
    assert "exists" in err
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    err = one_line_error(capsys, cli(["perplexity", "missing-model", "-f", str(text), "--save-logits", str(existing)]))
    assert "exists" in err and "--force" in err
    assert existing.read_text() == "precious"


def test_save_logits_written_atomically_and_overwritten_with_force(fake_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Some text to score, long enough for a window or two.\n" * 10)
    saved = tmp_path / "ref.npz"
    saved.write_text("old")
    argv = ["perplexity", "m", "-f", str(text), "--ctx", "64", "--chunks", "2", "--device", "cpu",
            "--save-logits", str(saved)]
    assert cli(argv) == 1 and saved.read_text() == "old"
    assert cli(argv + ["--force"]) == 0
    assert cli(["perplexity", "m", "-f", str(text), "--ctx", "64", "--chunks", "2", "--device", "cpu",
                "--kl-base", str(saved)]) == 0
    assert "KL-divergence" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz", "t.txt"]  # no temp file left behind


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_model_that_is_not_a_regular_file_is_refused_at_once(kind, tmp_path, fifo, capsys, no_hang, memory_cap):
    bad = str(_not_regular(kind, tmp_path, fifo))
    err = one_line_error(capsys, cli(["run", bad, "-p", "hi", "-n", "1"]))
    assert bad in err and "not a GGUF file" in err, err


def test_calibration_reads_only_what_its_windows_need(tmp_path, fifo, no_hang, memory_cap):
    from edgeq.convert.calibrate import read_text

    big = tmp_path / "big.txt"
    big.write_bytes(b"to be or not to be\n" * 200_000)  # 3.8 MB
    text, label = read_text(str(big), max_bytes=10_000)
    assert label == "big.txt" and 9_000 < len(text) <= 10_000 and text.endswith("\n")
    assert len(read_text(str(big))[0]) == big.stat().st_size
    for bad in (fifo, "/dev/zero"):
        with pytest.raises(EdgeqError, match="not a text file"):
            read_text(str(bad), max_bytes=10_000)

"""Bad input through the real CLI: one clear line on stderr, non-zero exit, never a traceback."""
import os
import signal
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
from _signals import default_sigint  # noqa: E402



def edgeq(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgeq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(p, needle):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert needle in lines[0], lines[0]


def tiny_gguf(path, arch="llama", drop=None, bad_shape=None):
    """A tiny llama-shaped GGUF written with gguf-py (independent of edgeq's writer)."""
    w = gguf.GGUFWriter(str(path), arch)
    d, ff, nl, vocab = 32, 64, 1, 16
    for k, v in [("embedding_length", d), ("block_count", nl), ("feed_forward_length", ff),
                 ("attention.head_count", 4), ("attention.head_count_kv", 2), ("context_length", 128)]:
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,), "blk.0.attn_norm.weight": (d,),
              "blk.0.ffn_norm.weight": (d,), "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (d // 2, d),
              "blk.0.attn_v.weight": (d // 2, d), "blk.0.attn_output.weight": (d, d),
              "blk.0.ffn_gate.weight": (ff, d), "blk.0.ffn_up.weight": (ff, d), "blk.0.ffn_down.weight": (d, ff)}
    for name, shape in shapes.items():
        if name == drop:
            continue
        if name == bad_shape:
            shape = (shape[0] + 1,) + shape[1:]
        w.add_tensor(name, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_file(tmp_path):
    assert_one_line_error(edgeq("run", tmp_path / "nope.gguf", "-p", "hi"), "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "junk.gguf"
    f.write_bytes(b"this is not a model at all" * 100)
    assert_one_line_error(edgeq("run", f, "-p", "hi"), "junk.gguf")


def test_unknown_architecture(tmp_path):
    assert_one_line_error(edgeq("run", tiny_gguf(tmp_path / "m.gguf", arch="mamba9"), "-p", "hi"), "architecture")


def test_missing_tensor(tmp_path):
    f = tiny_gguf(tmp_path / "m.gguf", drop="blk.0.ffn_up.weight")
    assert_one_line_error(edgeq("run", f, "-p", "hi"), "blk.0.ffn_up.weight")


def test_misshapen_tensor(tmp_path):
    f = tiny_gguf(tmp_path / "m.gguf", bad_shape="blk.0.attn_q.weight")
    assert_one_line_error(edgeq("run", f, "-p", "hi"), "blk.0.attn_q.weight")


def test_unknown_verb():
    p = edgeq("frobnicate")
    assert p.returncode == 2 and "unknown command" in p.stderr


@pytest.mark.slow
def test_run_streams_and_verbose_reports_speeds(smollm2_path):
    p = edgeq("run", smollm2_path, "-p", "The capital of France is", "-n", "8", "--temp", "0", "--verbose")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("The capital of France is") and len(p.stdout) > 30
    assert "decode:" in p.stderr and "tokens/s" in p.stderr


@pytest.mark.slow
def test_ctrl_c_stops_generation_at_once(smollm2_path):
    prompt = b"Once upon a time"
    proc = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "run", str(smollm2_path), "-p", prompt.decode(),
                             "-n", "2000", "--ctx", "4096"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint)
    try:
        # however long loading (or a first run's kernel compile) takes: wait for generated text after the echo
        seen = b""
        while len(seen) <= len(prompt) + 8:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, proc.stderr.read().decode(errors="replace")
            seen += chunk
        assert seen.startswith(prompt)
        t = time.perf_counter()  # the behaviour under test starts here
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert time.perf_counter() - t < 3
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert b"Traceback" not in err


@pytest.mark.slow
def test_perplexity_json(smollm2_path, hamlet_path):
    import json

    p = edgeq("perplexity", smollm2_path, "-f", hamlet_path, "--ctx", "128", "--chunks", "2", "--json")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert 1 < rec["ppl"] < 100 and rec["tokens"] == 2 * 63


@pytest.mark.slow
def test_bench_json(smollm2_path, hamlet_path):
    import json

    p = edgeq("bench", smollm2_path, "-p", "32", "-n", "4", "-t", "1", "--ctx", "64", "--text", hamlet_path, "--json")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    for k in ("prefill_tps", "decode_tps", "load_s", "peak_rss_mb"):
        assert rec[k] > 0


# ---------------------------------------------------------------- hostile vocabulary
CONTROLS = {chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} - {"\n", "\t"}


def hostile_vocab_gguf(path):
    """A tiny llama whose every ordinary token is a terminal escape (window title, OSC 52 clipboard write,
    C1 CSI, SGR) or half of one, so whatever its random weights pick, the reply is escape sequences."""
    arch, d, ff, vocab = "llama", 64, 64, 16
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in [("embedding_length", d), ("block_count", 1), ("feed_forward_length", ff),
                 ("attention.head_count", 2), ("attention.head_count_kv", 1), ("context_length", 128)]:
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    tokens = ["<unk>", "<s>", "</s>", "\x1b]0;PWNED\x07", "\x1b", "]52;c;ZXZpbA==\x07", "\x9b2J"]
    tokens += [f"\x1b[{i}m" for i in range(vocab - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,), "blk.0.attn_norm.weight": (d,),
              "blk.0.ffn_norm.weight": (d,), "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (d // 2, d),
              "blk.0.attn_v.weight": (d // 2, d), "blk.0.attn_output.weight": (d, d),
              "blk.0.ffn_gate.weight": (ff, d), "blk.0.ffn_up.weight": (ff, d), "blk.0.ffn_down.weight": (d, ff)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    out = rng.standard_normal((vocab, d)).astype(np.float32)
    out[:3] = 0  # <unk>, <s>, </s> score 0: below the best of the 13 random escape rows, so never picked
    w.add_tensor("output.weight", out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_run_escapes_a_hostile_vocabulary(tmp_path, capsys):
    from edgeq.cli import main

    f = hostile_vocab_gguf(tmp_path / "evil.gguf")
    args = ["run", str(f), "-p", "hi", "-n", "12", "--temp", "0", "--ctx", "64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "\\x1b" in out and not CONTROLS & set(out)
    assert main([*args, "--raw"]) == 0  # opted out, and stdout is no terminal here: the model's bytes as they are
    assert "\x1b" in capsys.readouterr().out


def test_ctrl_c_in_process_returns_130_while_a_host_thread_runs(monkeypatch):
    """main() called in-process (a test runner, an embedding program) with a thread of the host alive: Ctrl-C
    returns 130; only edgeq's own unstoppable threads (a kernel compile) make it leave at once."""
    import threading

    import edgeq.cli as cli_mod

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "_load", lambda verb: (lambda p: None, interrupted))
    stop = threading.Event()
    host = threading.Thread(target=stop.wait, name="host-thread", daemon=True)
    host.start()
    try:
        assert cli_mod.main(["inspect"]) == 130
    finally:
        stop.set()

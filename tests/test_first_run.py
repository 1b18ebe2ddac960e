"""The first run on a fresh machine: every kernel is ready before the first token, and Ctrl-C acts at once
even while kernels compile (an empty Numba cache: NUMBA_CACHE_DIR set to a fresh folder for the child)."""
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from edgeq.runtime.warmup import FIRST_RUN_MESSAGE
from _procs import COMPILE_LISTENER, processes_naming  # noqa: E402
from _signals import default_sigint  # noqa: E402

pytestmark = pytest.mark.slow

# Runs in a fresh process (nothing compiled or loaded yet): loads a model, takes a first token, then drives
# generation to the end of the context every way the engine can (prompt batches, a short prompt, single-token
# decode, a chat's next turn that rewinds the cache) and prints the kernel specializations that appeared after
# load() returned: the signatures of every Numba dispatcher in edgeq's modules, and every compile after load (which
# also sees the kernels made per cache layout or per weight type, which no module holds as an attribute).
# mode "passes": the scratch passes run whatever the stamp says (what they cover is under test); "stamp": a load
# as users get it, after one that left the ready stamp (the passes skipped): also counts real compiles after load.
PROBE = r"""
import json, os, sys
import edgeq
import edgeq.runtime.warmup as warmup
from numba.core.dispatcher import Dispatcher
""" + COMPILE_LISTENER + r"""


def signatures():
    out = set()
    for name, mod in list(sys.modules.items()):
        if name.startswith("edgeq.") and mod is not None:
            for attr, obj in list(vars(mod).items()):
                if isinstance(obj, Dispatcher):
                    out.update(f"{name}.{attr}{sig}" for sig in obj.signatures)
    return out

path, n_ctx, ctk, ctv, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None, sys.argv[4] or None, sys.argv[5]
if mode == "passes":
    warmup.ready_stamp = lambda model: None
m = edgeq.load(path, n_ctx=n_ctx, cache_type_k=ctk, cache_type_v=ctv, threads=2)
before = signatures()
stamped = mode == "stamp" and os.path.exists(warmup.ready_stamp(m))
event.register("numba:compile", Compiles())
first = "".join(m.generate("Hi", max_tokens=1, temperature=0))
words = " ".join(f"word{i}" for i in range(n_ctx))
ids = m.encode_prompt(words)[: n_ctx - 40]                  # several prompt batches
"".join(m._generate(ids, max_tokens=8, temperature=0.8, seed=1))
while len(m.tokens) < m.n_ctx:                              # single-token decode up to the context end
    m.append([m.tokens[-1]])
msgs = [{"role": "user", "content": "What is 2+2?"}]
reply = "".join(m.chat(msgs, max_tokens=4, temperature=0))
msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And 3+3?"}]
"".join(m.chat(msgs, max_tokens=4, temperature=0))         # the next turn: a rewind into the cache
"".join(m.generate("The sky", max_tokens=3, temperature=0))  # a short prompt
print(json.dumps({"first": first, "before": len(before), "new": sorted(signatures() - before), "stamped": stamped,
                  "compiles": compiles}))
"""


def probe(path, n_ctx, ctk="", ctv="", mode="passes"):
    p = subprocess.run([sys.executable, "-c", PROBE, str(path), str(n_ctx), ctk, ctv, mode], capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("ctk,ctv", [("", ""), ("q4", "q4"), ("f16", "f32")])
def test_no_kernel_compiles_after_load_smollm2(smollm2_path, ctk, ctv):
    r = probe(smollm2_path, 600, ctk, ctv)
    assert r["first"] and r["before"] > 0
    assert r["new"] == []
    assert r["compiles"] == []  # kernels not held as module attributes too (per-layout attention, per-type drivers)


def test_a_stamped_load_skips_the_passes_and_compiles_nothing(smollm2_path):
    """After one load has run the passes (and left the stamp), the next fresh process skips them: its kernels load
    from the disk cache at their first call, and nothing compiles however generation goes."""
    import edgeq

    edgeq.load(str(smollm2_path), n_ctx=600, threads=2)  # runs the passes here unless a stamp exists already
    r = probe(smollm2_path, 600, mode="stamp")
    assert r["first"] and r["stamped"]
    assert r["before"] == 0  # nothing loaded by load() itself: no scratch passes
    assert r["compiles"] == []


def test_no_kernel_compiles_after_load_gemma3(gemma3_path):
    # a context past the sliding window plus one batch: the local layers' KV cache is a ring that wraps
    r = probe(gemma3_path, 1100)
    assert r["first"] and r["before"] > 0
    assert r["new"] == []
    assert r["compiles"] == []  # kernels not held as module attributes too (per-layout attention, per-type drivers)


def _read_until(stream, needle: bytes, timeout: float) -> bytes:
    """Bytes from a pipe until `needle` appears (or EOF / timeout: the caller's assert says what came)."""
    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.5)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            data += chunk
    return data


def test_ctrl_c_while_kernels_compile_exits_at_once(smollm2_path, tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))  # an empty kernel cache: a first run
    proc = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "run", str(smollm2_path), "-p", "Once upon a time",
                             "-n", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=default_sigint)
    try:
        err = _read_until(proc.stderr, FIRST_RUN_MESSAGE.encode(), timeout=600)
        assert FIRST_RUN_MESSAGE.encode() in err, err.decode(errors="replace")
        time.sleep(0.5)  # well inside the compile (it takes far longer)
        assert proc.poll() is None
        t = time.monotonic()  # the behaviour under test starts here
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=30)
        elapsed = time.monotonic() - t
    finally:
        proc.kill()
    assert elapsed < 2, elapsed
    assert proc.returncode == 130
    assert b"Traceback" not in err + rest, (err + rest).decode(errors="replace")
    assert out == b""  # no token was generated
    # the compile worker stops with it (before the first answer it has no reason to outlive its parent)
    deadline = time.monotonic() + 5
    while processes_naming(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_naming(str(tmp_path))



def test_no_first_run_message_when_kernels_are_cached(smollm2_path):
    import edgeq
    from edgeq.runtime.warmup import warm_up

    model = edgeq.load(str(smollm2_path), n_ctx=64, threads=2)  # compiles (or loads) whatever is missing
    lines = []
    warm_up(model, report=lines.append)
    assert lines == []

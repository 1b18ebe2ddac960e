"""Loading hostile GGUF files safely: a tiny valid model to mutate, and a child process that loads files with
bounded memory and time and reports how each load ended.

The child runs the whole path a user's file takes: `edgeq.load(path)` (reader, hyperparameters, weights,
tokenizer, template), then a short encode and a chat render. Its address space is capped (RLIMIT_AS) and each
case has a time limit, so a hostile file shows up as a failed case, not as a machine out of memory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ARCH = "llama"
D, FF, N_LAYER, N_HEAD, N_HEAD_KV = 128, 128, 1, 4, 2  # head size 32: the quantized KV cache needs it



def _byte_chars() -> list[str]:
    from edgeq.runtime.tokenizer import BYTE_TO_CHAR

    return [BYTE_TO_CHAR[b] for b in range(256)]


def tiny_metadata() -> dict:
    """Metadata of a runnable tiny llama: (value, writer method name) per key, so tests can swap values/types."""
    tokens = _byte_chars() + ["he", "ll", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    return {
        f"{ARCH}.embedding_length": D,
        f"{ARCH}.block_count": N_LAYER,
        f"{ARCH}.feed_forward_length": FF,
        f"{ARCH}.attention.head_count": N_HEAD,
        f"{ARCH}.attention.head_count_kv": N_HEAD_KV,
        f"{ARCH}.context_length": 128,
        f"{ARCH}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{ARCH}.rope.freq_base": 10000.0,
        f"{ARCH}.rope.dimension_count": D // N_HEAD,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["h e", "l l"],
        "tokenizer.ggml.bos_token_id": len(tokens) - 2,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }


def tiny_shapes(n_vocab: int) -> dict:
    return {"token_embd.weight": (n_vocab, D), "output_norm.weight": (D,), "blk.0.attn_norm.weight": (D,),
            "blk.0.ffn_norm.weight": (D,), "blk.0.attn_q.weight": (D, D), "blk.0.attn_k.weight": (D // 2, D),
            "blk.0.attn_v.weight": (D // 2, D), "blk.0.attn_output.weight": (D, D),
            "blk.0.ffn_gate.weight": (FF, D), "blk.0.ffn_up.weight": (FF, D), "blk.0.ffn_down.weight": (D, FF)}


_U32_KEYS = {"embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "context_length", "rope.dimension_count"}


def write_tiny(path, set: dict | None = None, drop: tuple = (), shapes: dict | None = None, typed: dict | None = None):
    """The tiny model with metadata keys replaced (`set`), removed (`drop`) or written with an explicit GGUF type
    (`typed`: key -> (value, GGUFValueType, item type or None)); written with gguf-py (edgeq's subclass of its
    writer only adds empty arrays), independent of edgeq's reader."""
    from edgeq.formats.gguf_write import _Writer

    meta = tiny_metadata()
    meta.update(set or {})
    w = _Writer(str(path), ARCH)
    for k, v in meta.items():
        if k in drop or k in (typed or {}):
            continue
        if k.split(".", 1)[1] in _U32_KEYS and type(v) is int and 0 <= v < 2**32:
            w.add_uint32(k, v)
        elif isinstance(v, list) and v and all(type(x) is int for x in v) and min(v) >= 0:
            w.add_array(k, v)
        else:
            w.add_key_value(k, v, _vtype(v), sub_type=_vtype(v[0]) if isinstance(v, list) and v else None)
    for k, (v, t, sub) in (typed or {}).items():
        w.add_key_value(k, v, t, sub_type=sub)
    n_vocab = len(tiny_metadata()["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(0)
    for name, shape in (shapes or tiny_shapes(n_vocab)).items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _vtype(v):
    from gguf.constants import GGUFValueType as VT

    if isinstance(v, bool):
        return VT.BOOL
    if isinstance(v, int):
        return VT.INT32 if -2**31 <= v < 2**31 else VT.INT64
    if isinstance(v, float):
        return VT.FLOAT32
    if isinstance(v, str):
        return VT.STRING
    if isinstance(v, list):
        return VT.ARRAY
    raise TypeError(type(v))


# --------------------------------------------------------------------------- the child process

_CHILD = r"""
import json, resource, signal, sys, traceback
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
seconds = float(sys.argv[2])

class CaseTimeout(BaseException):
    pass

def on_alarm(*_):
    raise CaseTimeout()

signal.signal(signal.SIGALRM, on_alarm)
import edgeq
from edgeq.errors import EdgeqError
from edgeq.formats.errors import FormatError

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    path = line.rstrip("\n")
    out = {"path": path}
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        model = edgeq.load(path)
        text = model.render_chat([{"role": "user", "content": "hello"}])
        model.tokenizer.decode(model.tokenizer.encode(text))
        out.update(outcome="ok")
    except (EdgeqError, FormatError) as e:
        out.update(outcome="error", type=type(e).__name__, message=str(e))
    except CaseTimeout:
        out.update(outcome="timeout")
    except BaseException as e:
        out.update(outcome="raw", type=type(e).__name__, message=str(e)[:300],
                   where="".join(traceback.format_exception(e)[-4:])[-1500:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    print(json.dumps(out), flush=True)
"""


class Loader:
    """A child process that loads GGUF files one at a time; restarted if it dies (and that case reported)."""

    def __init__(self, memory: int = 2 << 30, seconds: float = 10.0):
        self.memory, self.seconds = memory, seconds
        self.proc = None

    def _start(self):
        env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(self.memory), str(self.seconds)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("loader child failed to start: " + self.proc.stderr.read()[-2000:])

    def load(self, path) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:  # killed (memory), crashed: the case failed
            rc = self.proc.wait()
            self.proc = None
            return {"path": str(path), "outcome": "died", "rc": rc}
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


def is_clean(result: dict) -> bool:
    """The load worked, or ended in one of edgeq's own errors as one short line."""
    if result["outcome"] == "ok":
        return True
    return result["outcome"] == "error" and "\n" not in result["message"] and len(result["message"]) < 1000

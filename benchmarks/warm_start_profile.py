#!/usr/bin/env python3
"""Where a warm start's time goes: the stages of `edgeq run MODEL --chat -p Hi` in this process, timed from launch.

    python benchmarks/warm_start_profile.py [--model smollm2-135m-instruct] [--repeats 5]

Each repeat is a fresh Python process (the kernel cache is the user's own, filled: run the model once first) that
imports, opens the file, builds the model's parts one by one (the same calls as engine.Model, in its order), then
streams the first tokens of a chat reply; printed: milliseconds from the process's start to the end of each stage
(medians over the repeats) and each stage's own share. benchmarks/first_run.py times the real command from outside.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
T0 = time.perf_counter()
marks = []
def mark(label):
    marks.append((label, time.perf_counter() - T0))
import edgeq._numba_env  # noqa: F401  (what the CLI imports first)
import numpy  # noqa: F401
mark("import numpy")
import numba  # noqa: F401
mark("import numba")
from edgeq.runtime import engine
from edgeq.assets import model_path
path = model_path(sys.argv[1])
from edgeq.runtime.warmup import fast_cache_loads
fast_cache_loads()
import edgeq.runtime.kv_cache, edgeq.runtime.tokenizer, edgeq.models, edgeq.runtime.chat_template  # noqa: E401,F401
mark("import edgeq's runtime")
from edgeq.formats.gguf_file import GGUFFile
gf = GGUFFile(path)
mark("open the GGUF (metadata)")
from edgeq.models import architecture
arch = architecture(gf.arch)
cfg = arch.Config.from_gguf(gf)
weights = arch.load_weights(gf, cfg)
mark("architecture and weights")
from edgeq.runtime.tokenizer import Tokenizer
Tokenizer.from_gguf(gf)
mark("tokenizer")
gf.close()
model = engine.Model(path, warm_up=True)
mark("engine.Model again (all of the above)")
for i, piece in enumerate(model.chat([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)):
    mark("first token (prompt, kernel loads)" if i == 0 else "second token")
print(json.dumps(marks))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    runs = []
    for _ in range(max(1, min(a.repeats, 50))):
        p = subprocess.run([sys.executable, "-c", CHILD, a.model], capture_output=True, text=True, timeout=600)
        if p.returncode:
            print(p.stderr[-2000:], file=sys.stderr)
            return 1
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    labels = [label for label, _ in runs[0]]
    print(f"`python benchmarks/warm_start_profile.py --model {a.model} --repeats {len(runs)}` (ms from the process's "
          f"start, medians)\n")
    print("| stage | ends at ms | own ms |\n|---|---:|---:|")
    prev = 0.0
    for i, label in enumerate(labels):
        t = statistics.median(r[i][1] for r in runs) * 1e3
        print(f"| {label} | {t:.0f} | {t - prev:.0f} |")
        prev = t
    return 0


if __name__ == "__main__":
    sys.exit(main())

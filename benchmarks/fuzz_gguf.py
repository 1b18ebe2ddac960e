"""Long fuzz run of the model load path (tests/test_fuzz_gguf.py's two strategies) for a time budget.

    python benchmarks/fuzz_gguf.py --minutes 20 [--cases 100000]

Alternates batches of byte mutations (header, metadata, tensor infos) and metadata value changes of the tiny
model, each loaded in the memory- and time-capped child of tests/_hostile.py. Prints the cases run, the
outcomes, the rate, and every distinct failure (an exception that is not edgeq's own one-line error, a hang,
a child killed for memory).
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402

import test_fuzz_gguf as T  # noqa: E402
from _hostile import Loader, is_clean, write_tiny  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500)
    a = ap.parse_args()

    from edgeq.formats.gguf_file import GGUFFile

    d = pathlib.Path(tempfile.mkdtemp(prefix="edgeq-fuzz-"))
    seed = write_tiny(d / "seed.gguf")
    blob = seed.read_bytes()
    with GGUFFile(seed) as gf:
        header_end = gf.data_offset
    loader = Loader(memory=2 << 30, seconds=20.0)
    outcomes: collections.Counter = collections.Counter()
    failures: dict = {}
    end = time.monotonic() + 60 * a.minutes
    t0 = time.monotonic()
    n = 0

    def record(r, what):
        nonlocal n
        n += 1
        outcomes[f"{r['outcome']}:{r.get('type', '')}"] += 1
        if not is_clean(r):
            failures.setdefault((r["outcome"], r.get("type"), (r.get("where") or "")[-200:]), (what, r))

    settings_ = settings(max_examples=a.batch, deadline=None, database=None, suppress_health_check=list(HealthCheck))

    @settings_
    @given(data=T.mutants(blob, header_end))
    def bytes_case(data):
        p = d / "m.gguf"
        p.write_bytes(data)
        record(loader.load(p), "byte mutation")
        p.unlink()

    @settings_
    @given(change=T.metadata_changes())
    def value_case(change):
        p = d / "v.gguf"
        write_tiny(p, **change)
        record(loader.load(p), repr(change)[:300])
        p.unlink()

    batch = 0
    while time.monotonic() < end and n < a.cases:
        (bytes_case if batch % 2 == 0 else value_case)()
        batch += 1
        print(f"{n} cases, {len(failures)} distinct failures, {n / (time.monotonic() - t0):.1f} cases/s", flush=True)
    loader.close()
    print(f"\n{n} cases in {time.monotonic() - t0:.0f} s ({n / (time.monotonic() - t0):.1f}/s)")
    for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<24} {v}")
    for (outcome, typ, where), (what, r) in failures.items():
        print(f"\nFAILURE {outcome} {typ}: {r.get('message', '')}\n  case: {what}\n  {where}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

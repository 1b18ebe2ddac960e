"""Load test of `edgeq serve` (and, side by side, llama-cpp-python's server) on loopback: bounded in time.

    python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--clients 1,2,4,8] [--duration 60]
    python benchmarks/serve_load.py --soak 600          # random connect / stream / disconnect, then checks

Each client sends streaming chat requests of ~--prompt-tokens prompt tokens for --gen-tokens generated tokens,
back to back, for --duration seconds (requests in flight at the end are finished and counted). Reported per
level: aggregate generated tokens/s, p50/p95 time to first token, p50 per-token latency, errors.

llama-cpp-python's server runs when --llamacpp PY is given (or ~/.cache/edgeq-llamacpp/bin/python has
llama_cpp.server); it gets the same file, threads, context and parallel slots (it serves one request at a time).
Servers bind 127.0.0.1 and are stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

WORDS = ("river mountain signal harbor lantern orchard meadow engine copper violet thunder garden marble "
         "compass feather station canyon silver window ladder").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def prompt_text(n_tokens: int, rng: random.Random) -> str:
    # ~1.3 tokens per word for these words; a random head so no two prompts share a cached prefix
    words = [rng.choice(WORDS) for _ in range(int(n_tokens / 1.3))]
    return f"Request {rng.randrange(10 ** 9)}. Continue this list with more words: " + " ".join(words)


class ServerProc:
    def __init__(self, kind: str, argv: list[str], port: int, model_name: str):
        self.kind, self.port, self.model_name = kind, port, model_name
        self.url = f"http://127.0.0.1:{port}"
        # stderr to a file: a server's load log (llama.cpp's is long) would fill a pipe nobody reads and block it
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log, text=True)

    def wait_ready(self, timeout: float) -> None:
        t_end = time.monotonic() + timeout
        path = "/health" if self.kind == "edgeq" else "/v1/models"
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.kind} server exited: {self.log.read()[-2000:]}")
            try:
                if httpx.get(self.url + path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.kind} server not ready after {timeout:.0f} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_edgeq(a, port: int, reuse: bool = True) -> ServerProc:
    argv = [sys.executable, "-m", "edgeq", "serve", a.model, "--port", str(port), "--parallel", str(a.parallel),
            "--ctx", str(a.ctx), "-t", str(a.threads), "--name", "bench"] + ([] if reuse else ["--no-prompt-reuse"])
    return ServerProc("edgeq", argv, port, "bench")


def start_llamacpp(a, py: str, path: str, port: int) -> ServerProc:
    argv = [py, "-m", "llama_cpp.server", "--model", path, "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(a.threads), "--n_ctx", str(a.ctx), "--model_alias", "bench"]
    return ServerProc("llama-cpp-python", argv, port, "bench")


async def one_request(http: httpx.AsyncClient, srv: ServerProc, a, rng: random.Random, disconnect_after=None):
    """(ttft s, per-token s, tokens, status) of one streaming chat request."""
    body = {"model": srv.model_name, "messages": [{"role": "user", "content": prompt_text(a.prompt_tokens, rng)}],
            "max_tokens": a.gen_tokens, "temperature": 0.7, "stream": True}
    t0 = time.perf_counter()
    t_first = t_last = None
    n = 0
    async with http.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return None, None, 0, r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return None, None, n, 500
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                now = time.perf_counter()
                t_first = t_first or now
                t_last = now
                n += 1
                if disconnect_after is not None and n >= disconnect_after:
                    return t_first - t0, None, n, 299  # left on purpose
    ttft = (t_first - t0) if t_first else None
    tpot = (t_last - t_first) / (n - 1) if n > 1 else None
    return ttft, tpot, n, 200


async def load_level(srv: ServerProc, a, clients: int, duration: float) -> dict:
    rng = random.Random(clients)
    results = []
    t_start = time.perf_counter()
    deadline = t_start + duration

    async def client(i):
        async with httpx.AsyncClient(timeout=a.request_timeout) as http:
            while time.perf_counter() < deadline:
                try:
                    results.append(await one_request(http, srv, a, rng))
                except httpx.HTTPError:
                    results.append((None, None, 0, 599))

    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t_start
    ok = [r for r in results if r[3] == 200]
    ttfts = sorted(r[0] for r in ok if r[0] is not None)
    tpots = sorted(r[1] for r in ok if r[1] is not None)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")
    return {"server": srv.kind, "clients": clients, "requests": len(ok), "errors": len(results) - len(ok),
            "tok_s": sum(r[2] for r in ok) / wall, "ttft_p50": q(ttfts, 0.5), "ttft_p95": q(ttfts, 0.95),
            "tpot_p50": q(tpots, 0.5)}


def report(row: dict) -> dict:
    print(f"{row['server']} {row['clients']} clients: {row['tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50']:.2f} s "
          f"p95 {row['ttft_p95']:.2f} s, {row['errors']} errors", file=sys.stderr, flush=True)
    return row


def metrics(url: str) -> dict:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


async def soak(srv: ServerProc, a) -> int:
    """Clients that stream, disconnect mid-stream or wait for whole replies at random, for --soak seconds."""
    rng = random.Random(0)
    deadline = time.perf_counter() + a.soak
    warm_at = time.perf_counter() + min(120.0, a.soak / 5)
    statuses: dict[int, int] = {}
    rss_warm = None

    async def client(i):
        async with httpx.AsyncClient(timeout=a.request_timeout) as http:
            while time.perf_counter() < deadline:
                cut = rng.choice([None, None, 1, 5, 20])
                try:
                    *_, status = await one_request(http, srv, a, rng, disconnect_after=cut)
                except httpx.HTTPError:
                    status = 599
                statuses[status] = statuses.get(status, 0) + 1
                await asyncio.sleep(rng.random() * 0.5)

    async def sampler():
        nonlocal rss_warm
        while time.perf_counter() < deadline:
            await asyncio.sleep(5)
            if rss_warm is None and time.perf_counter() >= warm_at:
                rss_warm = rss_mb(srv.proc.pid)

    await asyncio.gather(sampler(), *(client(i) for i in range(a.soak_clients)))
    await asyncio.sleep(2)
    rss_end = rss_mb(srv.proc.pid)
    m = metrics(srv.url)
    five = sum(n for s, n in statuses.items() if 500 <= s < 600)
    growth = (rss_end / rss_warm - 1) * 100 if rss_warm else float("nan")
    print(f"soak {a.soak:.0f} s, {a.soak_clients} clients: statuses {dict(sorted(statuses.items()))} "
          f"(299 = left mid-stream on purpose)")
    print(f"  5xx: {five}   RSS after warm-up {rss_warm or float('nan'):.0f} MB, at the end {rss_end:.0f} MB "
          f"({growth:+.1f}%)   slots active at the end: {m.get('edgeq_slots_active', -1):.0f}, "
          f"queue {m.get('edgeq_queue_depth', -1):.0f}")
    ok = five == 0 and growth <= 5.0 and m.get("edgeq_slots_active", 1) == 0
    print("  PASS" if ok else "  FAIL")
    return 0 if ok else 1


def multi_turn(srv: ServerProc, a) -> list[float]:
    """Time to first token of each turn of one conversation (the whole history is resent every turn)."""
    rng = random.Random(1)
    msgs, ttfts = [], []
    with httpx.Client(timeout=a.request_timeout) as http:
        for _ in range(a.turns):
            msgs.append({"role": "user", "content": prompt_text(60, rng)})
            t0 = time.perf_counter()
            http.post(srv.url + "/v1/chat/completions", json={"model": srv.model_name, "messages": msgs,
                                                              "max_tokens": 1, "temperature": 0})
            ttfts.append(time.perf_counter() - t0)  # one token: the time to first token
            r = http.post(srv.url + "/v1/chat/completions", json={"model": srv.model_name, "messages": msgs,
                                                                  "max_tokens": 32, "temperature": 0})
            msgs.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
    return ttfts


def find_llamacpp(a) -> str | None:
    cands = [a.llamacpp] if a.llamacpp else [str(Path.home() / ".cache/edgeq-llamacpp/bin/python")]
    for py in cands:
        if py and Path(py).exists() and subprocess.run([py, "-c", "import llama_cpp.server.app"],
                                                       capture_output=True).returncode == 0:
            return py
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per load level")
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--llamacpp", default=None, help="python of a venv with llama-cpp-python[server]")
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument("--soak", type=float, default=0.0, help="run the soak test for this many seconds instead")
    p.add_argument("--soak-clients", type=int, default=8)
    p.add_argument("--turns", type=int, default=0,
                   help="instead: time to first token per turn of a multi-turn chat, with and without prompt reuse")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    a = p.parse_args()
    a.duration = min(a.duration, 600.0)
    a.soak = min(a.soak, 3600.0)
    levels = [int(c) for c in a.clients.split(",")]

    from edgeq.runtime.engine import resolve_model

    path = str(resolve_model(a.model))
    if a.turns:
        a.turns = min(a.turns, 32)
        res = {}
        for reuse in (True, False):
            srv = start_edgeq(a, free_port(), reuse)
            try:
                srv.wait_ready(a.ready_timeout)
                res[reuse] = multi_turn(srv, a)
            finally:
                srv.stop()
        print("| turn | TTFT with reuse s | without s |\n|---:|---:|---:|")
        for i, (x, y) in enumerate(zip(res[True], res[False])):
            print(f"| {i + 1} | {x:.2f} | {y:.2f} |")
        return 0
    srv = start_edgeq(a, free_port())
    try:
        srv.wait_ready(a.ready_timeout)
        if a.soak:
            return asyncio.run(soak(srv, a))
        rows = [report(asyncio.run(load_level(srv, a, c, a.duration))) for c in levels]
    finally:
        srv.stop()
    py = None if a.no_llamacpp else find_llamacpp(a)
    if py:
        srv = start_llamacpp(a, py, path, free_port())
        try:
            srv.wait_ready(a.ready_timeout)
            rows += [report(asyncio.run(load_level(srv, a, c, a.duration))) for c in levels]
        finally:
            srv.stop()
    else:
        print("llama-cpp-python's server: not available (no llama_cpp.server); its column is skipped",
              file=sys.stderr)
    print(f"\nmodel {Path(path).name}, {a.threads} threads, {a.parallel} slots, ~{a.prompt_tokens} prompt + "
          f"{a.gen_tokens} generated tokens per request, {a.duration:.0f} s per level, {os.cpu_count()} CPUs\n")
    print("| server | clients | requests | errors | gen tok/s | TTFT p50 s | TTFT p95 s | per-token p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['tok_s']:.1f} | "
              f"{r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | {r['tpot_p50'] * 1e3:.0f} |")
    base = {r["server"]: r["tok_s"] for r in rows if r["clients"] == min(levels)}
    for r in rows:
        if r["clients"] == max(levels) and base.get(r["server"]):
            print(f"\n{r['server']}: {max(levels)} clients = {r['tok_s'] / base[r['server']]:.2f}x its "
                  f"{min(levels)}-client throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())

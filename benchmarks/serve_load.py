"""Load test of `edgeq serve` (and, side by side, llama-cpp-python's server) on loopback: bounded in time.

    python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--clients 1,2,4,8] [--duration 60] [--rounds 1]
    python benchmarks/serve_load.py --turns 8           # time to first token per chat turn, with / without reuse
    python benchmarks/serve_load.py --soak 600          # random connect / stream / disconnect, then checks

Each client sends streaming chat requests of ~--prompt-tokens prompt tokens (as the server counts them, the chat
template's included: the message's length is set from the model's tokenizer, words_for) for --gen-tokens generated tokens,
back to back, for --duration seconds. Reported per level: aggregate generated tokens/s, p50/p95 time to first
token, p50 per-token latency, errors (any status but 200, a stream that ends in an error, a timeout). The
throughput is the tokens streamed within the level's fixed time, over that time: the level's clients are all
sending then. Requests in flight at the end are finished (their times count) and the level's whole output over its
whole wall time, drain included (fewer and fewer clients), is shown beside it. The levels alternate between the two servers (both are up for
the whole run; the idle one costs nothing), so a change in the machine's load hits both. edgeq's own decode
speed (`edgeq run`'s path, same file and threads, no server) is measured before the first level and after every
edgeq level: the targets are ratios to it, each level's to the mean of the two measurements around it (on a shared
host the speed moves by a third within minutes: a baseline measured minutes away from the level measures the host's
drift). --rounds N runs the levels N times and judges the ratio targets on the median of the rounds' ratios. The
output ends with a markdown table and one verdict line per target.

llama-cpp-python's server runs when --llamacpp PY is given (or ~/.cache/edgeq-llamacpp/bin/python has
llama_cpp.server); it gets the same file, threads and context. It serves one request at a time; its default
`interrupt_requests` cuts the running stream off when another request arrives, so it is started with
`--interrupt_requests False` and serialises them (waiting clients count toward their time to first token).
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
from statistics import median
from typing import NamedTuple

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


def prompt_text(n_words: int, rng: random.Random) -> str:
    """A user message of n_words random words (words_for: how many make a request of --prompt-tokens), with a random
    head so that no two prompts share a cached prefix beyond the chat template's."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return f"Request {rng.randrange(10 ** 9)}. Continue this list with more words: " + " ".join(words)


def words_for(model, tokens: int) -> int:
    """The word count of prompt_text whose chat request has ~`tokens` prompt tokens as a server counts them (its
    usage.prompt_tokens: the model's chat template around the message included), from the model's own tokenizer and
    template (Model.chat_ids) on two messages of 40 and 160 words: these words take about a token each, the template
    and the message's head 20-50 (153 words, from a fixed 1.3 tokens a word, made SmolLM2's requests 202 tokens, Gemma
    3's 173)."""
    n = [len(model.chat_ids([{"role": "user", "content": prompt_text(w, random.Random(w))}])) for w in (40, 160)]
    return max(1, round(40 + (tokens - n[0]) * 120 / (n[1] - n[0])))


def request_shape(a, path: str) -> tuple[int, list[int]]:
    """(words_for --prompt-tokens, the end-of-generation token ids) of the model at `path`, in a child process (as
    own_decode). The load's requests bias those ids by -100 (OpenAI's logit_bias, which both servers take): every
    request then generates its --gen-tokens, where SmolLM2's at temperature 0.7 often ended early at an end of turn
    (95 tokens a request on average at 8 clients), so each generated token carried more of a prompt than the load
    describes."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from serve_load import words_for
from edgeq.runtime.engine import load
m = load({path!r}, n_ctx={a.ctx}, threads=1)
print(words_for(m, {a.prompt_tokens}), *sorted(m.tokenizer.eog_ids))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=a.ready_timeout)
    if out.returncode:
        raise RuntimeError(f"prompt calibration failed: {out.stderr[-2000:]}")
    words, *eog = (int(v) for v in out.stdout.splitlines()[-1].split())
    return words, eog


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
            "--n_threads", str(a.threads), "--n_ctx", str(a.ctx), "--model_alias", "bench",
            "--interrupt_requests", "False"]
    return ServerProc("llama-cpp-python", argv, port, "bench")


class Reply(NamedTuple):
    """One streaming request's outcome (one_request)."""
    ttft: float | None        # seconds to the first token
    tpot: float | None        # seconds per token after it
    tokens: int               # tokens generated (the usage chunk's count where the server sends one)
    status: int               # HTTP status; 500 a stream ending in an error, 599 a client error, 299 left on purpose
    in_window: int = 0        # content chunks streamed by the level's deadline


async def one_request(http: httpx.AsyncClient, srv: ServerProc, a, rng: random.Random, disconnect_after=None,
                      deadline: float = float("inf")):
    """The Reply of one streaming chat request. Tokens are counted as content chunks (one per token on both
    servers), or from the usage chunk where the server sends one (edgeq); those streamed by `deadline`
    (perf_counter) as content chunks."""
    body = {"model": srv.model_name, "messages": [{"role": "user", "content": prompt_text(a.prompt_words, rng)}],
            "max_tokens": a.gen_tokens, "temperature": 0.7, "stream": True}
    if a.eog:  # --gen-tokens a request (request_shape)
        body["logit_bias"] = {str(i): -100 for i in a.eog}
    if srv.kind == "edgeq":
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    t_first = t_last = None
    n = n_window = 0
    usage = None
    async with http.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Reply(None, None, 0, r.status_code)
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return Reply(None, None, n, 500, n_window)
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                now = time.perf_counter()
                t_first = t_first or now
                t_last = now
                n += 1
                n_window += now <= deadline
                if disconnect_after is not None and n >= disconnect_after:
                    return Reply(t_first - t0, None, n, 299, n_window)  # left on purpose
    ttft = (t_first - t0) if t_first else None
    tpot = (t_last - t_first) / (n - 1) if n > 1 else None
    return Reply(ttft, tpot, usage if usage is not None else n, 200, n_window)


ENGINE = ("edgeq_engine_seconds_total{phase=\"prefill\"}", "edgeq_engine_seconds_total{phase=\"decode\"}",
          "edgeq_engine_seconds_total{phase=\"mixed\"}", "edgeq_decode_steps_total", "edgeq_decode_rows_total",
          "edgeq_prompt_tokens_total", "edgeq_prompt_tokens_cached_total", "edgeq_engine_passes_total{phase=\"decode\"}",
          "edgeq_engine_passes_total{phase=\"mixed\"}")


async def load_level(srv: ServerProc, a, clients: int, duration: float) -> dict:
    rng = random.Random(clients)
    results = []
    before = metrics(srv.url) if srv.kind == "edgeq" else None
    t_start = time.perf_counter()
    deadline = t_start + duration

    async def client(i):
        async with httpx.AsyncClient(timeout=a.request_timeout) as http:
            while time.perf_counter() < deadline:
                try:
                    results.append(await one_request(http, srv, a, rng, deadline=deadline))
                except httpx.HTTPError:
                    results.append(Reply(None, None, 0, 599))

    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t_start
    ok = [r for r in results if r.status == 200]
    ttfts = sorted(r.ttft for r in ok if r.ttft is not None)
    tpots = sorted(r.tpot for r in ok if r.tpot is not None)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")
    row = {"server": srv.kind, "clients": clients, "requests": len(ok), "errors": len(results) - len(ok),
           "tok_s": sum(r.in_window for r in ok) / duration, "tok_s_drained": sum(r.tokens for r in ok) / wall,
           "ttft_p50": q(ttfts, 0.5), "ttft_p95": q(ttfts, 0.95),
           "tpot_p50": q(tpots, 0.5), "gen_per_request": sum(r.tokens for r in ok) / len(ok) if ok else 0.0}
    if before is not None:  # where the server's time went: its own counters over the level
        after = metrics(srv.url)
        prefill, decode, mixed, steps, rows, prompt, cached, decode_passes, mixed_passes = (
            after.get(k, 0.0) - before.get(k, 0.0) for k in ENGINE)
        row["chunk"] = after.get("edgeq_prefill_chunk_tokens")
        n_req = len(results)
        row["prompt"] = (prompt / n_req, cached / n_req) if n_req else (float("nan"), float("nan"))
        row["engine"] = {"wall": wall, "prefill_s": prefill, "decode_s": decode, "mixed_s": mixed, "steps": steps,
                         "rows": rows, "decode_passes": decode_passes, "mixed_passes": mixed_passes,
                         "requests": n_req}
    return row


def own_decode(a, path: str) -> float:
    """Seconds per token of edgeq's own decode (the path of `edgeq run`): same file, threads, a prompt of the
    benchmark's size, --gen-tokens greedy tokens. In a child process, so the benchmark stays light."""
    code = f"""
import random, sys, time
import numpy
sys.path.insert(0, {str(Path(__file__).parent)!r})
from serve_load import prompt_text
from edgeq.runtime.engine import load
m = load({path!r}, n_ctx={a.ctx}, threads={a.threads})
ids = m.tokenizer.encode(prompt_text({a.prompt_words}, random.Random(7)))
logits = m.append(ids)
logits = m.append([int(numpy.argmax(logits))])
t = time.perf_counter()
for _ in range({a.gen_tokens}):
    logits = m.append([int(numpy.argmax(logits))])
print((time.perf_counter() - t) / {a.gen_tokens})
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=a.ready_timeout)
    if out.returncode:
        raise RuntimeError(f"decode baseline failed: {out.stderr[-2000:]}")
    return float(out.stdout.split()[-1])


def pass_ceiling(r: dict) -> dict | None:
    """The throughput an edgeq level's passes allow, by arithmetic on its own /metrics counters: a request costs
    its prompt passes (prompt-only and mixed, the level's total over its requests) and, for each token after the
    first that no mixed pass gave it, a mean-batch share of a decode pass (the level's mean decode pass over its
    mean rows a pass, the same in mixed passes assumed); tokens a request / that cost. None without decode passes."""
    e = r.get("engine")
    if not e or not e.get("decode_passes") or not e.get("requests") or not e["steps"]:
        return None
    step_s = e["decode_s"] / e["decode_passes"]
    batch = e["rows"] / e["steps"]
    prompt_s = (e["prefill_s"] + e["mixed_s"]) / e["requests"]
    riding = e["mixed_passes"] * batch / e["requests"]  # a request's tokens from the mixed passes
    tokens = r["gen_per_request"]
    cost = prompt_s + max(0.0, tokens - 1 - riding) * step_s / batch
    return {"step_s": step_s, "batch": batch, "prompt_s": prompt_s, "tok_s": tokens / cost}


def verdicts(rows: list[dict]) -> list[str]:
    """One line per target of issue #14 that this run's levels cover; each edgeq level against its own decode
    baseline (row["decode_s"]: the mean of the measurements just before and just after it), the ratio targets on
    the median over the rounds."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["server"], r["clients"]), []).append(r)
    ok = lambda cond: "PASS" if cond else "FAIL"  # noqa: E731
    out = []
    one, four, eight = by.get(("edgeq", 1)), by.get(("edgeq", 4)), by.get(("edgeq", 8))
    rounds = lambda xs: "" if len(xs) < 2 else f" (median of {len(xs)} rounds: " + ", ".join(  # noqa: E731
        f"{x:.2f}" for x in xs) + ")"
    if one and all(r["tpot_p50"] == r["tpot_p50"] for r in one):
        xs = [r["tpot_p50"] / r["decode_s"] for r in one]
        ratio = median(xs)
        out.append(f"- single stream: {median([r['tpot_p50'] for r in one]) * 1e3:.1f} ms per token in the server, "
                   f"{median([r['decode_s'] for r in one]) * 1e3:.1f} ms in edgeq's own decode = {ratio:.2f}x{rounds(xs)} "
                   f"(target <= 1.3x): {ok(ratio <= 1.3)}")
    if eight:
        xs = [r["tok_s"] * r["decode_s"] for r in eight]
        ratio = median(xs)
        out.append(f"- 8 clients: {median([r['tok_s'] for r in eight]):.1f} tok/s = {ratio:.2f}x edgeq's single-stream "
                   f"decode ({median([1 / r['decode_s'] for r in eight]):.1f} tok/s){rounds(xs)} (target >= 2.5x): "
                   f"{ok(ratio >= 2.5)}; with the level's drain {median([r['tok_s_drained'] * r['decode_s'] for r in eight]):.2f}x")
        lc = by.get(("llama-cpp-python", 8))
        if lc and all(r["tok_s"] > 0 for r in lc):
            xs = [e["tok_s"] / r["tok_s"] for e, r in zip(eight, lc)]
            ratio = median(xs)
            out.append(f"- 8 clients: {ratio:.2f}x llama-cpp-python's server ({median([r['tok_s'] for r in lc]):.1f} "
                       f"tok/s){rounds(xs)} (target >= 2x): {ok(ratio >= 2.0)}")
    if four:
        p95 = max(r["ttft_p95"] for r in four)
        out.append(f"- 4 clients: p95 time to first token {p95:.2f} s{' (the worst round)' if len(four) > 1 else ''} "
                   f"(target <= 1.5 s): {ok(p95 <= 1.5)}")
    errors = sum(r["errors"] for r in rows if r["server"] == "edgeq")
    out.append(f"- edgeq errors: {errors}: {ok(errors == 0)}")
    return out


def report(row: dict) -> dict:
    print(f"{row['server']} {row['clients']} clients: {row['tok_s']:.1f} tok/s ({row['tok_s_drained']:.1f} with the "
          f"drain), TTFT p50 {row['ttft_p50']:.2f} s "
          f"p95 {row['ttft_p95']:.2f} s, {row['errors']} errors, {row['gen_per_request']:.0f} tokens a request",
          file=sys.stderr, flush=True)
    return row


def metrics(url: str) -> dict:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


async def soak(srv: ServerProc, a) -> int:
    """Clients that connect (a new connection for each request), then stream to the end, disconnect mid-stream or
    wait for a whole reply, at random, for --soak seconds. Checks: no 5xx, RSS growth after warm-up <= 5%, every
    slot free and nothing queued at the end (/metrics)."""
    rng = random.Random(0)
    deadline = time.perf_counter() + a.soak
    warm_at = time.perf_counter() + min(120.0, a.soak / 5)
    statuses: dict[int, int] = {}
    rss_warm = None

    async def whole_reply(http) -> int:
        body = {"model": srv.model_name, "max_tokens": rng.choice([1, 16, a.gen_tokens]), "temperature": 0.7,
                "messages": [{"role": "user", "content": prompt_text(a.prompt_words, rng)}]}
        r = await http.post(srv.url + "/v1/chat/completions", json=body)
        return r.status_code

    async def client(i):
        while time.perf_counter() < deadline:
            cut = rng.choice([None, None, 1, 5, 20, "whole"])
            try:
                async with httpx.AsyncClient(timeout=a.request_timeout) as http:
                    if cut == "whole":
                        status = await whole_reply(http)
                    else:
                        status = (await one_request(http, srv, a, rng, disconnect_after=cut)).status
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
            msgs.append({"role": "user", "content": prompt_text(46, rng)})
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
    p.add_argument("--rounds", type=int, default=1, help="run the levels this many times (at most 10); the ratio "
                   "targets are judged on the median")
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--request-timeout", type=float, default=900.0,
                   help="per request, generous: a serialising server keeps clients waiting")
    p.add_argument("--llamacpp", default=None, help="python of a venv with llama-cpp-python[server]")
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument("--soak", type=float, default=0.0, help="run the soak test for this many seconds instead")
    p.add_argument("--soak-clients", type=int, default=8)
    p.add_argument("--turns", type=int, default=0,
                   help="instead: time to first token per turn of a multi-turn chat, with and without prompt reuse")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    a = p.parse_args()
    a.duration = min(a.duration, 600.0)
    a.rounds = max(1, min(a.rounds, 10))
    a.soak = min(a.soak, 3600.0)
    levels = [int(c) for c in a.clients.split(",")]

    from edgeq.runtime.engine import resolve_model

    path = str(resolve_model(a.model))
    a.prompt_words, a.eog = request_shape(a, path) if not a.turns else (0, [])
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
    if a.soak:
        srv = start_edgeq(a, free_port())
        try:
            srv.wait_ready(a.ready_timeout)
            return asyncio.run(soak(srv, a))
        finally:
            srv.stop()
    load0 = os.getloadavg()[0]
    decode = [own_decode(a, path)]
    print(f"edgeq's own decode: {decode[0] * 1e3:.1f} ms per token", file=sys.stderr, flush=True)
    py = None if a.no_llamacpp else find_llamacpp(a)
    if not py and not a.no_llamacpp:
        print("llama-cpp-python's server: not available (no llama_cpp.server); its column is skipped",
              file=sys.stderr)
    servers = []
    try:
        servers.append(start_edgeq(a, free_port()))
        if py:
            servers.append(start_llamacpp(a, py, path, free_port()))
        for srv in servers:
            srv.wait_ready(a.ready_timeout)
        rows = []
        for rnd in range(a.rounds):
            for c in levels:
                for srv in servers:
                    row = report(asyncio.run(load_level(srv, a, c, a.duration)))
                    row["round"] = rnd + 1
                    if srv.kind == "edgeq":  # its own baseline: the decode speed just before and just after it
                        decode.append(own_decode(a, path))
                        row["decode_s"] = (decode[-2] + decode[-1]) / 2
                        print(f"edgeq's own decode: {decode[-1] * 1e3:.1f} ms per token", file=sys.stderr, flush=True)
                    rows.append(row)
    finally:
        for srv in servers:
            srv.stop()
    rows.sort(key=lambda r: (r["server"] != "edgeq", r["clients"], r["round"]))
    prompts = [r["prompt"] for r in rows if r.get("prompt")]
    counted = (f" (as edgeq's server counted them: {sum(p[0] for p in prompts) / len(prompts):.0f} a request, "
               f"{sum(p[1] for p in prompts) / len(prompts):.0f} of them reused from a slot's cache)") if prompts else ""
    print(f"\nmodel {Path(path).name}, {a.threads} threads, {a.parallel} slots, ~{a.prompt_tokens} prompt{counted} + "
          f"{a.gen_tokens} generated tokens per request, {a.duration:.0f} s per level, {os.cpu_count()} CPUs, "
          f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; edgeq's own decode "
          f"{min(decode) * 1e3:.1f}-{max(decode) * 1e3:.1f} ms per token over the run ({len(decode)} measurements: "
          f"before the first level and after each edgeq level)\n")
    print("| server | round | clients | requests | errors | tokens a request | gen tok/s | with the drain | TTFT p50 s "
          "| TTFT p95 s | per-token p50 ms | own decode tok/s | x own decode |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        own = (f"{1 / r['decode_s']:.1f} | {r['tok_s'] * r['decode_s']:.2f}x" if "decode_s" in r else " | ")
        print(f"| {r['server']} | {r['round']} | {r['clients']} | {r['requests']} | {r['errors']} | "
              f"{r['gen_per_request']:.0f} | {r['tok_s']:.1f} | {r['tok_s_drained']:.1f} | "
              f"{r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | {r['tpot_p50'] * 1e3:.0f} | {own} |")
    print()
    print("Where edgeq's server spent each level (its /metrics counters): forward passes over a prompt chunk alone, "
          "over a prompt chunk and the decoding sequences together (mixed), and over the decoding sequences alone, as "
          "shares of the level's wall time; the mean number of decoding sequences per pass that carries them, and "
          "their rate (sequences advanced per second of those passes).\n")
    print("| round | clients | prompt chunks % | mixed % | decode batches % | other % | mean batch | decode-pass tok/s "
          "| x own decode | prompt chunk |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        e = r.get("engine")
        if e and e["wall"] > 0:
            pf, mx, dc = (e[k] / e["wall"] for k in ("prefill_s", "mixed_s", "decode_s"))
            busy = e["decode_s"] + e["mixed_s"]
            rate = e["rows"] / busy if busy else float("nan")
            batch = e["rows"] / e["steps"] if e["steps"] else float("nan")
            print(f"| {r['round']} | {r['clients']} | {100 * pf:.0f} | {100 * mx:.0f} | {100 * dc:.0f} | "
                  f"{100 * (1 - pf - mx - dc):.0f} | {batch:.1f} | {rate:.1f} | {rate * r['decode_s']:.2f} | "
                  f"{r.get('chunk') or 0:.0f} |")
    print()
    ceilings = [(r, c) for r in rows if (c := pass_ceiling(r))]
    if ceilings:
        print("What each level's passes allow (`pass_ceiling`): a request's prompt passes (prompt-only and mixed, per "
              "request) and its other tokens' share of the decode passes (the mean decode pass over its mean rows), "
              "at the costs the level measured; tokens a request over that = the throughput of a server that spends "
              "all its time in these passes, against edgeq's own decode beside the level, and the share of it "
              "delivered.\n")
        print("| round | clients | decode pass ms | rows a pass | prompt passes ms a request | ceiling tok/s "
              "| x own decode | delivered |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r, c in ceilings:
            print(f"| {r['round']} | {r['clients']} | {1e3 * c['step_s']:.1f} | {c['batch']:.1f} | "
                  f"{1e3 * c['prompt_s']:.0f} | {c['tok_s']:.1f} | {c['tok_s'] * r['decode_s']:.2f}x | "
                  f"{100 * r['tok_s'] / c['tok_s']:.0f}% |")
        print()
    print("\n".join(verdicts(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Continuous batching: one thread owns the model and advances every active request together.

    sched = Scheduler(model, n_slots=4)
    sched.start()
    job = sched.submit(GenRequest(ids, max_tokens=64), on_event)   # on_event(Piece | Done), from the thread

Each slot has its own KV cache, the slices of one KVPool (runtime/kv_cache.py). A step is one forward pass
(`arch.forward_batch`) over at most one prefill chunk (one slot's prompt, `prefill_chunk` tokens: by default as many
as this machine evaluates in ~STEP_BUDGET_S, measured at warm-up and by the prompt passes that follow, so a long
prompt never stalls the others for long, and a short one takes one pass, not several that each pay a pass's fixed
cost; a remainder of at most an eighth of a chunk joins the chunk before it)
and one token of every decoding slot: each weight matrix is read once for all of them, and the decoding slots
attend in one kernel call per layer. New requests join between steps. A free slot whose cache starts with the new
prompt's tokens is preferred, and only the rest is prefilled.
"""
from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgeq.errors import ContextError, EdgeqError
from edgeq.runtime import omp
from edgeq.runtime.engine import split_stop
from edgeq.runtime.sampling import Sampler, SamplingParams


STEP_BUDGET_S = 0.1  # a prompt chunk's share of a step: how long it may hold the decoding streams back
MAX_CHUNK = 256      # prompt tokens per step at most (the KV pool's slack for them on sliding-window rings)
_PROBES = (48, 128)  # prompt tokens of the warm-up passes that measure a pass's fixed cost and a token's cost


class QueueFull(EdgeqError):
    """Every slot is busy and the waiting queue is at its bound: try again later."""


@dataclass
class GenRequest:
    ids: list[int]                        # the prompt's tokens
    max_tokens: int = 256
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0         # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0        # ... and once per occurrence
    logprobs: int | None = None           # None: none; k: the chosen token's logprob and the k best
    constraint: object | None = None      # a runtime.grammar.Constraint, fresh for this request
    timeout_s: float | None = None
    logit_bias: tuple[np.ndarray, np.ndarray] | None = None  # (token ids, float32 biases) added to the logits


@dataclass
class TokenInfo:
    id: int
    logprob: float
    top: list[tuple[int, float]]          # (token id, logprob), best first


@dataclass
class Piece:
    """Text that is final (stop strings already held back), and the tokens that produced it."""
    text: str
    tokens: list[TokenInfo]


@dataclass
class Done:
    finish: str               # "stop" (end of turn, stop string, grammar complete), "length", "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int        # prompt tokens reused from the slot's cache
    ttft_s: float             # submit → first token
    gen_s: float              # first token → last token
    error: str | None = None  # finish == "error": what went wrong (one line)


class Job:
    """A submitted request; `cancel()` frees its slot at the next step."""

    def __init__(self, req: GenRequest, on_event: Callable, wake: Callable):
        self.req = req
        self.on_event = on_event
        self._wake = wake
        self.cancelled = False
        self.t_submit = time.perf_counter()
        self.deadline = self.t_submit + req.timeout_s if req.timeout_s else math.inf

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()


class _Slot:
    def __init__(self, index: int, cache):
        self.index = index
        self.cache = cache
        self.tokens: list[int] = []       # what the cache holds: position i has tokens[i]
        self.saved: tuple[list[int], np.ndarray] | None = None  # last prompt and its next-token logits
        self.job: Job | None = None

    def begin(self, job: Job, tokenizer) -> None:
        self.job = job
        self.decoder = tokenizer.stream_decoder()
        r = job.req
        self.todo: list[int] = []         # prompt tokens still to prefill
        self.logits: np.ndarray | None = None
        self.sampler = Sampler(r.params)
        self.history = list(r.ids)
        self.counts: dict[int, int] = {}  # generated token → occurrences (penalties)
        self.pending = ""                 # text held back: it may be the start of a stop string
        self.n_gen = 0
        self.next_token: int | None = None  # sampled, not yet evaluated
        self.t_first: float | None = None
        self.cached = 0


class Scheduler:
    def __init__(self, model, n_slots: int = 4, n_ctx: int | None = None, max_queue: int = 64,
                 prefill_chunk: int | None = None, cache_type_k: str | None = None, cache_type_v: str | None = None,
                 prompt_reuse: bool = True, on_step: Callable[[], None] | None = None, packed_weights: bool = True):
        """packed_weights=False: batches read the weights in the file's layout only, instead of a copy packed for the
        batch products (cpu_kernels/batch_dot.py pack_rows16: as many bytes again as the Q4_0 / Q4_1 / Q5 / Q8_0
        matrices, made at warm-up)."""
        from edgeq.models.base import all_linears, forget_decode_tables
        from edgeq.runtime.kv_cache import KVPool

        if n_slots < 1:
            raise EdgeqError("--parallel must be >= 1")
        if max_queue < 0:
            raise EdgeqError("--max-queue must be >= 0")
        if getattr(model, "device", "cpu") != "cpu":
            raise EdgeqError("the server runs on the CPU (batched decode has no CUDA path yet)")
        self.model = model
        if any([lin.q.packed_batches(packed_weights) for lin in all_linears(model.weights)]):
            forget_decode_tables(model.weights)
        self.n_ctx = n_ctx or model.n_ctx
        if self.n_ctx < 16 or self.n_ctx > model.cfg.n_ctx_train:
            raise ContextError(f"context {self.n_ctx} must be between 16 and the model's trained context "
                               f"{model.cfg.n_ctx_train}")
        self.max_queue = max_queue
        self.prompt_reuse = prompt_reuse  # False: every prompt is evaluated from position 0 (for measurements)
        # None: chosen at warm-up from the measured prefill rate (_measure_chunk); until then MAX_CHUNK bounds it
        self.fixed_chunk = prefill_chunk is not None
        # a prompt pass's cost, fixed + per token (_measure_chunk); the per-token part only falls (_refine_chunk)
        self._pass_s, self._best_s_per_token = 0.0, math.inf
        self.prefill_chunk = max(1, prefill_chunk) if prefill_chunk is not None else MAX_CHUNK
        pool = KVPool(model.cfg.kv_layouts(), self.n_ctx, n_slots, cache_type_k, cache_type_v,
                      max_batch=self.prefill_chunk)  # a decode step attends over all slots in one call per layer
        self.slots = [_Slot(i, cache) for i, cache in enumerate(pool.caches)]
        self.vocab = model.cfg.n_vocab
        self.eog = model.tokenizer.eog_ids
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()     # set once the kernels are compiled and warm
        # the scheduler thread's time in forward passes, by phase (a prompt chunk alone, decoding slots alone, both
        # in one pass: mixed), and the count and rows of the passes that decode: where a loaded server's time goes
        # (/metrics)
        self.busy_s = {"prefill": 0.0, "decode": 0.0, "mixed": 0.0}
        self.passes = {"prefill": 0, "decode": 0, "mixed": 0}  # and how many passes of each (seconds / passes: the
        # mean cost of a pass: what a loaded server's throughput is made of)
        self.decode_steps = 0
        self.decode_rows = 0
        self.failed: str | None = None     # set when warm-up failed
        # called on this thread after each step (and when it stops): a consumer whose on_event only buffers the
        # step's events hands them over here, once per step (the server wakes its event loop once, not per token)
        self.on_step = on_step

    # ------------------------------------------------------------ public
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_slots(self) -> int:
        return sum(s.job is not None for s in self.slots)

    @property
    def kv_tokens(self) -> int:
        """Positions held in all slot caches (kept for reuse after a request ends, so not all in use)."""
        return sum(len(s.tokens) for s in self.slots)

    @property
    def kv_bytes(self) -> int:
        return sum(s.cache.nbytes for s in self.slots)

    def start(self) -> "Scheduler":
        # the forward passes move to the scheduler thread: OpenMP workers left by kernels this thread ran before
        # (a forward pass, a generation) would outnumber the CPUs beside the scheduler thread's, and every kernel
        # would wait for a sleeping worker (runtime/omp.py)
        omp.release()
        self._thread = threading.Thread(target=self._run, name="edgeq-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def check(self, ids: list[int], max_tokens: int) -> None:
        """Raise ContextError/EdgeqError for a request that can never run (before it is queued)."""
        if not ids:
            raise EdgeqError("empty prompt")
        if min(ids) < 0 or max(ids) >= self.vocab:
            raise EdgeqError(f"token id out of range 0..{self.vocab - 1}")
        if len(ids) >= self.n_ctx:
            raise ContextError(f"the prompt is {len(ids)} tokens; the context is {self.n_ctx} "
                               f"(prompts are never truncated: shorten it or start the server with a larger --ctx)")
        if max_tokens < 1:
            raise EdgeqError("max_tokens must be >= 1")

    def submit(self, req: GenRequest, on_event: Callable) -> Job:
        self.check(req.ids, req.max_tokens)
        job = Job(req, on_event, self._wake)
        with self._cv:
            if len(self._queue) >= self.max_queue + sum(s.job is None for s in self.slots):
                raise QueueFull(f"server busy: {len(self._queue)} requests waiting")
            self._queue.append(job)
            self._cv.notify_all()
        return job

    # ------------------------------------------------------------ the thread
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _run(self) -> None:
        try:
            self.model._set_threads()
            self._warm_up()
            if not self.fixed_chunk:
                self.prefill_chunk = self._measure_chunk()
        except Exception as e:  # the server reports it on /health; nothing else can run
            self.failed = f"{type(e).__name__}: {e}"
            return
        self.ready.set()
        while True:
            with self._cv:
                while not self._stop and not self._queue and not any(s.job for s in self.slots):
                    self._cv.wait()
                if self._stop:
                    break
                self._admit()
            self._step()
            if self.on_step is not None:
                self.on_step()
        for s in self.slots:
            if s.job is not None:
                self._finish(s, "cancelled")
        for job in self._queue:
            job.on_event(Done("cancelled", len(job.req.ids), 0, 0, 0.0, 0.0))
        if self.on_step is not None:
            self.on_step()

    def _warm_up(self) -> None:
        """Compile every kernel the steps use: a prefill chunk of a few and of many rows (serial and parallel
        small ops), batched decode of every size up to 8 sequences."""
        m, arch = self.model, self.model.arch
        a, b = self.slots[0], self.slots[-1]
        n = min(self.prefill_chunk, 32)
        arch.forward(m.weights, m.cfg, np.ones(n, np.int64), 0, a.cache)
        arch.forward_batch(m.weights, m.cfg, np.array([1]), np.array([n]), [a.cache])
        if a is not b:
            arch.forward(m.weights, m.cfg, np.ones(4, np.int64), 0, b.cache)
            arch.forward_batch(m.weights, m.cfg, np.array([1, 1]), np.array([n + 1, 4]), [a.cache, b.cache])
        else:
            arch.forward(m.weights, m.cfg, np.ones(4, np.int64), 0, a.cache)
        # a prompt chunk and a decode row in one pass (the server's mixed step)
        if a is not b:
            arch.forward_batch(m.weights, m.cfg, np.ones(n + 1, np.int64), np.append(np.arange(n), 4),
                               [a.cache, b.cache], n)
        # batches of 3..8 sequences: the product drivers change with the row count (cpu_kernels/batch_dot.py: tiles
        # from 2 or 4 rows, lanes from 3 to 5), and a driver first met while serving would load (or, on a fresh
        # install, compile) in the middle of the streams
        for k in range(3, min(len(self.slots), 8) + 1):
            arch.forward_batch(m.weights, m.cfg, np.ones(k, np.int64), np.zeros(k, np.int64),
                               [s.cache for s in self.slots[:k]])
        # the caches now hold junk at positions 0..: slot.tokens stays empty, so nothing is ever reused

    def _measure_chunk(self) -> int:
        """Prompt tokens per step (`chunk_for`) from warm passes of two sizes (_PROBES, the faster of two each): a
        pass costs a fixed part (the weights' reads and the layers' calls, whatever the rows) and a part per token,
        and a rate from one size alone (total / tokens) books the fixed part on every token, which made the chunk
        128-160 where 192 fit (SmolLM2 on 2 threads: 48 tokens 37 ms, 160 tokens 75 ms, 175 tokens 82 ms).
        _refine_chunk may raise it later."""
        m, cache = self.model, self.slots[0].cache
        big = min(_PROBES[1], self.n_ctx - 1)
        sizes = (min(_PROBES[0], big // 2), big)
        best = []
        for n in sizes:
            t_best = math.inf
            for _ in range(2):
                t = time.perf_counter()
                m.arch.forward(m.weights, m.cfg, np.ones(n, np.int64), 0, cache)
                t_best = min(t_best, time.perf_counter() - t)
            best.append(t_best)
        (n1, n2), (t1, t2) = sizes, best
        per_token = (t2 - t1) / (n2 - n1) if t2 > t1 and n2 > n1 else t2 / n2
        self._pass_s = min(max(0.0, t2 - per_token * n2), STEP_BUDGET_S / 2)
        self._best_s_per_token = per_token
        return chunk_for(self._pass_s, per_token)

    def _refine_chunk(self, tokens: int, seconds: float) -> None:
        """A pass over a prompt chunk of `tokens` rows that took `seconds` refines the chunk: the fastest per-token
        cost seen so far (beyond the measured fixed part) sets it, so a server whose warm-up probe ran on a busy
        machine (another server loading beside it) does not keep small chunks for its life. It only grows, and
        settles within the first prompts. The rows are the chunk's and those of the sequences decoding beside it
        (a mixed pass: each row costs about a prompt token in the products, which read the weights once for all
        of them): a loaded server runs few prompt passes alone, and a chunk of 128 from a probe on a slow minute
        split the benchmark's ~180 new prompt tokens into two passes for the rest of the run (SmolLM2, 8 clients:
        156-169 ms of prompt passes a request against 119-135 with chunks of 160-192)."""
        per_token = max(seconds - self._pass_s, seconds / 2) / tokens
        if per_token < self._best_s_per_token:
            self._best_s_per_token = per_token
            self.prefill_chunk = max(self.prefill_chunk, chunk_for(self._pass_s, per_token))

    def _admit(self) -> None:
        """Move waiting jobs into free slots, preferring the slot whose cache shares the longest prefix."""
        while self._queue:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self._queue.popleft()
            if job.cancelled:
                job.on_event(Done("cancelled", len(job.req.ids), 0, 0, 0.0, 0.0))
                continue
            ids = job.req.ids
            best, keep = free[0], -1
            for s in free:
                k = _common_prefix(s.tokens, ids) if self.prompt_reuse else 0
                if k > keep:
                    best, keep = s, k
            self._begin(best, job, keep)

    def _begin(self, s: _Slot, job: Job, keep: int) -> None:
        s.begin(job, self.model.tokenizer)
        ids = job.req.ids
        if s.saved is not None and keep == len(ids) and s.saved[0] == ids and s.cache.can_rewind_to(keep):
            # the same prompt again: its logits were kept, so temperature 0 answers the same (re-evaluating its
            # last token alone would take other kernels, whose rounding can flip a near-tie)
            s.tokens = s.tokens[:keep]
            s.logits = s.saved[1].copy()
            s.cached = keep
            return
        keep = min(keep, len(ids) - 1)  # at least one token is evaluated, for its logits
        if not s.cache.can_rewind_to(keep):
            keep = 0  # a sliding-window ring has overwritten positions that `keep` still needs
        s.tokens = s.tokens[:keep]
        s.saved = None
        s.cached = keep
        s.todo = ids[keep:]

    def _step(self) -> None:
        now = time.perf_counter()
        for s in self.slots:
            if s.job is not None and s.job.cancelled:
                self._finish(s, "cancelled")
            elif s.job is not None and now > s.job.deadline:
                self._finish(s, "length")
        # slots whose prompt is evaluated (a reused one) choose their first token
        for s in self.slots:
            if s.job is not None and s.logits is not None:
                logits, s.logits = s.logits, None
                self._guarded(s, logits)
        # at most one prompt chunk (the slot that has waited longest) and one token of every decoding slot, in one
        # forward pass: each weight matrix is read once for all of them
        waiting = [s for s in self.slots if s.job is not None and s.todo]
        p = min(waiting, key=lambda s: s.job.t_submit) if waiting else None
        batch = [s for s in self.slots if s.job is not None and s.next_token is not None]
        if p is None and not batch:
            return
        chunk: list[int] = []
        if p is not None:
            # the chunk bounds how long the decoding streams wait; with none decoding, a pass of MAX_CHUNK holds
            # nobody back and reads the weights fewer times (a 1.7B model's chunk is 32 here: 512 prompt tokens took
            # 3.0-3.5 s in passes of 32, 2.1 s in passes of 256)
            size = self.prefill_chunk if batch or self.fixed_chunk else max(self.prefill_chunk, MAX_CHUNK)
            if not self.fixed_chunk and len(p.todo) - size <= size // 8:
                # a small remainder joins this pass (<= 1/8 over the budget) rather than paying a pass of its own
                size = min(len(p.todo), MAX_CHUNK)
            chunk, p.todo = p.todo[:size], p.todo[size:]
        m, T = self.model, len(chunk)
        tokens = np.array(chunk + [s.next_token for s in batch], np.int64)
        pos0 = len(p.tokens) if p else 0
        positions = np.array([pos0 + i for i in range(T)] + [len(s.tokens) for s in batch], np.int64)
        phase = "mixed" if p and batch else "prefill" if p else "decode"
        t0 = time.perf_counter()
        try:
            if not batch:
                logits = m.arch.forward(m.weights, m.cfg, tokens, pos0, p.cache)
            else:
                logits = m.arch.forward_batch(m.weights, m.cfg, tokens, positions,
                                              ([p.cache] if p else []) + [s.cache for s in batch], T)
        except Exception as e:
            for s in ([p] if p else []) + batch:
                self._fail(s, e)
            return
        finally:
            elapsed = time.perf_counter() - t0
            self.busy_s[phase] += elapsed
            self.passes[phase] += 1
        if p is not None and not self.fixed_chunk and T >= 32:
            self._refine_chunk(T + len(batch), elapsed)
        if p is not None:
            p.tokens.extend(chunk)
            if not p.todo:
                p.saved = (list(p.job.req.ids), logits[0].copy())
                p.cache.mark(len(p.tokens))  # the same prompt again continues with the same bits
                self._guarded(p, logits[0])
            logits = logits[1:]
        if batch:
            self.decode_steps += 1
            self.decode_rows += len(batch)
        for i, s in enumerate(batch):
            s.tokens.append(s.next_token)
            s.next_token = None
            self._guarded(s, logits[i])

    def _guarded(self, s: _Slot, logits: np.ndarray) -> None:
        try:
            self._choose(s, logits)
        except Exception as e:  # one request's failure (a grammar error...) ends that request only
            self._fail(s, e)

    def _choose(self, s: _Slot, logits: np.ndarray) -> None:
        """Sample the next token from `logits`, emit its text, and finish or queue it for the next step."""
        r = s.job.req
        raw = logits
        penalties = s.counts and (r.presence_penalty or r.frequency_penalty)
        if penalties or r.constraint is not None or r.logit_bias is not None:  # changed on a copy: logprobs report
            logits = np.array(logits, dtype=np.float32)                      # the raw logits
        if r.logit_bias is not None:
            logits[r.logit_bias[0]] += r.logit_bias[1]
        if penalties:
            ids = np.fromiter(s.counts.keys(), np.int64)
            n = np.fromiter(s.counts.values(), np.float32)
            logits[ids] -= n * np.float32(r.frequency_penalty) + np.float32(r.presence_penalty)
        if r.constraint is not None:
            logits[~r.constraint.allowed()] = -np.inf
        tok = s.sampler(logits, s.history)
        if s.t_first is None:
            s.t_first = time.perf_counter()
        info = None
        if r.logprobs is not None:
            info = _token_info(raw, tok, r.logprobs)
        if r.constraint is not None:
            r.constraint.consume(tok)
        if tok in self.eog:
            self._finish(s, "stop")
            return
        s.n_gen += 1
        s.history.append(tok)
        s.counts[tok] = s.counts.get(tok, 0) + 1
        s.pending += s.decoder.feed(tok)
        out, s.pending, hit = split_stop(s.pending, r.stop)
        s.job.on_event(Piece(out, [info] if info else []))
        if hit:
            s.pending = ""
            self._finish(s, "stop")
        elif r.constraint is not None and r.constraint.done:
            self._finish(s, "stop")
        elif s.n_gen >= r.max_tokens or len(s.tokens) + 1 >= self.n_ctx:
            self._finish(s, "length")
        else:
            s.next_token = tok

    def _finish(self, s: _Slot, finish: str, error: str | None = None) -> None:
        job = s.job
        if finish in ("stop", "length") and error is None:
            tail = s.pending + s.decoder.flush()
            if tail:
                job.on_event(Piece(tail, []))
        now = time.perf_counter()
        t_first = s.t_first or now
        s.job = None
        s.todo = []
        s.next_token = None
        s.logits = None
        job.on_event(Done(finish, len(job.req.ids), s.n_gen, s.cached, t_first - job.t_submit, now - t_first, error))

    def _fail(self, s: _Slot, e: Exception) -> None:
        # the cache may hold a partial write: forget it rather than reuse it
        s.tokens = []
        s.saved = None
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        self._finish(s, "error", msg if isinstance(e, EdgeqError) else f"internal error: {type(e).__name__}: {msg}")


def chunk_for(pass_s: float, per_token_s: float) -> int:
    """Prompt tokens per step for a machine whose prompt pass costs pass_s + per_token_s a token: as many as fit in
    STEP_BUDGET_S, in multiples of 32, between 32 and MAX_CHUNK."""
    fits = int((STEP_BUDGET_S - pass_s) / per_token_s) if per_token_s > 0 else MAX_CHUNK
    return max(32, min(MAX_CHUNK, fits // 32 * 32))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _token_info(logits: np.ndarray, tok: int, k: int) -> TokenInfo:
    x = np.asarray(logits, dtype=np.float64)
    mx = x.max()
    lse = mx + math.log(np.exp(x - mx).sum())
    top = []
    if k > 0:
        idx = np.argpartition(-x, k - 1)[:k]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        top = [(int(i), float(x[i] - lse)) for i in idx]
    return TokenInfo(int(tok), float(x[tok] - lse), top)

"""The HTTP application: OpenAI and ollama routes over one Scheduler; handlers only translate.

Every request passes the guard first (Host header, API key, body size), then its body is validated against
edgeq.serve.protocol before anything is tokenized. Errors are one JSON line in the API's own shape:
OpenAI's `{"error": {"message", "type", "param", "code"}}` on /v1, ollama's `{"error": "..."}` on /api.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from fastapi import Request  # noqa: F401  (module level: FastAPI resolves the handlers' annotations here)
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from edgeq.errors import EdgeqError
from edgeq.runtime.sampling import SamplingParams
from edgeq.runtime.scheduler import Done, GenRequest, Piece, QueueFull
from edgeq.serve import protocol as P

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/api/chat", "/api/generate", "/api/tags",
             "/api/show", "/api/version", "/api/ps", "/health", "/metrics")


@dataclass
class ServerOptions:
    model_name: str                      # the name clients use in "model"
    api_key: str | None = None
    cors_origin: str | None = None
    loopback_only: bool = True           # bound to a loopback address: refuse other Host headers (DNS rebinding)
    max_body: int = 8 * 1024 * 1024
    request_timeout: float = 600.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_response(path: str, e: ApiError) -> JSONResponse:
    if path.startswith("/api/"):
        body: dict = {"error": e.message}
    else:
        body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def parse(model_cls: type[BaseModel], body: bytes):
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as ve:
        err = ve.errors()[0]
        if err["type"] == "json_invalid":
            raise ApiError(400, f"invalid JSON: {err['msg']}", code="invalid_json") from None
        param = ".".join(str(x) for x in err["loc"]) or None
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param,
                       code="invalid_value") from None


# ---------------------------------------------------------------- metrics
class Metrics:
    def __init__(self, sched):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("edgeq_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("edgeq_prompt_tokens", "prompt tokens received", registry=r)
        self.cached_tokens = Counter("edgeq_prompt_tokens_cached", "prompt tokens reused from a slot's cache",
                                     registry=r)
        self.generated_tokens = Counter("edgeq_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("edgeq_time_to_first_token_seconds", "request received to first token", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 1.5, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("edgeq_time_per_output_token_seconds", "time between generated tokens", registry=r,
                              buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2))
        Gauge("edgeq_queue_depth", "requests waiting for a slot", registry=r).set_function(lambda: sched.queue_depth)
        Gauge("edgeq_slots_active", "slots running a request", registry=r).set_function(lambda: sched.active_slots)
        Gauge("edgeq_slots_total", "slots (--parallel)", registry=r).set_function(lambda: len(sched.slots))
        Gauge("edgeq_kv_cache_tokens", "positions held in the slots' KV caches", registry=r).set_function(
            lambda: sched.kv_tokens)
        Gauge("edgeq_kv_cache_capacity_tokens", "positions the slots' KV caches can hold", registry=r).set_function(
            lambda: len(sched.slots) * sched.n_ctx)
        Gauge("edgeq_kv_cache_bytes", "bytes allocated for the slots' KV caches", registry=r).set_function(
            lambda: sched.kv_bytes)
        r.register(_EngineTime(sched))

    def observe(self, done: Done) -> None:
        self.prompt_tokens.inc(done.prompt_tokens)
        self.cached_tokens.inc(done.cached_tokens)
        self.generated_tokens.inc(done.completion_tokens)
        if done.completion_tokens:
            self.ttft.observe(done.ttft_s)


class _EngineTime:
    """Counters the scheduler keeps itself (read at each scrape): seconds and counts of forward passes by phase,
    decode steps (every pass that decodes: decode and mixed) and the sequences they carried (rows / steps = the
    mean decode batch); the prompt chunk it chose."""

    def __init__(self, sched):
        self.sched = sched

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        busy = CounterMetricFamily("edgeq_engine_seconds", "time in forward passes, by phase", labels=["phase"])
        for phase, seconds in sorted(self.sched.busy_s.items()):
            busy.add_metric([phase], seconds)
        yield busy
        passes = CounterMetricFamily("edgeq_engine_passes", "forward passes, by phase (a prompt chunk alone, decoding "
                                     "slots alone, both in one pass: mixed)", labels=["phase"])
        for phase, n in sorted(self.sched.passes.items()):
            passes.add_metric([phase], n)
        yield passes
        yield CounterMetricFamily("edgeq_decode_steps", "decode forward passes (one token of each decoding slot)",
                                  value=self.sched.decode_steps)
        yield CounterMetricFamily("edgeq_decode_rows", "sequences advanced by the decode passes, summed",
                                  value=self.sched.decode_rows)
        yield GaugeMetricFamily("edgeq_prefill_chunk_tokens", "prompt tokens evaluated per step at most (what fits "
                                "in ~0.1 s on this machine, as measured so far)", value=self.sched.prefill_chunk)


# ---------------------------------------------------------------- the guard (pure ASGI)
class Guard:
    """Host check, API key, body size limit, request counting: before any route runs."""

    def __init__(self, app, opts: ServerOptions, metrics: Metrics):
        self.app, self.opts, self.metrics = app, opts, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status_box = {"status": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            error = self._check(scope)
            if error is None:
                body, error = await self._read_body(scope, receive)
            if error is not None:
                await error_response(path, error)(scope, receive, counting_send)
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status_box["status"])).inc()

    def _check(self, scope) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.opts.loopback_only:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if name.lower() not in LOOPBACK_NAMES:
                return ApiError(403, "this server answers requests for localhost only (Host header "
                                     f"{host[:64]!r})", type="forbidden", code="host_not_allowed")
        if self.opts.api_key and scope.get("path") != "/health" and scope.get("method") != "OPTIONS":
            auth = headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), self.opts.api_key.encode()):
                return ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                type="authentication_error", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.opts.max_body):
            return ApiError(413, f"request body over {self.opts.max_body} bytes", code="body_too_large")
        return None

    async def _read_body(self, scope, receive) -> tuple[bytes, ApiError | None]:
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return b"", None
        chunks, n = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", ApiError(400, "client disconnected")
            chunk = message.get("body", b"")
            n += len(chunk)
            if n > self.opts.max_body:
                return b"", ApiError(413, f"request body over {self.opts.max_body} bytes", code="body_too_large")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks), None


# ---------------------------------------------------------------- the service
class Service:
    """What the routes share: the model, its scheduler, the grammar vocabulary, names, metrics."""

    def __init__(self, model, sched, opts: ServerOptions):
        from edgeq.runtime.tool_calls import tool_style

        self.model, self.sched, self.opts = model, sched, opts
        self.metrics = Metrics(sched)
        # the scheduler thread's events, handed to the event loop once per step (sched.on_step): one wake-up of
        # the loop for all the step's streams, not one per token
        self._outbox: list[tuple[asyncio.Queue, Any]] = []
        self._outbox_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        sched.on_step = self._flush
        self.created = int(time.time())
        self.tool_style = tool_style(model.template.source if model.template else None)
        self._vocab = None
        self._vocab_lock = threading.Lock()
        self._digest: str | None = None
        stem = model.path.stem
        self.names = {opts.model_name, stem, str(model.gguf.get("general.name", stem))}
        self.names |= {n.lower() for n in self.names}

    # --- helpers
    def check_model(self, name: str) -> None:
        base = name[:-len(":latest")] if name.endswith(":latest") else name
        if base not in self.names and base.lower() not in self.names:
            raise ApiError(404, f"model {name[:80]!r} not found (this server serves {self.opts.model_name!r})",
                           code="model_not_found")

    def grammar_vocab(self):
        from edgeq.runtime.grammar import GrammarVocab

        with self._vocab_lock:
            if self._vocab is None:
                self._vocab = GrammarVocab(self.model.tokenizer, self.model.cfg.n_vocab)
            return self._vocab

    def constraint(self, grammar: str):
        from edgeq.runtime.grammar import Constraint

        return Constraint(self.grammar_vocab(), grammar)

    def digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256()
            with open(self.model.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._digest = h.hexdigest()
        return self._digest

    def chat_ids(self, messages: list[dict], tools: list[dict] | None, template_kwargs: dict | None = None
                 ) -> list[int]:
        try:
            return self.model.chat_ids(messages, tools, template_kwargs)
        except EdgeqError as e:  # the template refused the conversation
            raise ApiError(400, str(e), param="messages") from None

    def think_splitter(self, ids: list[int]):
        """A ThinkSplitter for the reply to prompt `ids` when the model's template thinks, else None."""
        from edgeq.runtime.reasoning import ThinkSplitter, prompt_opens_thinking

        if not self.model.thinks:
            return None
        return ThinkSplitter(in_reasoning=prompt_opens_thinking(self.model.tokenizer.decode(ids[-16:])))

    def gen_request(self, ids: list[int], max_tokens: int | None, *, temperature: float, top_p: float, top_k: int,
                    min_p: float, repeat_penalty: float, seed: int | None, stop: list[str],
                    presence: float = 0.0, frequency: float = 0.0, logprobs: int | None = None,
                    constraint=None, n_ctx: int | None = None, logit_bias: dict[int, float] | None = None
                    ) -> GenRequest:
        n_ctx = min(n_ctx or self.sched.n_ctx, self.sched.n_ctx)
        bias = None
        if logit_bias:
            n_vocab = self.model.cfg.n_vocab
            if max(logit_bias) >= n_vocab:
                raise ApiError(400, f"logit_bias: token ids must be in 0..{n_vocab - 1}", param="logit_bias",
                               code="invalid_value")
            bias = (np.fromiter(logit_bias.keys(), np.int64, len(logit_bias)),
                    np.fromiter(logit_bias.values(), np.float32, len(logit_bias)))
        if max_tokens is not None and max_tokens > self.sched.n_ctx:
            raise ApiError(400, f"max_tokens {max_tokens} is beyond the context ({self.sched.n_ctx} tokens)",
                           param="max_tokens", code="invalid_value")
        if len(ids) >= n_ctx:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; the context is {n_ctx} (prompts are never "
                                "truncated: shorten it or start the server with a larger --ctx)",
                           param="messages", code="context_length_exceeded")
        room = n_ctx - len(ids)
        max_tokens = room if max_tokens is None else min(max_tokens, room)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=None if seed is None else seed % (1 << 64))
        return GenRequest(ids, max_tokens, params, list(stop or []), presence, frequency, logprobs, constraint,
                          self.opts.request_timeout, bias)

    def _flush(self) -> None:  # on the scheduler thread, after each step
        with self._outbox_lock:
            items, self._outbox = self._outbox, []
        if items:
            try:
                self._loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop has closed (the server is stopping): nobody waits for them
                pass

    def submit(self, req: GenRequest):
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        last = {"t": None}
        metrics = self.metrics

        def on_event(ev):  # runs on the scheduler thread
            if isinstance(ev, Piece) and ev.tokens:
                now = time.perf_counter()
                if last["t"] is not None:
                    metrics.tpot.observe(now - last["t"])
                last["t"] = now
            elif isinstance(ev, Done):
                metrics.observe(ev)
            with self._outbox_lock:
                self._outbox.append((queue, ev))

        try:
            job = self.sched.submit(req, on_event)
        except QueueFull as e:
            raise ApiError(503, str(e), type="server_busy", code="queue_full", headers={"Retry-After": "1"}) from None
        except EdgeqError as e:
            raise ApiError(400, str(e)) from None
        return Stream(job, queue)

    def not_ready(self) -> ApiError | None:
        if self.sched.failed:
            return ApiError(503, f"the model failed to start: {self.sched.failed}", type="server_error")
        if not self.sched.ready.is_set():
            return ApiError(503, "the model is loading", type="server_busy", code="loading",
                            headers={"Retry-After": "5"})
        return None


def _deliver(items: list) -> None:
    for queue, ev in items:
        queue.put_nowait(ev)


class Stream:
    """A submitted job's events, consumed from the event loop; leaving early cancels the job."""

    def __init__(self, job, queue: asyncio.Queue):
        self.job, self.queue = job, queue
        self.done: Done | None = None

    async def events(self):
        try:
            while True:
                ev = await self.queue.get()
                if isinstance(ev, Done):
                    self.done = ev
                yield ev
                if isinstance(ev, Done):
                    return
        finally:
            if self.done is None:
                self.job.cancel()

    async def collect(self, request) -> tuple[str, list, Done]:
        """All the text (for a non-streaming reply), cancelling the job if the client goes away."""
        text, infos = [], []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise ApiError(499, "client disconnected") from None
                    continue
                if isinstance(ev, Piece):
                    text.append(ev.text)
                    infos.extend(ev.tokens)
                else:
                    self.done = ev
                    return "".join(text), infos, ev
        finally:
            if self.done is None:
                self.job.cancel()


def _split_all(think, text: str) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply through a fresh ThinkSplitter's state."""
    reasoning, content = think.feed_pair(text)
    r2, c2 = think.flush_pair()
    return reasoning + r2, content + c2


@dataclass
class Delta:
    """A streamed piece as the APIs show it: the answer's text and, for thinking models, the reasoning text
    (a <think> block split off by the reply's ThinkSplitter); tokens carry the logprobs."""
    text: str
    reasoning: str
    tokens: list


@dataclass
class Final:
    """The end of a streamed reply, as every API ends it."""
    done: Done
    finish: str                # finish_reason: stop, length, or tool_calls when calls were parsed
    content: str | None        # with tools: the held text less its calls (None or "": nothing)
    calls: list | None         # with tools: the parsed calls, OpenAI-shaped


def _failed(done: Done) -> ApiError:
    return ApiError(500, done.error or "generation failed", type="server_error", code="internal_error")


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


# ---------------------------------------------------------------- the app
def create_app(model, sched, opts: ServerOptions):
    from fastapi import FastAPI
    from sse_starlette.sse import EventSourceResponse

    from edgeq import __version__
    from edgeq.runtime import grammar as G
    from edgeq.runtime.tool_calls import forced_call_grammar, parse_tool_calls

    svc = Service(model, sched, opts)
    app = FastAPI(title="edgeq", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc
    app.add_middleware(Guard, opts=opts, metrics=svc.metrics)
    tok = model.tokenizer

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(request.url.path, e)

    @app.exception_handler(G.GrammarError)
    async def _grammar_error(request: Request, e: G.GrammarError):
        return error_response(request.url.path, ApiError(400, str(e), param="response_format"))

    @app.exception_handler(404)
    async def _not_found(request: Request, e):
        return error_response(request.url.path, ApiError(404, f"no route {request.url.path[:100]}", code="not_found"))

    @app.exception_handler(405)
    async def _bad_method(request: Request, e):
        return error_response(request.url.path, ApiError(405, f"method {request.method} not allowed here"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error_response(request.url.path, ApiError(500, f"internal error: {type(e).__name__}",
                                                         type="server_error"))

    def ready():
        err = svc.not_ready()
        if err is not None:
            raise err

    def token_str(i: int) -> str:
        return tok.token_bytes(i).decode("utf-8", errors="replace")

    def response_constraint(fmt: P.ResponseFormat | None):
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return svc.constraint(G.json_schema_grammar(None))
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        return svc.constraint(G.json_schema_grammar(fmt.json_schema.schema_))

    # ------------------------------------------------------------ health, metrics, models
    @app.get("/health")
    async def health():
        err = svc.not_ready()
        if err is not None:
            return JSONResponse({"status": "error" if sched.failed else "loading", "message": err.message},
                                status_code=503, headers=err.headers)
        return {"status": "ok", "slots_total": len(sched.slots), "slots_active": sched.active_slots}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": opts.model_name, "object": "model", "created": svc.created,
                                            "owned_by": "edgeq", "context_length": sched.n_ctx}]}

    # ------------------------------------------------------------ OpenAI chat
    def openai_messages(msgs: list[P.ChatMessage]) -> list[dict]:
        out = []
        for m in msgs:
            if isinstance(m.content, list) and any(p.type not in ("text", "input_text") for p in m.content):
                raise ApiError(400, "only text content is supported (this is a text model)", param="messages",
                               code="unsupported_value")
            d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                calls = []
                for c in m.tool_calls:
                    args = c.function.arguments
                    if isinstance(args, str):
                        try:
                            args = json.loads(args) if args.strip() else {}
                        except ValueError:
                            raise ApiError(400, "tool_calls arguments must be JSON", param="messages") from None
                    calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                               "arguments": args}})
                d["tool_calls"] = calls
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
            if m.reasoning_content is not None:
                d["reasoning_content"] = m.reasoning_content
            out.append(d)
        return out

    def tool_setup(tools: list[P.Tool] | None, choice) -> tuple[list[dict] | None, object]:
        """(tools for the template, the forced-call constraint or None)."""
        if not tools or choice == "none":
            return None, None
        if svc.tool_style is None:
            raise ApiError(400, "this model's chat template does not render tools", param="tools")
        dicts = [t.model_dump(exclude_none=True) for t in tools]
        forced = None
        if choice == "required":
            forced = dicts
        elif isinstance(choice, P.NamedToolChoice):
            name = choice.function.get("name")
            forced = [d for d in dicts if d["function"]["name"] == name]
            if not forced:
                raise ApiError(400, f"tool_choice names {str(name)[:64]!r}, which is not in tools", param="tool_choice")
        constraint = svc.constraint(G.lark_grammar(forced_call_grammar(forced, svc.tool_style))) if forced else None
        return dicts, constraint

    def tool_result(text: str, finish: str, tools_on: bool):
        """(content, tool_calls or None, finish_reason)."""
        if not tools_on or finish == "length":
            return text, None, finish
        parsed = parse_tool_calls(text, svc.tool_style)
        if parsed is None:
            return text, None, finish
        content, calls = parsed
        out = [{"id": "call_" + secrets.token_hex(12), "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
               for c in calls]
        return content or None, out, "tool_calls"

    def chat_logprobs(infos) -> dict:
        return {"content": [{"token": token_str(t.id), "logprob": t.logprob, "bytes": list(tok.token_bytes(t.id)),
                             "top_logprobs": [{"token": token_str(i), "logprob": lp, "bytes": list(tok.token_bytes(i))}
                                              for i, lp in t.top]} for t in infos]}

    def usage(done: Done) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}

    def finish_reason(done: Done) -> str:
        return "length" if done.finish == "length" else "stop"

    async def reply_events(stream: Stream, tools_on: bool, think=None):
        """The one streaming loop all four streaming routes wrap: a Delta per piece (the answer held back while
        tools are on: the text may be a call; a thinking model's <think> block split off by `think`, a
        ThinkSplitter), then an ApiError (the request failed) or the Final."""
        held = []
        async for ev in stream.events():
            if isinstance(ev, Piece):
                reasoning, text = think.feed_pair(ev.text) if think is not None else ("", ev.text)
                tokens = ev.tokens
            elif ev.finish != "error" and think is not None:  # the end: what the splitter held back
                (reasoning, text), tokens = think.flush_pair(), []
            else:
                reasoning, text, tokens = "", "", []
            if tools_on:
                held.append(text)
                text, tokens = "", []
            if text or reasoning or tokens:
                yield Delta(text, reasoning, tokens)
            if isinstance(ev, Piece):
                continue
            if ev.finish == "error":
                yield _failed(ev)
            else:
                content, calls, fin = tool_result("".join(held), finish_reason(ev), tools_on)
                yield Final(ev, fin, content, calls)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await request.body()
        r = parse(P.ChatRequest, body)
        svc.check_model(r.model)
        if r.n != 1:
            raise ApiError(400, "n must be 1 (one choice per request)", param="n", code="unsupported_value")
        ready()
        tools, forced = tool_setup(r.tools, r.tool_choice)
        constraint = forced or response_constraint(r.response_format)
        ids = svc.chat_ids(openai_messages(r.messages), tools, r.chat_template_kwargs)
        think = svc.think_splitter(ids)
        k = (r.top_logprobs or 0) if r.logprobs else None
        req = svc.gen_request(ids, r.max_completion_tokens or r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, min_p=r.min_p, repeat_penalty=r.repeat_penalty, seed=r.seed, stop=r.stop,
                              presence=r.presence_penalty, frequency=r.frequency_penalty, logprobs=k,
                              constraint=constraint, logit_bias=r.logit_bias)
        stream = svc.submit(req)
        cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        tools_on = tools is not None
        if not r.stream:
            text, infos, done = await stream.collect(request)
            if done.finish == "error":
                raise _failed(done)
            reasoning = ""
            if think is not None:
                reasoning, text = _split_all(think, text)
            content, calls, fin = tool_result(text, finish_reason(done), tools_on)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = calls
            return {"id": cid, "object": "chat.completion", "created": created, "model": opts.model_name,
                    "system_fingerprint": f"edgeq-{__version__}",
                    "choices": [{"index": 0, "message": message, "logprobs": chat_logprobs(infos) if k is not None
                                 else None, "finish_reason": fin}],
                    "usage": usage(done)}

        def chunk(delta: dict, fin=None, logprobs=None) -> str:
            return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                               "model": opts.model_name, "system_fingerprint": f"edgeq-{__version__}",
                               "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": fin}]},
                              ensure_ascii=False)

        async def sse():
            yield {"data": chunk({"role": "assistant", "content": ""})}
            async for ev in reply_events(stream, tools_on, think):
                if isinstance(ev, Delta):
                    if ev.reasoning:
                        yield {"data": chunk({"reasoning_content": ev.reasoning})}
                    if ev.text or (ev.tokens and not ev.reasoning):
                        yield {"data": chunk({"content": ev.text},
                                             logprobs=chat_logprobs(ev.tokens) if k is not None else None)}
                elif isinstance(ev, ApiError):
                    yield {"data": json.dumps({"error": {"message": ev.message, "type": ev.type, "code": ev.code}})}
                    return
                else:
                    if ev.calls:
                        yield {"data": chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(ev.calls)]})}
                    elif ev.content:
                        yield {"data": chunk({"content": ev.content})}
                    yield {"data": chunk({}, ev.finish)}
                    if r.stream_options and r.stream_options.include_usage:
                        yield {"data": json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                                   "model": opts.model_name, "choices": [],
                                                   "usage": usage(ev.done)})}
            yield {"data": "[DONE]"}

        return EventSourceResponse(sse(), ping=15)

    # ------------------------------------------------------------ OpenAI text completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.body()
        r = parse(P.CompletionRequest, body)
        svc.check_model(r.model)
        if r.n != 1:
            raise ApiError(400, "n must be 1 (one choice per request)", param="n", code="unsupported_value")
        if r.echo or r.suffix:
            raise ApiError(400, "echo and suffix are not supported", param="echo" if r.echo else "suffix")
        ready()
        p = r.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            ids = [int(t) for t in p]
            if min(ids) < 0 or max(ids) >= model.cfg.n_vocab:
                raise ApiError(400, f"prompt token ids must be in 0..{model.cfg.n_vocab - 1}", param="prompt")
        else:
            if isinstance(p, list):
                if len(p) != 1:
                    raise ApiError(400, "prompt must be one string (batched prompts are not supported)",
                                   param="prompt")
                p = p[0]
            ids = model.encode_prompt(p)
        if not ids:
            raise ApiError(400, "empty prompt", param="prompt")
        req = svc.gen_request(ids, r.max_tokens if r.max_tokens is not None else 16, temperature=r.temperature,
                              top_p=r.top_p, top_k=r.top_k, min_p=r.min_p, repeat_penalty=r.repeat_penalty,
                              seed=r.seed, stop=r.stop, presence=r.presence_penalty, frequency=r.frequency_penalty,
                              logprobs=r.logprobs, constraint=response_constraint(r.response_format),
                              logit_bias=r.logit_bias)
        stream = svc.submit(req)
        cid, created = "cmpl-" + secrets.token_hex(12), int(time.time())

        def logprobs_block(infos, offset0: int = 0) -> dict:
            offsets, pos = [], offset0
            for t in infos:
                offsets.append(pos)
                pos += len(token_str(t.id))
            return {"tokens": [token_str(t.id) for t in infos], "token_logprobs": [t.logprob for t in infos],
                    "top_logprobs": [{token_str(i): lp for i, lp in t.top} for t in infos], "text_offset": offsets}

        if not r.stream:
            text, infos, done = await stream.collect(request)
            if done.finish == "error":
                raise _failed(done)
            return {"id": cid, "object": "text_completion", "created": created, "model": opts.model_name,
                    "system_fingerprint": f"edgeq-{__version__}",
                    "choices": [{"index": 0, "text": text, "finish_reason": finish_reason(done),
                                 "logprobs": logprobs_block(infos) if r.logprobs is not None else None}],
                    "usage": usage(done)}

        def chunk(text: str, fin=None, logprobs=None) -> str:
            return json.dumps({"id": cid, "object": "text_completion", "created": created, "model": opts.model_name,
                               "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": fin}]},
                              ensure_ascii=False)

        async def sse():
            async for ev in reply_events(stream, False):
                if isinstance(ev, Delta):
                    if ev.text or ev.tokens:
                        yield {"data": chunk(ev.text, logprobs=logprobs_block(ev.tokens) if r.logprobs is not None
                                             else None)}
                elif isinstance(ev, ApiError):
                    yield {"data": json.dumps({"error": {"message": ev.message, "type": ev.type, "code": ev.code}})}
                    return
                else:
                    yield {"data": chunk("", ev.finish)}
                    if r.stream_options and r.stream_options.include_usage:
                        yield {"data": json.dumps({"id": cid, "object": "text_completion", "created": created,
                                                   "model": opts.model_name, "choices": [], "usage": usage(ev.done)})}
            yield {"data": "[DONE]"}

        return EventSourceResponse(sse(), ping=15)

    # ------------------------------------------------------------ ollama
    def ollama_details() -> dict:
        info = model.info
        n_params = sum(int(np.prod(t.shape)) for t in model.gguf.tensors.values())
        return {"parent_model": "", "format": "gguf", "family": info["arch"], "families": [info["arch"]],
                "parameter_size": f"{n_params / 1e6:.0f}M" if n_params < 1e9 else f"{n_params / 1e9:.1f}B",
                "quantization_level": str(info["qtype"]).upper()}

    def ollama_sampling(o: P.OllamaOptions | None, fmt, ids: list[int]) -> GenRequest:
        o = o or P.OllamaOptions()
        if fmt == "json":
            constraint = svc.constraint(G.json_schema_grammar(None))
        elif isinstance(fmt, dict):
            constraint = svc.constraint(G.json_schema_grammar(fmt))
        else:
            constraint = None
        n_predict = o.num_predict if o.num_predict is not None and o.num_predict >= 0 else None
        if n_predict == 0:
            raise ApiError(400, "num_predict must be >= 1 (or -1: until the context is full)", param="num_predict")
        return svc.gen_request(
            ids, n_predict, temperature=0.8 if o.temperature is None else o.temperature,
            top_p=0.9 if o.top_p is None else o.top_p, top_k=40 if o.top_k is None else o.top_k,
            min_p=0.0 if o.min_p is None else o.min_p, repeat_penalty=o.repeat_penalty or 1.0, seed=o.seed,
            stop=[s for s in (o.stop or []) if s], presence=o.presence_penalty or 0.0,
            frequency=o.frequency_penalty or 0.0, constraint=constraint, n_ctx=o.num_ctx)

    def ollama_final(done: Done, t0: float) -> dict:
        return {"done": True, "done_reason": finish_reason(done), "total_duration": _ns(time.perf_counter() - t0),
                "load_duration": 0, "prompt_eval_count": done.prompt_tokens, "prompt_eval_duration": _ns(done.ttft_s),
                "eval_count": done.completion_tokens, "eval_duration": _ns(done.gen_s)}

    def ndjson(gen):
        async def lines():
            async for obj in gen:
                yield json.dumps(obj, ensure_ascii=False) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/api/chat")
    async def ollama_chat(request: Request):
        t0 = time.perf_counter()
        r = parse(P.OllamaChatRequest, await request.body())
        svc.check_model(r.model)
        ready()
        if not r.messages:  # ollama's "load the model" request
            return {"model": r.model, "created_at": _now_iso(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": "load"}
        tools, _ = tool_setup(r.tools, "auto")
        msgs = []
        for m in r.messages:
            if m.images:
                raise ApiError(400, "images are not supported (this is a text model)")
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.thinking is not None:
                d["reasoning_content"] = m.thinking
            if m.tool_calls:
                d["tool_calls"] = [{"type": "function", "function": {"name": c.function.name,
                                                                     "arguments": c.function.arguments}}
                                   for c in m.tool_calls]
            msgs.append(d)
        # think: true/false sets the template's enable_thinking; ("high", "low"...: gpt-oss levels, taken as on)
        ids = svc.chat_ids(msgs, tools, None if r.think is None else {"enable_thinking": r.think is not False})
        think = svc.think_splitter(ids)
        stream = svc.submit(ollama_sampling(r.options, r.format, ids))
        tools_on = tools is not None

        def message(content: str | None, calls: list | None, thinking: str = "") -> dict:
            msg: dict[str, Any] = {"role": "assistant", "content": content or ""}
            if thinking:
                msg["thinking"] = thinking
            if calls:
                msg["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                                   "arguments": json.loads(c["function"]["arguments"])}}
                                     for c in calls]
            return msg

        if not r.stream:
            text, _, done = await stream.collect(request)
            if done.finish == "error":
                raise _failed(done)
            thinking = ""
            if think is not None:
                thinking, text = _split_all(think, text)
            content, calls, _ = tool_result(text, finish_reason(done), tools_on)
            return {"model": r.model, "created_at": _now_iso(), "message": message(content, calls, thinking),
                    **ollama_final(done, t0)}

        def part(text: str, thinking: str) -> dict:
            msg = {"role": "assistant", "content": text, **({"thinking": thinking} if thinking else {})}
            return {"model": r.model, "created_at": _now_iso(), "message": msg, "done": False}

        async def gen():
            async for ev in reply_events(stream, tools_on, think):
                if isinstance(ev, Delta):
                    if ev.text or ev.reasoning:
                        yield part(ev.text, ev.reasoning)
                elif isinstance(ev, ApiError):
                    yield {"error": ev.message}
                else:
                    yield {"model": r.model, "created_at": _now_iso(), "message": message(ev.content, ev.calls),
                           **ollama_final(ev.done, t0)}

        return ndjson(gen())

    @app.post("/api/generate")
    async def ollama_generate(request: Request):
        t0 = time.perf_counter()
        r = parse(P.OllamaGenerateRequest, await request.body())
        svc.check_model(r.model)
        ready()
        if r.images:
            raise ApiError(400, "images are not supported (this is a text model)")
        if not r.prompt:
            return {"model": r.model, "created_at": _now_iso(), "response": "", "done": True, "done_reason": "load"}
        think = None
        if r.raw or model.template is None:
            ids = model.encode_prompt(((r.system + "\n\n") if r.system and not r.raw else "") + r.prompt)
        else:
            msgs = ([{"role": "system", "content": r.system}] if r.system else []) + [{"role": "user",
                                                                                       "content": r.prompt}]
            ids = svc.chat_ids(msgs, None, None if r.think is None else {"enable_thinking": r.think is not False})
            think = svc.think_splitter(ids)  # a thinking model's <think> block goes to "thinking", as /api/chat
        stream = svc.submit(ollama_sampling(r.options, r.format, ids))

        def part(text: str, thinking: str = "") -> dict:
            return {"model": r.model, "created_at": _now_iso(), "response": text,
                    **({"thinking": thinking} if thinking else {})}

        if not r.stream:
            text, _, done = await stream.collect(request)
            if done.finish == "error":
                raise _failed(done)
            thinking = ""
            if think is not None:
                thinking, text = _split_all(think, text)
            return {**part(text, thinking), **ollama_final(done, t0)}

        async def gen():
            async for ev in reply_events(stream, False, think):
                if isinstance(ev, Delta):
                    if ev.text or ev.reasoning:
                        yield {**part(ev.text, ev.reasoning), "done": False}
                elif isinstance(ev, ApiError):
                    yield {"error": ev.message}
                else:
                    yield {**part(""), **ollama_final(ev.done, t0)}

        return ndjson(gen())

    def ollama_entry() -> dict:
        return {"name": opts.model_name, "model": opts.model_name, "size": model.path.stat().st_size,
                "digest": svc.digest(), "details": ollama_details()}

    @app.get("/api/tags")
    async def ollama_tags():
        mtime = datetime.fromtimestamp(model.path.stat().st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
        return {"models": [{**ollama_entry(), "modified_at": mtime}]}

    @app.get("/api/ps")
    async def ollama_ps():
        return {"models": [{**ollama_entry(), "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0,
                            "context_length": sched.n_ctx}]}

    @app.post("/api/show")
    async def ollama_show(request: Request):
        r = parse(P.OllamaShowRequest, await request.body())
        name = r.model or r.name
        if not name:
            raise ApiError(400, "model is required", param="model")
        svc.check_model(name)
        arch = model.gguf.arch
        caps = ["completion"] + (["tools"] if svc.tool_style else [])
        return {"modelfile": "", "parameters": "", "template": model.template.source if model.template else "",
                "details": ollama_details(), "capabilities": caps,
                "model_info": {"general.architecture": arch, f"{arch}.context_length": model.cfg.n_ctx_train,
                               f"{arch}.embedding_length": model.cfg.n_embd, f"{arch}.block_count": model.cfg.n_layer}}

    @app.get("/api/version")
    async def ollama_version():
        return {"version": __version__}

    return app

"""`edgeq serve`: an OpenAI- and ollama-compatible HTTP server over the continuous-batching scheduler.

    server = start_server(model, port=0)          # a free loopback port, in a background thread
    print(server.url); ...; server.stop()

Needs the `serve` extra: pip install 'edgeq[serve]' (FastAPI, uvicorn, sse-starlette, prometheus-client,
llguidance).
"""
from __future__ import annotations

import ipaddress
import socket
import threading

from edgeq.serve.app import ServerOptions, create_app  # noqa: F401

__all__ = ["ServerOptions", "create_app", "exposure_warning", "is_loopback", "make_server", "start_server", "Server"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server others can reach without a key (None when bound to loopback or keyed)."""
    if is_loopback(host) or api_key:
        return None
    return (f"warning: listening on {host} without an API key: anyone who can reach this address can use the model "
            "(set --api-key or EDGEQ_API_KEY)")


class Server:
    """A running server: uvicorn on its own thread, the scheduler on another."""

    def __init__(self, model, sched, opts: ServerOptions, host: str = "127.0.0.1", port: int = 8080):
        import uvicorn

        self.sched = sched
        self.app = create_app(model, sched, opts)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host.strip("[]"), port))
        self.host, self.port = host, self.sock.getsockname()[1]
        # lifespan off: the app has no startup or shutdown hooks, and uvicorn's lifespan task logged its cancellation
        # as a traceback when a second Ctrl-C came during the shutdown
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                                limit_concurrency=1024, lifespan="off")
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until interrupted (blocking)."""
        self.sched.start()
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.sched.stop()

    def start(self) -> "Server":
        self.sched.start()
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                        name="edgeq-http")
        self._thread.start()
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.sched.stop()
        self.sock.close()


def start_server(model, host: str = "127.0.0.1", port: int = 0, **kw) -> Server:
    """Start a server in background threads (tests, benchmarks, embedding); `Server.stop()` ends it. Options as
    make_server's."""
    return make_server(model, host, port, **kw).start()


def make_server(model, host: str = "127.0.0.1", port: int = 8080, n_slots: int = 4, n_ctx: int | None = None,
                max_queue: int = 64, api_key: str | None = None, cors_origin: str | None = None,
                model_name: str | None = None, request_timeout: float = 600.0, max_body: int = 8 << 20,
                prefill_chunk: int | None = None, cache_type_k: str | None = None,
                cache_type_v: str | None = None, prompt_reuse: bool = True, packed_weights: bool = True) -> Server:
    from edgeq.runtime.scheduler import Scheduler

    sched = Scheduler(model, n_slots=n_slots, n_ctx=n_ctx, max_queue=max_queue, prefill_chunk=prefill_chunk,
                      cache_type_k=cache_type_k, cache_type_v=cache_type_v, prompt_reuse=prompt_reuse,
                      packed_weights=packed_weights)
    opts = ServerOptions(model_name=model_name or model.path.stem, api_key=api_key or None, cors_origin=cors_origin,
                         loopback_only=is_loopback(host), max_body=max_body, request_timeout=request_timeout)
    server = Server(model, sched, opts, host, port)
    if cors_origin:
        from starlette.middleware.cors import CORSMiddleware

        server.app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["*"],
                                  allow_headers=["*"])
    return server

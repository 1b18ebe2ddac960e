"""`edgeq serve [MODEL]`: an OpenAI- and ollama-compatible HTTP server with continuous batching."""
from __future__ import annotations

import os
import sys

from edgeq.cli.common import add_cache_args, add_mmap_arg

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None, help=f"GGUF file or catalog name (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--parallel", type=int, default=4, help="requests decoded together (slots), default 4")
    p.add_argument("--ctx", type=int, default=None, help="context per slot in tokens (default: min(trained, 4096))")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503 (default 64)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (default: $EDGEQ_API_KEY)")
    p.add_argument("--cors-origin", default=None, help="allow browser requests from this origin (default: none)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may run (default 600)")
    p.add_argument("--name", default=None, help="model name clients use (default: MODEL as given)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prompt tokens per step at most (default: what this machine evaluates in ~0.1 s, 32..256)")
    p.add_argument("--no-prompt-reuse", action="store_true",
                   help="evaluate every prompt from the start (to measure what reuse saves)")
    p.add_argument("--no-packed-weights", action="store_true",
                   help="no second copy of the 4-, 5- and 8-bit legacy matrices packed for batches: less memory "
                        "(up to the model file's size), slower batches (see README)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores, at most 8)")
    add_cache_args(p)
    add_mmap_arg(p)


def main(a) -> int:
    from edgeq.errors import EdgeqError
    from edgeq.runtime.engine import load

    try:
        from edgeq.serve import exposure_warning, make_server
    except ImportError as e:
        raise EdgeqError(f"the server needs its extra: pip install 'edgeq[serve]' ({e.name} is missing)") from None
    if a.threads is not None and a.threads < 1:
        raise EdgeqError("--threads must be >= 1")
    if not 0 <= a.port <= 65535:
        raise EdgeqError("--port must be in 0..65535")
    if a.parallel < 1 or a.parallel > 64:
        raise EdgeqError("--parallel must be in 1..64")
    if a.timeout <= 0:
        raise EdgeqError("--timeout must be > 0")
    if a.prefill_chunk is not None and not 1 <= a.prefill_chunk <= 4096:
        raise EdgeqError("--prefill-chunk must be in 1..4096")
    key = a.api_key or os.environ.get("EDGEQ_API_KEY") or None
    name = a.model or DEFAULT_MODEL
    model = load(name, n_ctx=a.ctx, threads=a.threads, cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v,
                 device="cpu", mmap=a.mmap)
    try:
        server = make_server(model, a.host, a.port, n_slots=a.parallel, n_ctx=a.ctx, max_queue=a.max_queue,
                             api_key=key, cors_origin=a.cors_origin, model_name=a.name or name,
                             request_timeout=a.timeout, cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v,
                             prompt_reuse=not a.no_prompt_reuse, prefill_chunk=a.prefill_chunk,
                             packed_weights=not a.no_packed_weights)
    except OSError as e:
        raise EdgeqError(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}") from None
    warning = exposure_warning(a.host, key)
    if warning:
        print(warning, file=sys.stderr)
    print(f"edgeq serve: {name} on {server.url} ({a.parallel} slots, context {server.sched.n_ctx}); "
          f"OpenAI API at {server.url}/v1, ollama API at {server.url}/api", file=sys.stderr)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0

"""`edgeq VERB ...`: each verb is one module with its own argparse (`add_arguments`, `main`)."""
from __future__ import annotations

import argparse
import importlib
import sys

from edgeq import startup

VERBS = {
    "chat": ("edgeq.cli.chat", "chat with a model in a terminal UI (default: SmolLM2-135M-Instruct)"),
    "run": ("edgeq.cli.run", "generate text from a prompt, streamed to stdout"),
    "convert": ("edgeq.cli.convert", "convert a Hugging Face checkpoint to one quantized GGUF file"),
    "quantize": ("edgeq.cli.quantize", "requantize a GGUF file to another type"),
    "perplexity": ("edgeq.cli.perplexity", "perplexity of a model on a text (llama-perplexity's method)"),
    "serve": ("edgeq.cli.serve", "an OpenAI- and ollama-compatible HTTP server (batches concurrent requests)"),
    "bench": ("edgeq.cli.bench", "prefill/decode speed, load time and peak memory"),
    "inspect": ("edgeq.cli.inspect", "show what a GGUF file holds"),
    "pull": ("edgeq.cli.pull", "download a catalog model or a hub GGUF repo (OWNER/REPO[:QUANT])"),
    "list": ("edgeq.cli.pull:list", "list local models"),
    "rm": ("edgeq.cli.pull:rm", "remove a local model"),
}


def _load(verb: str):
    target = VERBS[verb][0]
    mod_name, _, prefix = target.partition(":")
    mod = importlib.import_module(mod_name)
    add = getattr(mod, f"add_{prefix}_arguments" if prefix else "add_arguments")
    run = getattr(mod, f"{prefix}_main" if prefix else "main")
    return add, run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="edgeq", description="Offline LLM runner: GGUF models on the CPU.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    verb = argv[0]
    if verb not in VERBS:
        print(f"edgeq: unknown command {verb!r} (try: {', '.join(VERBS)})", file=sys.stderr)
        return 2
    if verb == "run":
        startup.pause()  # the collector off until the first token, or a compile (edgeq/startup.py)
    try:
        return _verb(verb, argv)
    finally:
        startup.resume()


def _verb(verb: str, argv: list[str]) -> int:
    try:
        add, run = _load(verb)
    except (ImportError, AttributeError) as e:
        print(f"edgeq {verb}: not available in this build ({e})", file=sys.stderr)
        return 2
    vp = argparse.ArgumentParser(prog=f"edgeq {verb}", description=VERBS[verb][1])
    add(vp)
    args = vp.parse_args(argv[1:])
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        from edgeq.cli.common import exit_now_if_threads_linger

        exit_now_if_threads_linger(130)  # e.g. a kernel compile that Ctrl-C interrupted
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # one clear line for every known failure, never a traceback
        from edgeq.errors import user_message
        from edgeq.text import safe_line

        msg = user_message(e)
        if msg is None:
            raise
        print(f"edgeq {verb}: {safe_line(msg)}", file=sys.stderr)  # names and metadata in it are untrusted
        return 1


if __name__ == "__main__":
    sys.exit(main())

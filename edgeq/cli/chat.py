"""`edgeq chat [PATH_OR_NAME]`: the terminal chat app (default model pulled on first use)."""
from __future__ import annotations

import argparse
import sys

from edgeq import assets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=assets.DEFAULT_MODEL,
                   help=f"GGUF file, local model or catalog name (default: {assets.DEFAULT_MODEL})")
    p.add_argument("--ctx", type=int, default=None, help="context size in tokens (default: min(trained, 4096))")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    from edgeq.cli.common import add_device_arg

    add_device_arg(p)
    p.add_argument("--temp", type=float, default=None, help="temperature for new chats (default 0.7)")
    p.add_argument("--top-p", type=float, default=None, help="top-p for new chats (default 0.95)")
    p.add_argument("--max-tokens", type=int, default=None, help="reply length limit for new chats (default 512)")
    p.add_argument("--system", default=None, help="system prompt for new chats")


def main(args: argparse.Namespace) -> int:
    from edgeq.tui.history import ChatSettings, History
    from edgeq.tui.app import ChatApp, describe_error

    def factory(ref: str, verbose: bool = False):
        """Load a model; the model picker calls it inside the UI, where nothing may print (verbose=False)."""
        from edgeq.runtime.engine import load

        from edgeq.cli.common import say

        report = say if verbose else None
        path = assets.resolve_model(ref, quiet=not verbose, report=report)
        model = load(path, n_ctx=args.ctx, threads=args.threads, device=args.device, report=report)
        if verbose:
            from edgeq.cli.common import note_device

            note_device(model, args.device)
        return model

    # everything that can fail before the UI starts fails here, as one line
    try:
        if args.model in assets.MODELS and not assets.is_local(args.model):
            print(f"first use: pulling {args.model} into {assets.models_dir()}", file=sys.stderr)
        model = factory(args.model, verbose=True)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - missing/corrupt file, failed download: one line, no traceback
        print(f"edgeq chat: cannot load {args.model}: {describe_error(e)}", file=sys.stderr)
        return 1

    given = {k: v for k, v in (("system", args.system), ("temperature", args.temp), ("top_p", args.top_p),
                               ("max_tokens", args.max_tokens)) if v is not None}
    defaults = ChatSettings(**given)
    ChatApp(model=model, model_factory=factory, history=History.default(), defaults=defaults,
            new_chat=bool(given)).run()
    from edgeq.cli.common import exit_now_if_threads_linger

    # quit while the model picker's load was compiling kernels: that thread cannot be stopped, do not wait for it
    exit_now_if_threads_linger(0)
    return 0

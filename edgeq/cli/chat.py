"""`edgeq chat [PATH_OR_NAME]`: the terminal chat app (default model pulled on first use)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeq import assets
from edgeq.text import safe_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=assets.DEFAULT_MODEL,
                   help=f"GGUF file, local model, catalog name or hub repo OWNER/REPO[:QUANT] "
                        f"(default: {assets.DEFAULT_MODEL})")
    p.add_argument("--ctx", type=int, default=None, help="context size in tokens (default: min(trained, 4096))")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    from edgeq.cli.common import add_device_arg, add_mmap_arg

    add_device_arg(p)
    add_mmap_arg(p)
    p.add_argument("--temp", type=float, default=None, help="temperature for new chats (default 0.7)")
    p.add_argument("--top-p", type=float, default=None, help="top-p for new chats (default 0.95)")
    p.add_argument("--max-tokens", type=int, default=None, help="reply length limit for new chats (default 512)")
    p.add_argument("--system", default=None, help="system prompt for new chats")
    from edgeq.cli.common import add_think_arg

    add_think_arg(p)


def main(args: argparse.Namespace) -> int:
    from edgeq.tui.history import ChatSettings, History
    from edgeq.tui.app import ChatApp, describe_error

    def factory(ref: str, verbose: bool = False, progress=None):
        """Load a model; the model picker calls it inside the UI, where nothing may print (verbose=False):
        there `progress(done, total, file)` shows a download's bytes."""
        from edgeq.cli.common import device_choice, download_progress
        from edgeq.runtime.engine import load

        from edgeq.cli.common import say

        report = (lambda line: say(safe_line(line, 1000))) if verbose else None
        bar = download_progress(True) if verbose else None
        try:
            path = assets.resolve_model(ref, quiet=not verbose, report=report, progress=progress or bar)
        finally:
            if bar:
                bar.finish()
        model = load(path, n_ctx=args.ctx, threads=args.threads, device=device_choice(args), report=report,
                     early_start=True, mmap=getattr(args, "mmap", None))
        if verbose:
            from edgeq.cli.common import note_device

            note_device(model, args)
        return model

    # the chat's own sampling options, refused before the slow load (NaN, out of range, -n 0)
    from edgeq.errors import EdgeqError
    from edgeq.runtime.sampling import SamplingParams

    if args.max_tokens is not None and args.max_tokens < 1:
        raise EdgeqError("--max-tokens must be >= 1")
    SamplingParams(**{k: v for k, v in (("temperature", args.temp), ("top_p", args.top_p)) if v is not None}).validate()

    # everything that can fail before the UI starts fails here, as one line
    try:
        from edgeq import hub

        if (args.model in assets.MODELS or hub.parse_ref(args.model)) and not Path(args.model).expanduser().exists() \
                and not assets.is_local(args.model):
            print(f"first use: pulling {args.model} into {assets.models_dir()}", file=sys.stderr)
        model = factory(args.model, verbose=True)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - missing/corrupt file, failed download: one line, no traceback
        print(f"edgeq chat: {safe_line(f'cannot load {args.model}: {describe_error(e)}')}", file=sys.stderr)
        return 1

    given = {k: v for k, v in (("system", args.system), ("temperature", args.temp), ("top_p", args.top_p),
                               ("max_tokens", args.max_tokens)) if v is not None}
    defaults = ChatSettings(**given)
    history = History.default()
    if history.note:  # a damaged or unwritable history file: said once, before the UI takes the screen
        print(f"note: {history.note}", file=sys.stderr)
    app = ChatApp(model=model, model_factory=factory, history=history, defaults=defaults, new_chat=bool(given),
                  enable_thinking=args.think)
    try:
        app.run()
    finally:
        history.close()
    from edgeq.cli.common import exit_now_if_threads_linger

    if app.fatal_message:
        print(f"edgeq chat: {safe_line(app.fatal_message)}", file=sys.stderr)
        exit_now_if_threads_linger(1)
        return 1
    # quit while the model picker's load was compiling kernels: that thread cannot be stopped, do not wait for it
    exit_now_if_threads_linger(0)
    return 0

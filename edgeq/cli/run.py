"""`edgeq run MODEL -p PROMPT`: stream a completion (or a chat reply with --chat) to stdout."""
from __future__ import annotations

import sys
import time

from edgeq import startup
from edgeq.cli.common import (add_model_args, add_sampling_args, add_think_arg, load_model, sampling_kwargs,
                              template_kwargs)
from edgeq.text import safe_terminal_text


def add_arguments(p):
    add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", default=None, help="prompt text (default: read from stdin)")
    src.add_argument("-f", "--file", default=None, help="read the prompt from this UTF-8 text file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    add_think_arg(p)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print load time and speeds at the end, and where the model runs")
    p.add_argument("--raw", action="store_true",
                   help="write the model's text as is, control characters included (only when stdout is not a "
                        "terminal; on a terminal they are always shown escaped)")
    add_sampling_args(p)


MAX_TOKEN_BYTES = 256  # bound on the vocabulary's longest token when sizing the prompt cap (the vocabulary is untrusted)


def prompt_limit(model) -> int:
    """Bytes beyond which a prompt cannot fit the context whatever its tokens: n_ctx × the longest token."""
    return model.n_ctx * max(1, min(model.tokenizer.max_token_bytes, MAX_TOKEN_BYTES))


def read_prompt(a, model) -> str:
    """-p, -f FILE or stdin, refused past prompt_limit before anything is tokenized (`< 50MB.txt` or
    `< /dev/zero` must not fill memory first)."""
    import os
    import stat

    from edgeq.errors import EdgeqError
    from edgeq.file_checks import open_input, read_text, shown

    limit = prompt_limit(model)
    why = f"it cannot fit in the {model.n_ctx}-token context"
    if a.prompt is not None:
        if len(a.prompt.encode("utf-8", "surrogateescape")) > limit:
            raise EdgeqError(f"the prompt is over {limit:,} bytes: {why}")
        return a.prompt
    if a.file is not None:
        with open_input(a.file, "prompt file") as f:
            return read_text(f, limit, f"prompt file {shown(a.file)}", why)
    stdin = getattr(sys.stdin, "buffer", sys.stdin)
    try:
        mode = os.fstat(stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise EdgeqError("stdin is a directory, not a prompt")
    return read_text(stdin, limit, "the prompt on stdin", why)


def main(a) -> int:
    t_start = time.perf_counter()
    if a.file is not None:
        from edgeq.file_checks import check_input_file

        check_input_file(a.file, "prompt file")  # before the model loads
    model = load_model(a)
    prompt = read_prompt(a, model)
    # The model's text (and a piped-in prompt) may hold escape sequences; a terminal must not obey them.
    # Escaping is per character, so a sequence split across pieces is caught too.
    show = (lambda text: text) if a.raw and not sys.stdout.isatty() else safe_terminal_text
    if a.chat:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": prompt}]
        pieces = model.chat(messages, template_kwargs=template_kwargs(a), **sampling_kwargs(a))
    else:
        pieces = model.generate(prompt, **sampling_kwargs(a))
        sys.stdout.write(show(prompt))
    first = None
    try:
        for piece in pieces:
            sys.stdout.write(show(piece))
            sys.stdout.flush()
            if first is None:
                first = time.perf_counter() - t_start
                startup.resume()  # the collector, off since launch (edgeq/startup.py)
    except KeyboardInterrupt:
        pieces.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 130
    sys.stdout.write("\n")
    sys.stdout.flush()
    if a.verbose:
        s = model.last_stats
        pe, ps = s.get("prompt_eval_tokens", 0), s.get("prompt_s", 0.0)
        gt, gs = s.get("gen_tokens", 0), s.get("gen_s", 0.0)
        print(f"load time:        {model.load_s:8.2f} s\n"
              f"first token:      {first if first is not None else float('nan'):8.2f} s after launch\n"
              f"prompt eval:      {pe:8d} tokens  {pe / ps if ps else 0:8.1f} tokens/s\n"
              f"decode:           {gt:8d} tokens  {gt / gs if gs else 0:8.1f} tokens/s", file=sys.stderr)
    return 0

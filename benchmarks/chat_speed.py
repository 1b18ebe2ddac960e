#!/usr/bin/env python3
"""How fast the chat app streams a reply, against the same reply from `Model.chat` alone.

    python benchmarks/chat_speed.py [--model smollm2-135m-instruct] [--tokens 200] [--turns 3] [--batch-s 0.05]

Runs the real ChatApp headless (Textual's `run_test`, a 120 x 40 virtual screen) on the real model, in a temporary
history folder: a long first question, then "Continue the story." for the other turns, temperature 0. Prints the
model's own rate for the first question (twice) and the app's rate per turn (`ChatApp.last_tps`: generated tokens
over the generation's wall time, the reader of the stream included). --batch-s sets how often the app pushes pieces
to the screen (edgeq/tui/app.py BATCH_S).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

QUESTION = "Tell me a very long story about a dragon and a knight, in detail."


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--batch-s", type=float, default=None)
    a = p.parse_args()
    os.environ["EDGEQ_HOME"] = tempfile.mkdtemp(prefix="edgeq-chat-speed-")  # the history, not the models
    import edgeq.tui.app as app_module
    from edgeq.runtime.engine import load
    from edgeq.tui.app import ChatApp, PromptInput
    from edgeq.tui.history import ChatSettings, History

    if a.batch_s is not None:
        app_module.BATCH_S = a.batch_s
    m = load(a.model, n_ctx=2048)
    messages = [{"role": "user", "content": QUESTION}]
    for _ in range(2):
        for _piece in m.chat(messages, max_tokens=a.tokens, temperature=0.0):
            pass
        print(f"Model.chat alone: {m.last_stats['gen_tokens'] / m.last_stats['gen_s']:.1f} tok/s")

    async def drive() -> None:
        history = History(os.path.join(os.environ["EDGEQ_HOME"], "chats.sqlite3"))
        app = ChatApp(model=m, history=history, defaults=ChatSettings(temperature=0.0, max_tokens=a.tokens))
        async with app.run_test(size=(120, 40)) as pilot:
            for turn in range(a.turns):
                box = app.query_one(PromptInput)
                box.focus()
                box.text = QUESTION if turn == 0 else "Continue the story."
                await pilot.press("enter")
                await pilot.pause()
                t_end = time.monotonic() + 120
                while app.generating and time.monotonic() < t_end:
                    await pilot.pause(0.05)
                await pilot.pause()
                print(f"app, turn {turn + 1}: {app.last_tps:.1f} tok/s ({m.last_stats['gen_tokens']} tokens)")

    asyncio.run(drive())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

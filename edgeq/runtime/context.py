"""The context budget: which turns of a conversation are sent so the prompt and the reply fit."""
from __future__ import annotations


def fit_messages(model, turns: list[dict], system: str = "", max_tokens: int = 256) -> tuple[list[dict], int]:
    """The messages to send: the system prompt + the newest turns that fit in the context together with
    `max_tokens` new tokens; and how many turns were dropped. A user turn and the assistant turn after it
    are dropped together; the kept turns never start with an assistant turn. The newest turn is always
    kept (the caller checks whether it fits alone)."""
    turns = [{"role": t["role"], "content": t["content"]} for t in turns
             if t.get("role") in ("user", "assistant") and t.get("content")]
    head = [{"role": "system", "content": system}] if system.strip() else []
    budget = model.n_ctx - max_tokens
    dropped = 0
    while len(turns) > 1 and model.count_chat_tokens(head + turns) > budget:
        n = 2 if turns[0]["role"] == "user" and len(turns) > 2 and turns[1]["role"] == "assistant" else 1
        del turns[:n]
        dropped += n
    while turns and turns[0]["role"] == "assistant":
        del turns[0]
        dropped += 1
    return head + turns, dropped

"""Thinking models' `<think>…</think>` blocks: split from the answer, also while the reply streams.

Qwen3 (and DeepSeek-R1 style models) write their reasoning between `<think>` and `</think>` before the answer.
The server returns it apart (OpenAI `reasoning_content`, ollama `message.thinking`), the chat shows it dimmed.
Tags can arrive split over several pieces ("<th", "ink>"): the splitter holds back a tail that could still
become a tag. A reply cut inside the block (max_tokens) is all reasoning.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
REASONING, CONTENT = "reasoning", "content"


def template_thinks(source: str | None) -> bool:
    """Whether a chat template knows thinking blocks (Qwen3's writes `<think>` and reads `enable_thinking`)."""
    return bool(source) and (OPEN in source or "enable_thinking" in source)


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt leaves a `<think>` block open (templates that start the reply in it)."""
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkSplitter:
    """Feed streamed text; get back (kind, text) parts, kind REASONING or CONTENT.

    Whitespace right after `<think>`, right before `</think>` and right after `</think>` is the template's
    layout, not the model's text: it is dropped (what ollama and llama-server return too). Only one block is
    taken, at the start of the reply: a `<think>` later in the answer is answer text."""

    def __init__(self, in_reasoning: bool = False):
        self.state = "reasoning" if in_reasoning else "start"  # start → reasoning → content
        self._held = ""       # text that could still be part of a tag, or whitespace kept back
        self._strip = in_reasoning  # drop the whitespace that opens the current part
        self.reasoning = ""   # everything said so far, by kind
        self.content = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        buf = self._held + text
        self._held = ""
        while buf:
            if self.state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(OPEN):
                    buf = stripped[len(OPEN):]
                    self.state, self._strip = "reasoning", True
                    continue
                if OPEN.startswith(stripped):  # whitespace, or a beginning of "<think>": wait for more
                    self._held = buf
                    break
                self.state = "content"
                continue
            if self.state == "reasoning":
                if self._strip:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    self._strip = False
                i = buf.find(CLOSE)
                if i >= 0:
                    self._emit(out, REASONING, buf[:i].rstrip())
                    buf = buf[i + len(CLOSE):]
                    self.state, self._strip = "content", True
                    continue
                keep = _partial_tag_len(buf, CLOSE)
                body = buf[:len(buf) - keep]
                ws = len(body) - len(body.rstrip())  # trailing whitespace waits: it may stand before </think>
                self._held = buf[len(body) - ws:]
                self._emit(out, REASONING, body[:len(body) - ws])
                break
            # content
            if self._strip:
                buf = buf.lstrip()
                if not buf:
                    break
                self._strip = False
            self._emit(out, CONTENT, buf)
            break
        return out

    def flush(self) -> list[tuple[str, str]]:
        """The end of the reply: what was held back, as the kind it would have been."""
        held, self._held = self._held, ""
        out: list[tuple[str, str]] = []
        if self.state == "reasoning":
            self._emit(out, REASONING, held.rstrip())
        elif held.strip():
            self._emit(out, CONTENT, held.lstrip() if self._strip else held)
        return out

    def feed_pair(self, text: str) -> tuple[str, str]:
        """feed(), as (new reasoning text, new answer text)."""
        return _pair(self.feed(text))

    def flush_pair(self) -> tuple[str, str]:
        return _pair(self.flush())

    def _emit(self, out: list, kind: str, text: str) -> None:
        if not text:
            return
        if kind == REASONING:
            self.reasoning += text
        else:
            self.content += text
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))


def _pair(parts: list[tuple[str, str]]) -> tuple[str, str]:
    return ("".join(t for k, t in parts if k == REASONING), "".join(t for k, t in parts if k == CONTENT))


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a whole reply."""
    s = ThinkSplitter(in_reasoning)
    s.feed(text)
    s.flush()
    return s.reasoning, s.content

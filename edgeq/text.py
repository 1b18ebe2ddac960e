"""Untrusted text (model output, GGUF metadata, file names) on its way to a terminal.

A terminal obeys control characters: ESC starts sequences that retitle the window, write the clipboard
(OSC 52) or move the cursor; C1 characters (U+0080-U+009F) do the same on some terminals; CR and BS let a
line overwrite what came before. Every such character is shown as a visible `\\xNN` instead, one character
at a time, so a sequence split across streamed pieces is just as harmless as a whole one.
"""
from __future__ import annotations

_CONTROLS = [c for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)]  # keep \t and \n
_TABLE: dict[int, str] = {c: f"\\x{c:02x}" for c in _CONTROLS}
# Lone surrogates (undecodable bytes of a file name) cannot be encoded for the terminal: printing them
# raises UnicodeEncodeError, so they become U+FFFD like any other undecodable byte.
_TABLE.update({c: "\ufffd" for c in range(0xD800, 0xE000)})
_LINE_TABLE = {**_TABLE, 0x09: " ", 0x0A: " "}

MAX_LINE = 400  # an error line longer than this is cut: a hostile name cannot flood the terminal


def safe_terminal_text(text: str) -> str:
    """`text` with every C0/C1 control character but newline and tab shown as `\\xNN`."""
    return text.translate(_TABLE)


def safe_line(text: str, max_len: int = MAX_LINE) -> str:
    """One line for a terminal: controls escaped, newlines and tabs as spaces, cut to `max_len` characters."""
    line = text.translate(_LINE_TABLE)
    return line if len(line) <= max_len else line[:max_len - 1] + "…"

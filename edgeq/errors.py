"""Errors a user can cause, and the one-line message each gets from the CLI."""
from __future__ import annotations


class EdgeqError(Exception):
    """Base of edgeq's user-facing errors (bad model, bad option, prompt too long...)."""


class ModelError(EdgeqError):
    """The file is a valid GGUF but not a model edgeq can run (architecture, missing tensor...)."""


class ContextError(EdgeqError):
    """A prompt or conversation does not fit in the context."""


def user_message(e: BaseException) -> str | None:
    """The line to print for an error a user can cause; None for a bug (let it raise)."""
    from edgeq.formats.errors import FormatError

    if isinstance(e, (EdgeqError, FormatError)):  # AssetError is an EdgeqError
        return str(e)
    if isinstance(e, FileNotFoundError):
        return f"no such file: {e.filename}"
    if isinstance(e, IsADirectoryError):
        return f"is a directory: {e.filename}"
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename}"
    if isinstance(e, MemoryError):
        return "out of memory"
    return None

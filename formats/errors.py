"""The one error class for malformed files."""


class FormatError(ValueError):
    """A GGUF file (or raw block buffer) is malformed; the message names the file and the problem."""

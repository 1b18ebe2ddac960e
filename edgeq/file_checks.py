"""Files a user names are untrusted: an input must be a regular file and is read within a bound (a FIFO,
/dev/zero or a folder would hang or fill memory); an output never replaces a device, a folder or, unless
forced, an existing file (writers rename a temp file over the target, which would replace a device node).
Every refusal is one line (EdgeqError)."""
from __future__ import annotations

import codecs
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from edgeq.errors import EdgeqError

TEXT_PIECE_BYTES = 1 << 20  # perplexity reads and tokenizes its text this much at a time


def shown(path) -> str:
    """A path as it is safe to print: control characters (escape sequences) written as \\x.. escapes."""
    s = str(path)
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_input(path, what: str = "file") -> BinaryIO:
    """Open a regular file for reading; anything else is refused without blocking (O_NONBLOCK: opening a
    FIFO with no writer would wait forever)."""
    p = Path(path).expanduser()
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        raise EdgeqError(f"{shown(p)}: no such {what}") from None
    except IsADirectoryError:
        raise EdgeqError(f"{shown(p)}: is a directory, not a {what}") from None
    except PermissionError:
        raise EdgeqError(f"{shown(p)}: permission denied") from None
    except OSError as e:
        raise EdgeqError(f"{shown(p)}: cannot open ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise EdgeqError(f"{shown(p)}: is {_kind(mode)}, not a {what}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_input_file(path, what: str = "file") -> Path:
    """`path` as a Path if it names a readable regular file; one-line EdgeqError otherwise."""
    open_input(path, what).close()
    return Path(path).expanduser()


def read_text(f: BinaryIO, limit: int, what: str, why: str = "") -> str:
    """At most `limit` bytes of UTF-8 text from an open stream; more (or invalid UTF-8) is a one-line error
    (`why` says what the limit is for)."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise EdgeqError(f"{what} is over {limit:,} bytes" + (f": {why}" if why else ""))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise EdgeqError(f"{what} is not UTF-8 text") from None


def _cut(text: str) -> int:
    """Where to end a piece so that tokenizing the pieces apart gives the tokens of the whole: after the
    last lone line break between two non-spaces, else before the last space between two non-spaces (both
    are pre-tokenizer boundaries whatever the regex; a run of blanks is not), else (one huge word) at the
    end."""
    lo = max(0, len(text) - 65536)  # a bounded search: a piece of only spaces is cut anywhere
    for sep in ("\n", " "):
        i = len(text) - 1
        while True:
            i = text.rfind(sep, lo, i)
            if i <= 0:
                break
            if not text[i - 1].isspace() and not text[i + 1].isspace():
                return i + 1 if sep == "\n" else i
    return len(text)


def text_pieces(path, piece_bytes: int | None = None) -> Iterator[str]:
    """The UTF-8 text of a regular file in pieces of about `piece_bytes` (TEXT_PIECE_BYTES), cut at word or
    line boundaries, so that a caller can stop reading as soon as it has enough."""
    piece_bytes = piece_bytes or TEXT_PIECE_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    with open_input(path, "text file") as f:
        while True:
            block = f.read(piece_bytes)
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError:
                raise EdgeqError(f"{shown(path)} is not UTF-8 text") from None
            if not block:
                if text:
                    yield text
                return
            cut = _cut(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]


def check_output_path(path, force: bool = False) -> Path:
    """A path a writer may rename its finished temp file onto: in an existing writable folder, not a
    device, pipe, folder or link to one, and not an existing file unless `force`."""
    out = Path(path).expanduser()
    try:
        st = os.stat(out)
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise EdgeqError(f"{shown(out)}: is a directory (give a file name, e.g. {shown(out / 'model.gguf')})")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise EdgeqError(f"{shown(out)}: is {_kind(st.st_mode)}: refusing to replace it")
    if (st is not None or out.is_symlink()) and not force:
        raise EdgeqError(f"{shown(out)} exists (use --force to overwrite it)")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise EdgeqError(f"{shown(folder)}: output folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EdgeqError(f"{shown(folder)}: output folder is not writable")
    return out

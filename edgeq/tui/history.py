"""Chat history in SQLite (WAL mode) in the data folder: conversations, their messages and settings.

Every write commits at once, so a crash or kill loses nothing already saved. The TUI saves each user
message when it is sent and the assistant's reply incrementally while it streams (`update_message`).

Several `edgeq chat` processes may share the file; each owns the conversations it has open (`claim`: a
flock'd lock file per conversation, released by the kernel when the process dies), so two processes never
write into one conversation. A damaged file is moved aside (`chats.sqlite3.broken-<time>`, never deleted)
and a fresh one started; a folder that cannot be written gives an in-memory history. Either way `note`
says what happened, in one line.
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeq.errors import EdgeqError

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


@dataclass
class ChatSettings:
    """Per-conversation generation settings, editable from the settings screen."""
    system: str = "You are a helpful assistant."
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512

    @classmethod
    def from_json(cls, text: str | None) -> "ChatSettings":
        try:
            d = json.loads(text or "{}")
        except ValueError:
            d = {}
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class Conversation:
    id: int
    title: str
    created: float
    updated: float
    settings: ChatSettings = field(default_factory=ChatSettings)


@dataclass
class Message:
    id: int
    role: str
    content: str


class HistoryError(EdgeqError):
    """The chat history file failed while in use (it was fine when opened)."""


class _Damaged(sqlite3.DatabaseError):
    """PRAGMA quick_check found damage that queries would only hit later."""


def _is_damaged(e: sqlite3.Error) -> bool:
    return isinstance(e, _Damaged) or getattr(e, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT") \
        or "malformed" in str(e) or "not a database" in str(e)


def _connect(target: str, uri: bool = False) -> sqlite3.Connection:
    db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, uri=uri)
    try:
        if not uri:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA)
        check = db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise _Damaged(f"damaged ({check[0] if check else 'no answer'})")
    except BaseException:
        db.close()
        raise
    return db


class History:
    """One SQLite file; safe to use from the UI thread and a worker thread (one lock, one connection).

    Opening never fails: see `note` and `persistent` for what was done when the file could not be used."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.note: str | None = None      # one line: what went wrong with the file and what was done
        self.persistent = True            # False: an in-memory history, nothing is saved
        self._lock = threading.Lock()
        self._claims: dict[int, int] = {}  # conversation id → fd of its held lock file
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return _connect(str(self.path))
        except sqlite3.Error as e:
            if _is_damaged(e) and self.path.is_file():
                return self._start_fresh(e)
            return self._in_memory(e)
        except OSError as e:
            return self._in_memory(e)

    def _start_fresh(self, damage: sqlite3.Error) -> sqlite3.Connection:
        """Move the damaged file (and its -wal/-shm, which a new file would replay) aside; open a new one."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.broken-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.broken-{stamp}-{n}")
        try:
            os.rename(self.path, aside)
            for ext in ("-wal", "-shm"):
                side = Path(str(self.path) + ext)
                if side.exists():
                    os.rename(side, Path(str(aside) + ext))
            db = _connect(str(self.path))
        except (OSError, sqlite3.Error) as e:
            return self._in_memory(e, f"chat history {self.path} is damaged ({damage}) and cannot be moved aside")
        self.note = f"chat history {self.path} was damaged ({damage}): kept as {aside.name}, started a fresh one"
        return db

    def _in_memory(self, e: BaseException, why: str | None = None) -> sqlite3.Connection:
        """The file cannot be written: earlier chats copied in when the file can still be read."""
        self.persistent = False
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        db = _connect(":memory:")
        try:
            ro = _connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                ro.backup(db)
            finally:
                ro.close()
            db.execute("PRAGMA foreign_keys=ON")
            kept = "earlier chats shown, "
        except (OSError, ValueError, sqlite3.Error):
            kept = ""
        self.note = (why or f"chat history {self.path} cannot be written ({reason})") + \
            f": {kept}this session's chats are not saved"
        return db

    @classmethod
    def default(cls) -> "History":
        from edgeq.assets import data_home

        return cls(data_home() / "chats.sqlite3")

    def close(self) -> None:
        for conv_id in list(self._claims):
            self.release(conv_id)
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            try:
                return self._db.execute(sql, params)
            except sqlite3.Error as e:  # one line, never a traceback showing chat content
                raise HistoryError(f"chat history {self.path}: {e}") from None

    # ------------------------------------------------------------ ownership (one process per conversation)
    def _lock_path(self, conv_id: int) -> Path:
        return self.path.with_name(self.path.name + ".locks") / f"{int(conv_id)}.lock"

    def claim(self, conv_id: int) -> bool:
        """Own a conversation until release/close/exit; False if another process (or History) owns it."""
        if conv_id in self._claims or not self.persistent:
            return True
        path = self._lock_path(conv_id)
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError:
            return True  # no lock files here (read-only folder...): nothing to coordinate with
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._claims[conv_id] = fd
        return True

    def owner(self, conv_id: int) -> int | None:
        """The pid that holds a conversation, as its lock file says (None if unknown)."""
        try:
            return int(self._lock_path(conv_id).read_text()[:20])
        except (OSError, ValueError):
            return None

    def release(self, conv_id: int) -> None:
        fd = self._claims.pop(conv_id, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    # ------------------------------------------------------------ conversations
    def new_conversation(self, title: str = "New chat", settings: ChatSettings | None = None) -> Conversation:
        now = time.time()
        s = settings or ChatSettings()
        cur = self._exec("INSERT INTO conversations(title, created, updated, settings) VALUES (?,?,?,?)",
                         (title, now, now, s.to_json()))
        return Conversation(cur.lastrowid, title, now, now, s)

    def conversations(self) -> list[Conversation]:
        rows = self._exec("SELECT id, title, created, updated, settings FROM conversations "
                          "ORDER BY updated DESC, id DESC").fetchall()
        return [Conversation(r[0], r[1], r[2], r[3], ChatSettings.from_json(r[4])) for r in rows]

    def get(self, conv_id: int) -> Conversation | None:
        r = self._exec("SELECT id, title, created, updated, settings FROM conversations WHERE id=?",
                       (conv_id,)).fetchone()
        return Conversation(r[0], r[1], r[2], r[3], ChatSettings.from_json(r[4])) if r else None

    def rename(self, conv_id: int, title: str) -> None:
        self._exec("UPDATE conversations SET title=? WHERE id=?", (title, conv_id))

    def save_settings(self, conv_id: int, settings: ChatSettings) -> None:
        self._exec("UPDATE conversations SET settings=? WHERE id=?", (settings.to_json(), conv_id))

    def delete(self, conv_id: int) -> None:
        self._exec("DELETE FROM conversations WHERE id=?", (conv_id,))
        if conv_id in self._claims:
            self._lock_path(conv_id).unlink(missing_ok=True)
            self.release(conv_id)

    # ------------------------------------------------------------ messages
    def add_message(self, conv_id: int, role: str, content: str) -> int:
        now = time.time()
        cur = self._exec("INSERT INTO messages(conversation_id, role, content, created) VALUES (?,?,?,?)",
                         (conv_id, role, content, now))
        self._exec("UPDATE conversations SET updated=? WHERE id=?", (now, conv_id))
        return cur.lastrowid

    def update_message(self, msg_id: int, content: str) -> None:
        self._exec("UPDATE messages SET content=? WHERE id=?", (content, msg_id))

    def delete_message(self, msg_id: int) -> None:
        self._exec("DELETE FROM messages WHERE id=?", (msg_id,))

    def messages(self, conv_id: int) -> list[Message]:
        rows = self._exec("SELECT id, role, content FROM messages WHERE conversation_id=? ORDER BY id",
                          (conv_id,)).fetchall()
        return [Message(*r) for r in rows]

    def user_prompts(self, limit: int = 200) -> list[str]:
        """Earlier prompts, oldest first (for Up/Down recall)."""
        rows = self._exec("SELECT content FROM messages WHERE role='user' ORDER BY id DESC LIMIT ?",
                          (limit,)).fetchall()
        return [r[0] for r in reversed(rows)]

    def export_markdown(self, conv_id: int) -> str:
        conv = self.get(conv_id)
        if conv is None:
            raise KeyError(conv_id)
        out = [f"# {conv.title}", ""]
        if conv.settings.system:
            out += [f"_System: {conv.settings.system}_", ""]
        for m in self.messages(conv_id):
            out += [f"## {m.role.capitalize()}", "", m.content, ""]
        return "\n".join(out)

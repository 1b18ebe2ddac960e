"""Chat history in SQLite (WAL mode) in the data folder: conversations, their messages and settings.

Every write commits at once, so a crash or kill loses nothing already saved. The TUI saves each user
message when it is sent and the assistant's reply incrementally while it streams (`update_message`).
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


class History:
    """One SQLite file; safe to use from the UI thread and a worker thread (one lock, one connection)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    @classmethod
    def default(cls) -> "History":
        from edgeq.assets import data_home

        return cls(data_home() / "chats.sqlite3")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

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

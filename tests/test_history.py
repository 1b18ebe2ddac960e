"""The SQLite chat history: WAL mode, per-chat settings, incremental saves seen by another connection."""
import sqlite3

from edgeq.tui.history import ChatSettings, History


def test_roundtrip_and_wal(tmp_path):
    db = tmp_path / "chats.sqlite3"
    h = History(db)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c = h.new_conversation("First", ChatSettings(system="sys", temperature=0.2, top_p=0.5, max_tokens=7))
    u = h.add_message(c.id, "user", "hello")
    a = h.add_message(c.id, "assistant", "")
    h.update_message(a, "partial")
    other = History(db)  # what a restarted app (or one after a crash) sees
    assert [(m.role, m.content) for m in other.messages(c.id)] == [("user", "hello"), ("assistant", "partial")]
    assert other.get(c.id).settings == ChatSettings("sys", 0.2, 0.5, 7)
    assert u < a
    h.rename(c.id, "Renamed")
    h.save_settings(c.id, ChatSettings(max_tokens=99))
    assert other.get(c.id).title == "Renamed" and other.get(c.id).settings.max_tokens == 99
    assert other.user_prompts() == ["hello"]


def test_order_delete_export(tmp_path):
    h = History(tmp_path / "c.db")
    a = h.new_conversation("a")
    h.new_conversation("b")
    h.add_message(a.id, "user", "newer activity")
    assert [c.title for c in h.conversations()] == ["a", "b"]
    md = h.export_markdown(a.id)
    assert md.startswith("# a") and "## User" in md and "newer activity" in md
    h.delete(a.id)
    assert h.get(a.id) is None and h.messages(a.id) == []
    assert [c.title for c in h.conversations()] == ["b"]


def test_settings_tolerate_bad_json():
    assert ChatSettings.from_json("not json") == ChatSettings()
    assert ChatSettings.from_json('{"temperature": 0.1, "unknown": 1}').temperature == 0.1

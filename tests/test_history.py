"""The SQLite chat history: WAL mode, per-chat settings, incremental saves seen by another connection."""
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

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


# ------------------------------------------------------------ one process per conversation (#16 item 8)
def test_a_conversation_has_one_owner(tmp_path):
    db = tmp_path / "chats.sqlite3"
    first, second = History(db), History(db)  # two `edgeq chat` processes (flock: per open file, so per History)
    c = first.new_conversation("mine")
    assert first.claim(c.id) and first.claim(c.id)
    assert not second.claim(c.id)
    assert second.owner(c.id) == os.getpid()
    first.release(c.id)
    assert second.claim(c.id) and not first.claim(c.id)
    second.close()
    assert first.claim(c.id)


def test_a_killed_owner_releases_its_conversation(tmp_path):
    db = tmp_path / "chats.sqlite3"
    h = History(db)
    c = h.new_conversation()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from edgeq.tui.history import History
        assert History({str(db)!r}).claim({c.id})
        print("claimed", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        assert not h.claim(c.id) and h.owner(c.id) == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert h.claim(c.id)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_HOME", str(tmp_path))
    return tmp_path


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_second_chat_app_does_not_join_an_open_conversation(home, anyio_backend):
    from test_tui import FakeModel

    from edgeq.tui.app import ChatApp

    other = History(home / "chats.sqlite3")  # the first `edgeq chat`, with its conversation open
    taken = other.new_conversation("taken")
    other.add_message(taken.id, "user", "the other process's prompt")
    assert other.claim(taken.id)
    model = FakeModel()
    app = ChatApp(model=model, history=History(home / "chats.sqlite3"))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert app.conv_id is not None and app.conv_id != taken.id
        mine = app.conv_id
        app.open_conversation(taken.id)  # e.g. picked in the sidebar
        await pilot.pause()
        assert app.conv_id == mine
    other.release(taken.id)


# ------------------------------------------------------------ a broken history file (#16 item 9)
def test_not_a_database_is_moved_aside(tmp_path):
    db = tmp_path / "chats.sqlite3"
    junk = b"this is not SQLite at all\n" * 1000
    db.write_bytes(junk)
    h = History(db)
    assert h.persistent and "damaged" in h.note and ".broken-" in h.note and "\n" not in h.note
    broken = [p for p in tmp_path.iterdir() if p.name.startswith("chats.sqlite3.broken-")]
    assert len(broken) == 1 and broken[0].read_bytes() == junk  # the old file kept, byte for byte
    c = h.new_conversation("fresh")
    h.add_message(c.id, "user", "hello")
    assert [m.content for m in History(db).messages(c.id)] == ["hello"]


def test_damaged_pages_are_moved_aside(tmp_path):
    db = tmp_path / "chats.sqlite3"
    h = History(db)
    c = h.new_conversation("long")
    for i in range(3000):
        h.add_message(c.id, "user", f"message {i} " + "x" * 200)
    h.close()
    data = bytearray(db.read_bytes())
    page = 4096
    mid = (len(data) // 2) // page * page
    data[mid:mid + 2 * page] = b"\xa5" * (2 * page)  # two whole pages in the middle, headers included
    db.write_bytes(bytes(data))
    h = History(db)
    assert h.note and "damaged" in h.note
    assert h.conversations() == []  # a fresh file
    broken = [p for p in tmp_path.iterdir() if p.name.startswith("chats.sqlite3.broken-")]
    assert [p.read_bytes() for p in broken] == [bytes(data)]


def test_unwritable_folder_runs_in_memory(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data folder should be")
    h = History(blocker / "chats.sqlite3")
    assert not h.persistent and "not saved" in h.note and "\n" not in h.note
    c = h.new_conversation("kept in memory")
    h.add_message(c.id, "user", "hi")
    assert h.claim(c.id) and [m.content for m in h.messages(c.id)] == ["hi"]
    assert blocker.read_text().startswith("a file")


def test_read_only_database_keeps_earlier_chats_in_memory(tmp_path, monkeypatch):
    db = tmp_path / "chats.sqlite3"
    h = History(db)
    c = h.new_conversation("earlier")
    h.add_message(c.id, "user", "old prompt")
    h.close()
    real_connect = sqlite3.connect

    def read_only(target, *a, uri=False, **k):  # what a read-only folder gives, even as root
        if target != ":memory:" and not uri:
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real_connect(target, *a, uri=uri, **k)

    monkeypatch.setattr(sqlite3, "connect", read_only)
    before = db.read_bytes()
    h = History(db)
    assert not h.persistent and "readonly" in h.note and "earlier chats shown" in h.note
    assert [m.content for m in h.messages(c.id)] == ["old prompt"]
    h.add_message(c.id, "assistant", "new reply, memory only")
    monkeypatch.setattr(sqlite3, "connect", real_connect)
    assert db.read_bytes() == before


def test_failure_in_use_is_one_line(tmp_path):
    from edgeq.errors import user_message
    from edgeq.tui.history import HistoryError

    h = History(tmp_path / "chats.sqlite3")
    h.new_conversation("secret chat content")
    h._db.close()
    with pytest.raises(HistoryError) as e:
        h.conversations()
    assert "\n" not in user_message(e.value)


def test_chat_command_says_what_happened_to_a_broken_history(home, monkeypatch, capsys):
    import edgeq.runtime.engine
    from edgeq import assets
    from edgeq.cli import main as cli
    from edgeq.tui import app as tui_app

    (home / "chats.sqlite3").write_bytes(b"\x00garbage" * 500)
    monkeypatch.setattr(assets, "resolve_model", lambda ref, **k: ref)
    monkeypatch.setattr(edgeq.runtime.engine, "load", lambda *a, **k: object())
    ran = []
    monkeypatch.setattr(tui_app.ChatApp, "run", lambda self: ran.append(self.history.persistent))
    assert cli(["chat", "fake.gguf", "--device", "cpu"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert ran == [True]
    assert len(err) == 1 and err[0].startswith("note: chat history") and "broken-" in err[0]

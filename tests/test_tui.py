"""The chat app driven headless with Pilot: first with a fake model, then (slow) with the real SmolLM2."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from edgeq.tui.history import ChatSettings, History
from edgeq.tui.app import ChatApp, ChatMessage, PromptInput, SettingsScreen

pytestmark = pytest.mark.anyio  # async tests run on anyio's pytest plugin (asyncio backend)


class FakeModel:
    """The engine's chat API: yields words slowly, honours cancel; 1 token per word, 4 per message."""

    n_ctx = 256

    def __init__(self, words=None, delay=0.005):
        self.words = words or "Hello! Here is `code`:\n\n```python\nprint(42)\n```\n\nDone.".split(" ")
        self.delay = delay
        self.info = {"name": "fake-model", "arch": "fake", "path": "/dev/null", "qtype": "F32"}
        self.last_stats: dict = {}
        self.calls: list[list[dict]] = []

    def count_chat_tokens(self, messages):
        return sum(4 + len(m["content"].split()) for m in messages)

    def chat(self, messages, max_tokens=256, temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, seed=None,
             stop=(), cancel: threading.Event | None = None):
        self.calls.append(messages)
        t0 = time.perf_counter()
        n_prompt = self.count_chat_tokens(messages)
        self.last_stats = {"prompt_tokens": n_prompt, "prompt_s": 0.0, "gen_tokens": 0, "gen_s": 0.0}
        for i, w in enumerate(self.words[:max_tokens]):
            if cancel is not None and cancel.is_set():
                break
            time.sleep(self.delay)
            self.last_stats.update(gen_tokens=i + 1, gen_s=time.perf_counter() - t0)
            yield (" " if i else "") + w


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_HOME", str(tmp_path))
    return tmp_path


def make_app(home, model=None, **kw):
    return ChatApp(model=model or FakeModel(), history=History(home / "chats.sqlite3"), **kw)


async def wait_idle(app, pilot, timeout=20.0):
    t0 = time.monotonic()
    while app.generating and time.monotonic() - t0 < timeout:
        await pilot.pause(0.05)
    await pilot.pause()
    assert not app.generating, "reply did not finish"


async def ask(app, pilot, text):
    app.query_one(PromptInput).focus()
    app.query_one(PromptInput).text = text
    await pilot.press("enter")
    await pilot.pause()


def assistant_texts(app):
    return [m.content for m in app.query(ChatMessage) if m.role == "assistant"]


# ---------------------------------------------------------------- fake model
async def test_ask_streams_answer_and_persists(home):
    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(app, pilot, "What is 6*7?")
        await wait_idle(app, pilot)
        replies = assistant_texts(app)
        assert replies and replies[-1].startswith("Hello!") and "print(42)" in replies[-1]
        assert "tok/s" in str(app.query_one("#status").render())
        assert app.query_one(PromptInput).text == ""
        conv = app.conv_id
    msgs = History(home / "chats.sqlite3").messages(conv)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[1].content.endswith("Done.")


async def test_escape_stops_long_answer(home):
    model = FakeModel(words=["word"] * 2000, delay=0.01)
    app = make_app(home, model)
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(app, pilot, "Talk a lot")
        await pilot.pause(0.3)
        t0 = time.monotonic()
        await pilot.press("escape")
        await wait_idle(app, pilot, timeout=5)
        assert time.monotonic() - t0 < 2
        text = assistant_texts(app)[-1]
        assert 0 < text.count("word") < 2000
        assert any("(stopped)" in str(n.render()) for n in app.query(".note"))
        saved = app.history.messages(app.conv_id)[-1]
        assert saved.role == "assistant" and saved.content == text


async def test_reply_saved_while_streaming(home):
    model = FakeModel(words=["w"] * 2000, delay=0.01)
    app = make_app(home, model)
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(app, pilot, "stream")
        await pilot.pause(1.2)
        assert app.generating
        other = History(home / "chats.sqlite3")  # another connection, as after a crash
        partial = other.messages(app.conv_id)[-1]
        assert partial.role == "assistant" and partial.content.count("w") > 0
        on_screen = assistant_texts(app)[-1]
        conv = app.conv_id
    # quit mid-reply (as a kill would): everything that was on screen is in the database
    await asyncio.sleep(0.3)
    saved = History(home / "chats.sqlite3").messages(conv)[-1].content
    assert saved.startswith(on_screen) and len(saved) >= len(on_screen) > 0


async def test_new_chat_and_restart_keeps_history(home):
    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(app, pilot, "first question")
        await wait_idle(app, pilot)
        first = app.conv_id
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.conv_id != first
        assert not list(app.query(ChatMessage))
        await ask(app, pilot, "second question")
        await wait_idle(app, pilot)
    app2 = make_app(home)
    async with app2.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        titles = [c.title for c in app2.history.conversations()]
        assert titles == ["second question", "first question"]
        assert len(app2.query_one("#convs").children) == 2
        contents = [m.content for m in app2.query(ChatMessage)]
        assert contents[0] == "second question" and contents[1].startswith("Hello!")
        app2.open_conversation(first)
        await pilot.pause()
        assert [m.content for m in app2.query(ChatMessage)][0] == "first question"
        # Up recalls earlier prompts across restarts
        app2.query_one(PromptInput).focus()
        await pilot.press("up")
        assert app2.query_one(PromptInput).text == "second question"
        await pilot.press("up")
        assert app2.query_one(PromptInput).text == "first question"
        await pilot.press("down", "down")
        assert app2.query_one(PromptInput).text == ""


async def test_newline_keys_and_empty_prompt(home):
    model = FakeModel()
    app = make_app(home, model)
    async with app.run_test(size=(80, 24)) as pilot:
        prompt = app.query_one(PromptInput)
        prompt.focus()
        await pilot.press("enter")
        await pilot.press("space", "space", "enter")
        await pilot.pause()
        assert not app.generating and not model.calls and not list(app.query(ChatMessage))
        prompt.text = ""
        await pilot.press("a", "shift+enter", "b", "alt+enter", "c", "ctrl+j", "d", "backslash", "enter", "e")
        assert prompt.text == "a\nb\nc\nd\ne"
        await pilot.press("enter")
        await wait_idle(app, pilot)
        assert model.calls[-1][-1] == {"role": "user", "content": "a\nb\nc\nd\ne"}


async def test_context_overflow_drops_oldest_turns_with_note(home):
    model = FakeModel()
    model.n_ctx = 120
    app = make_app(home, model, defaults=ChatSettings(system="Be brief.", max_tokens=40))
    async with app.run_test(size=(80, 24)) as pilot:
        for i in range(4):
            await ask(app, pilot, f"question {i} " + "blah " * 10)
            await wait_idle(app, pilot)
        sent = model.calls[-1]
        assert sent[0] == {"role": "system", "content": "Be brief."}
        assert sent[-1]["content"].startswith("question 3")
        assert model.count_chat_tokens(sent) + 40 <= 120
        assert not any(m["content"].startswith("question 0") for m in sent)
        notes = [str(n.render()) for n in app.query(".note")]
        assert any("Dropped" in n for n in notes)


async def test_settings_rename_export_copy_delete(home):
    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(app, pilot, "hi")
        await wait_idle(app, pilot)
        await pilot.press("f2")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#temperature").value = "0.1"
        app.screen.query_one("#max_tokens").value = "33"
        await pilot.click("#save")
        await pilot.pause()
        assert app.settings.temperature == 0.1 and app.settings.max_tokens == 33
        assert app.history.get(app.conv_id).settings.max_tokens == 33
        app.action_rename()
        await pilot.pause()
        app.screen.query_one("#title").value = "Renamed"
        await pilot.press("enter")
        await pilot.pause()
        assert app.history.get(app.conv_id).title == "Renamed"
        app.action_export()
        out = home / "exports" / f"chat-{app.conv_id}-renamed.md"
        assert out.read_text().startswith("# Renamed") and "## Assistant" in out.read_text()
        copied = []
        app.copy_to_clipboard = copied.append
        app.action_copy_last()
        assert copied and copied[0].startswith("Hello!")
        conv = app.conv_id
        app.action_delete_chat()
        await pilot.pause()
        assert app.history.get(conv) is None and app.conv_id != conv


async def test_command_palette_lists_actions(home):
    from edgeq.tui.app import ChatCommands

    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"chat settings")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, SettingsScreen)
        assert {c[1] for c in ChatCommands.COMMANDS} >= {"new_chat", "settings", "rename", "delete_chat", "export",
                                                         "copy_last", "pick_model"}


async def test_model_picker_bad_file_notifies(home):
    (home / "models").mkdir()
    (home / "models" / "broken.gguf").write_bytes(b"not a gguf")

    def factory(ref):
        raise ValueError(f"{ref} is not a GGUF file")

    app = ChatApp(model=FakeModel(), model_factory=factory, history=History(home / "chats.sqlite3"))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+o")
        await pilot.pause()
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert any("cannot load" in str(n.message) for n in app._notifications)
        assert app.model.info["name"] == "fake-model"


# ---------------------------------------------------------------- thinking models
class ThinkingModel(FakeModel):
    """Replies with a <think> block, its tags split across pieces; records the template kwargs of each call."""

    def __init__(self):
        super().__init__()
        self.pieces = ["<th", "ink>\nfirst", " I", " add.\n</", "think>\n\nThe", " answer", " is", " 4."]
        self.kwargs: list = []

    def count_chat_tokens(self, messages, template_kwargs=None):
        return super().count_chat_tokens(messages)

    def chat(self, messages, template_kwargs=None, **kw):
        self.kwargs.append(template_kwargs)
        self.last_stats = {"prompt_tokens": self.count_chat_tokens(messages), "gen_tokens": len(self.pieces),
                           "gen_s": 0.01}
        for piece in self.pieces:
            time.sleep(self.delay)
            yield piece


def think_text(app) -> str:
    return str(app.query(ChatMessage).last().query_one(".think").render())


async def test_thinking_blocks_collapsed_toggled_and_kept_in_history(home):
    model = ThinkingModel()
    app = make_app(home, model)
    async with app.run_test(size=(100, 30)) as pilot:
        await ask(app, pilot, "2+2?")
        await wait_idle(app, pilot)
        reply = app.query(ChatMessage).last()
        assert reply.answer == "The answer is 4." and reply.reasoning == "first I add."
        assert "thought (3 words)" in think_text(app) and "first I add" not in think_text(app)
        assert "answer is 4" in screen_text(app) and "think>" not in screen_text(app)
        await pilot.press("ctrl+t")  # shown, dimmed
        await pilot.pause()
        assert "first I add." in think_text(app) and app.query(ChatMessage).last().query_one(".think").display
        await ask(app, pilot, "/think")  # a command, not a message: collapsed again
        assert not app.show_thinking and "thought (3 words)" in think_text(app)
        assert [m.role for m in app.history.messages(app.conv_id)] == ["user", "assistant"]
        saved = app.history.messages(app.conv_id)[-1].content
        assert saved.startswith("<think>\nfirst I add.\n</think>") and saved.endswith("The answer is 4.")
        copied = []
        app.copy_to_clipboard = copied.append
        app.action_copy_last()
        assert copied == ["The answer is 4."]
        await ask(app, pilot, "/think off")
        assert app.enable_thinking is False
        await ask(app, pilot, "again")
        await wait_idle(app, pilot)
        assert model.kwargs == [None, {"enable_thinking": False}]
        await ask(app, pilot, "/think default")
        assert app.enable_thinking is None
        conv = app.conv_id
    app = make_app(home)  # reopened from the history: the block is split again, collapsed
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert app.conv_id == conv
        assert "thought (3 words)" in think_text(app) and "think>" not in screen_text(app)


async def test_chat_without_thinking_shows_no_block(home):
    app = make_app(home)
    async with app.run_test(size=(80, 24)) as pilot:
        await ask(app, pilot, "hi")
        await wait_idle(app, pilot)
        assert not app.query(ChatMessage).last().query_one(".think").display


# ---------------------------------------------------------------- hostile names and text
CONTROLS = {chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} - {"\n", "\t"}


def screen_text(app) -> str:
    """Every character the current screen's widgets render (what would reach the terminal)."""
    from textual.geometry import Region

    out = []
    for w in app.screen.query("*"):
        if w.size.area:
            out += [seg.text for strip in w.render_lines(Region(0, 0, *w.size)) for seg in strip]
    return "".join(out)


@pytest.mark.parametrize("name", ["[/nope] x [", "[@click=app.quit]click me[/]"])
async def test_model_name_is_plain_text_not_markup(home, name):
    model = FakeModel()
    model.info["name"] = name
    app = make_app(home, model)
    async with app.run_test(size=(100, 24)) as pilot:
        await pilot.pause()
        assert name in str(app.query_one("#status").render())
        assert name in screen_text(app)


async def test_escape_sequences_in_replies_never_reach_the_terminal(home):
    words = ["\x1b]0;PWNED\x07", "\x1b", "]52;c;ZXZpbA==\x07", "\x9b2J", "done"]  # one split in two pieces
    model = FakeModel(words=words)
    model.info["name"] = "evil\x1b]0;T\x07"
    app = make_app(home, model)
    async with app.run_test(size=(100, 24)) as pilot:
        await ask(app, pilot, "hi")
        await wait_idle(app, pilot)
        shown = screen_text(app)
        assert "done" in shown and "PWNED" in shown and not CONTROLS & set(shown)
        assert "\x1b" in assistant_texts(app)[-1]  # the saved reply is the model's text, unchanged
        assert "\x1b" in app.history.messages(app.conv_id)[-1].content


async def test_model_picker_and_notes_with_hostile_files(home):
    import struct

    from edgeq.formats.gguf_write import write_gguf

    models = home / "models"
    models.mkdir()
    write_gguf(models / "evil.gguf", "[/nope] x [\x1b]0;T\x07", {}, [("w", "F32", (2, 32), b"\0" * 256)])
    deep = struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 0, 0)
    (models / "deep.gguf").write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 4) + b"deep" + deep)
    loaded = FakeModel()
    loaded.info["name"] = "[/nope] loaded ["

    app = ChatApp(model=FakeModel(), model_factory=lambda ref: loaded, history=History(home / "chats.sqlite3"))
    async with app.run_test(size=(100, 24)) as pilot:
        await pilot.press("ctrl+o")
        await pilot.pause()
        shown = screen_text(app)
        assert "[/nope] x [" in shown and "deep.gguf" in shown and not CONTROLS & set(shown)
        options = app.screen.query_one("#models")
        options.highlighted = [str(p) for p in app.screen.choices].index(str(models / "evil.gguf"))
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.model is loaded
        assert any("[/nope] loaded [" in str(n.message) for n in app._notifications)
        assert "[/nope] loaded [" in str(app.query_one("#status").render())


# A real process (App.run, asyncio.run): quitting while the model picker's load is still busy (a first run
# compiles kernels for a minute; nothing can stop that thread) must not wait for the load to end.
QUIT_DURING_LOAD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from test_tui import FakeModel
from edgeq.tui.app import ChatApp
from edgeq.tui.history import History

def slow_factory(ref):
    time.sleep(120)

async def auto(pilot):
    await pilot.press("ctrl+o")
    await pilot.pause(0.5)
    await pilot.press("enter")
    await pilot.pause(0.5)
    print("quitting", flush=True)
    pilot.app.exit()

ChatApp(model=FakeModel(), model_factory=slow_factory, history=History(sys.argv[2])).run(headless=True, auto_pilot=auto)
"""


def test_quit_while_a_model_loads_does_not_wait_for_it(home):
    import subprocess
    import sys
    from pathlib import Path

    (home / "models").mkdir()
    (home / "models" / "other.gguf").write_bytes(b"never read: the factory is a fake")
    proc = subprocess.Popen([sys.executable, "-c", QUIT_DURING_LOAD, str(Path(__file__).parent),
                             str(home / "chats.sqlite3")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "quitting", proc.stderr.read()
        t = time.monotonic()  # the behaviour under test starts here
        proc.wait(timeout=60)
        elapsed = time.monotonic() - t
    finally:
        proc.kill()
    assert elapsed < 3, elapsed
    assert "Traceback" not in proc.stderr.read()


# ---------------------------------------------------------------- snapshots (fake model, 80x24)
def _seeded_home(home):
    h = History(home / "chats.sqlite3")
    c = h.new_conversation("Snapshot chat")
    h.add_message(c.id, "user", "Show me Python code")
    h.add_message(c.id, "assistant", "Sure:\n\n```python\nprint('hi')\n```\n\nThat prints **hi**.")
    h.close()


def test_snapshot_main_screen(home, snap_compare):
    _seeded_home(home)
    app = make_app(home)
    assert snap_compare(app, terminal_size=(80, 24))


def test_snapshot_settings_screen(home, snap_compare):
    _seeded_home(home)
    app = make_app(home)
    assert snap_compare(app, press=["f2"], terminal_size=(80, 24))


# ---------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def real_model(smollm2_path):
    pytest.importorskip("edgeq.formats.gguf_file")
    from edgeq.runtime.engine import load

    # the default (q8) KV cache. The question is "Name the capital of France.": SmolLM2-135M's first reply token
    # leads by 1.4-1.5 logits there (The 27.78 vs Paris 26.38; transformers' fp32 model on the same file: The
    # 27.37 vs La 25.92) with every SIMD level and either cache. "What is the capital of France?" is a near-tie
    # in transformers itself (The 25.33 vs L 25.24) that int8 activations (decode, and prefill since it takes the
    # int8 GEMM) turn into a French reply; this test is about the chat flow, not that tie.
    return load(smollm2_path, n_ctx=1024)


@pytest.mark.slow
async def test_real_model_chat_flow(home, real_model):
    app = make_app(home, real_model, defaults=ChatSettings(temperature=0.0, max_tokens=48))
    async with app.run_test(size=(100, 30)) as pilot:
        await ask(app, pilot, "Name the capital of France.")
        await wait_idle(app, pilot, timeout=120)
        reply = assistant_texts(app)[-1]
        assert "Paris" in reply
        assert "tok/s" in str(app.query_one("#status").render())
        # the screen with the real answer, kept beside the test's data folder (the README's screenshot is
        # the real-terminal one made by benchmarks/chat_screenshot.sh)
        app.save_screenshot(filename="chat_screenshot.svg", path=str(home))
        assert (home / "chat_screenshot.svg").stat().st_size > 0
        # a long answer stopped with Esc
        app.settings = ChatSettings(temperature=0.8, max_tokens=400)
        await ask(app, pilot, "Write a long story about a dragon.")
        await pilot.pause(1.0)
        await pilot.press("escape")
        await wait_idle(app, pilot, timeout=10)
        assert real_model.last_stats["gen_tokens"] < 400
        conv = app.conv_id
    app2 = make_app(home, real_model)
    async with app2.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert app2.conv_id == conv
        assert [m.content for m in app2.query(ChatMessage)][0] == "Name the capital of France."


@pytest.mark.slow
async def test_real_model_context_overflow(home, smollm2_path):
    pytest.importorskip("edgeq.formats.gguf_file")
    from edgeq.runtime.engine import load

    model = load(smollm2_path, n_ctx=128)
    app = make_app(home, model, defaults=ChatSettings(temperature=0.0, max_tokens=24))
    async with app.run_test(size=(80, 24)) as pilot:
        for i in range(4):
            await ask(app, pilot, f"Tell me fact number {i} about cats, in one sentence.")
            await wait_idle(app, pilot, timeout=120)
        assert any("Dropped" in str(n.render()) for n in app.query(".note"))
        assert all(n for n in assistant_texts(app))


# ---------------------------------------------------------------- the CLI verb
def test_chat_cli_missing_or_corrupt_model_is_one_line(home, tmp_path, capsys):
    from edgeq.cli import main

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    for arg in ("/nonexistent/model.gguf", "no-such-model", str(bad)):
        assert main(["chat", arg]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("edgeq chat: cannot load") and "Traceback" not in err[0]


async def test_picking_a_hub_catalog_model_shows_the_pull(home, monkeypatch):
    from edgeq import assets

    monkeypatch.setitem(assets.MODELS, "mamba-tiny", assets.Asset("mamba-tiny", "mamba-tiny.gguf", "", 0, "tiny",
                                                                  hf_repo="o/r", hf_quant="Q8_0", arch="mamba"))
    gate = threading.Event()
    loaded = FakeModel()
    picked = []

    def factory(ref, progress=None):  # the chat verb's factory downloads through assets.resolve_model
        picked.append(ref)
        progress(50_000_000, 100_000_000, "SmolLM2-360M-Instruct-Q4_K_M.gguf")
        gate.wait(10)
        return loaded

    app = ChatApp(model=FakeModel(), model_factory=factory, history=History(home / "chats.sqlite3"))
    async with app.run_test(size=(120, 24)) as pilot:
        await pilot.press("ctrl+o")
        await pilot.pause()
        shown = screen_text(app)
        assert "smollm2-360m-instruct  (pull 271 MB)" in shown and "qwen3-0.6b  (pull 397 MB)" in shown
        models = app.screen.query_one("#models")
        labels = [str(models.get_option_at_index(i).prompt) for i in range(models.option_count)]
        assert any("mamba-tiny" in lb and "mamba: not supported yet" in lb for lb in labels), labels
        assert not any("qwen3" in lb and "not supported" in lb for lb in labels), labels
        app.screen.query_one("#models").highlighted = app.screen.choices.index("smollm2-360m-instruct")
        await pilot.press("enter")
        for _ in range(200):
            await pilot.pause(0.05)
            if "pulling" in str(app.query_one("#status").render()):
                break
        assert "pulling SmolLM2-360M-Instruct-Q4_K_M.gguf:  50.0% (50/100 MB)" in str(app.query_one("#status").render())
        gate.set()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.model is loaded and picked == ["smollm2-360m-instruct"]


async def test_history_failing_mid_session_ends_the_app_with_one_line(home):
    """The database failing after a clean open (disk gone, file damaged under us) is a HistoryError: the app
    exits with code 1 and keeps the one line for `edgeq chat` to print, never a traceback with chat text."""
    from edgeq.tui.history import HistoryError

    app = make_app(home)
    async with app.run_test() as pilot:
        await pilot.pause()

        def broken(*a, **k):
            raise HistoryError("chat history chats.sqlite3: disk I/O error")

        app.history.add_message = broken
        prompt = app.query_one(PromptInput)
        prompt.post_message(PromptInput.Submitted("secret words that must not be printed"))
        for _ in range(100):
            if app._exit_renderables or app.return_code is not None:
                break
            await pilot.pause(0.05)
    assert app.return_code == 1
    assert app.fatal_message == "chat history chats.sqlite3: disk I/O error"
    assert not app._exit_renderables  # no traceback queued for the terminal

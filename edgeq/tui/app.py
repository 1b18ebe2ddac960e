"""`edgeq chat`: a Textual chat app over any object with the engine's Model chat API.

The app takes a loaded model and a `model_factory(path_or_name) -> Model` (for the model picker), so
tests inject a fake model. Generation runs in a thread worker; pieces reach the UI in batches through
`call_from_thread`, the reply is rendered with a `MarkdownStream` and saved to SQLite as it grows.
"""
from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message as TMessage
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, ListItem, ListView, Markdown, OptionList, Static, TextArea
from textual.worker import get_current_worker

from edgeq.runtime.context import fit_messages
from edgeq.tui.history import ChatSettings, History

BATCH_S = 0.05   # how often streamed pieces are pushed to the UI
SAVE_S = 0.5     # how often the growing reply is written to the database


def describe_error(e: BaseException) -> str:
    """One readable line for any failure to load or run a model (the UI never shows a traceback)."""
    try:
        from edgeq.errors import user_message

        msg = user_message(e)
    except ImportError:
        msg = None
    if msg:
        return msg
    if isinstance(e, (ValueError, OSError)) or type(e).__name__ in ("AssetError", "FormatError"):
        return str(e)
    return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------- widgets
class PromptInput(TextArea):
    """Enter sends; Shift+Enter, Alt+Enter, Ctrl+J insert a newline; Up/Down recall earlier prompts.

    Terminals without the kitty keyboard protocol (tmux, xterm...) send Alt+Enter and Shift+Enter as a
    plain Enter, so two fallbacks work everywhere: Ctrl+J, and Enter right after a trailing backslash.
    """

    class Submitted(TMessage):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.recall: list[str] = []
        self._recall_pos: int | None = None
        self._draft = ""

    async def _on_key(self, event) -> None:
        key = event.key
        if key == "enter":
            event.stop()
            event.prevent_default()
            row, col = self.cursor_location
            if col > 0 and self.document.get_line(row)[:col].endswith("\\"):
                self.replace("\n", (row, col - 1), (row, col))
                return
            self._recall_pos = None
            self.post_message(self.Submitted(self.text))
            return
        if key in ("shift+enter", "alt+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        if key == "escape":
            event.stop()
            event.prevent_default()
            self.app.action_stop()
            return
        row = self.cursor_location[0]
        if key == "up" and row == 0 and self.recall:
            event.stop()
            event.prevent_default()
            if self._recall_pos is None:
                self._draft = self.text
                self._recall_pos = len(self.recall)
            self._recall_pos = max(0, self._recall_pos - 1)
            self._show(self.recall[self._recall_pos])
            return
        if key == "down" and row == self.document.line_count - 1 and self._recall_pos is not None:
            event.stop()
            event.prevent_default()
            self._recall_pos += 1
            if self._recall_pos >= len(self.recall):
                self._recall_pos = None
                self._show(self._draft)
            else:
                self._show(self.recall[self._recall_pos])
            return
        await super()._on_key(event)

    def _show(self, text: str) -> None:
        self.text = text
        self.move_cursor(self.document.end)


class ChatMessage(Vertical):
    """One message: a role label and its markdown body."""

    def __init__(self, role: str, content: str):
        super().__init__(classes=f"msg {role}")
        self.role = role
        self.content = content

    def compose(self) -> ComposeResult:
        yield Label("You" if self.role == "user" else "Assistant", classes="role")
        if self.role == "user":  # exactly as typed: newlines kept, no markdown surprises
            yield Static(self.content, classes="body", markup=False)
        else:
            yield Markdown(self.content, classes="body")

    @property
    def body(self) -> Markdown:
        return self.query_one(".body")


class ConvItem(ListItem):
    def __init__(self, conv_id: int, title: str):
        super().__init__(Label(title, markup=False))
        self.conv_id = conv_id


# ---------------------------------------------------------------- modal screens
class SettingsScreen(ModalScreen[ChatSettings | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, settings: ChatSettings):
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(id="dialog"):
            yield Label("Chat settings", classes="title")
            yield Label("System prompt")
            yield TextArea(s.system, id="system", soft_wrap=True)
            with Horizontal(classes="row"):
                yield Label("Temperature", classes="field")
                yield Input(str(s.temperature), id="temperature", type="number")
            with Horizontal(classes="row"):
                yield Label("Top-p", classes="field")
                yield Input(str(s.top_p), id="top_p", type="number")
            with Horizontal(classes="row"):
                yield Label("Max tokens", classes="field")
                yield Input(str(s.max_tokens), id="max_tokens", type="integer")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#save")
    def save(self) -> None:
        try:
            s = ChatSettings(
                system=self.query_one("#system", TextArea).text,
                temperature=float(self.query_one("#temperature", Input).value),
                top_p=float(self.query_one("#top_p", Input).value),
                max_tokens=int(self.query_one("#max_tokens", Input).value),
            )
        except ValueError:
            self.notify("temperature and top-p must be numbers, max tokens an integer", severity="error")
            return
        if s.temperature < 0 or not 0 < s.top_p <= 1 or s.max_tokens < 1:
            self.notify("need temperature >= 0, 0 < top-p <= 1, max tokens >= 1", severity="error")
            return
        self.dismiss(s)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class RenameScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str):
        super().__init__()
        self.old = title

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Rename chat", classes="title")
            yield Input(self.old, id="title")

    @on(Input.Submitted)
    def done(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ModelPicker(ModalScreen[str | None]):
    """The GGUF files in the data folder (and the catalog models not pulled yet)."""
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        from edgeq import assets

        self.choices: list[str] = []
        opts = []
        for m in assets.list_local():
            self.choices.append(str(m.path))
            opts.append(f"{m.name}  {m.size / 1e6:.0f} MB {m.qtype} {m.arch}")
        here = {m.name for m in assets.list_local()}
        for a in assets.MODELS.values():
            if a.name not in here:
                self.choices.append(a.name)
                opts.append(f"{a.name}  (pull {a.size / 1e6:.0f} MB)")
        with Vertical(id="dialog"):
            yield Label("Pick a model", classes="title")
            yield OptionList(*opts, id="models")

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.choices[event.option_index])

    def action_cancel(self) -> None:
        self.dismiss(None)


# ---------------------------------------------------------------- command palette
class ChatCommands(Provider):
    """One palette entry per action of the app."""

    COMMANDS = [
        ("New chat", "new_chat", "start a new conversation"),
        ("Chat settings", "settings", "system prompt, temperature, top-p, max tokens"),
        ("Rename chat", "rename", "rename this conversation"),
        ("Delete chat", "delete_chat", "delete this conversation"),
        ("Export chat to markdown", "export", "write this conversation to a .md file"),
        ("Copy last reply", "copy_last", "copy the assistant's last reply to the clipboard"),
        ("Pick model", "pick_model", "switch to another local model"),
        ("Toggle sidebar", "toggle_sidebar", "show or hide the list of conversations"),
        ("Stop reply", "stop", "stop the reply being generated"),
    ]

    async def discover(self) -> Hits:
        for name, action, help_text in self.COMMANDS:
            yield DiscoveryHit(name, self._runner(action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, action, help_text in self.COMMANDS:
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), self._runner(action), help=help_text)

    def _runner(self, action: str):
        async def run() -> None:
            await self.app.run_action(action)
        return run


# ---------------------------------------------------------------- the app
class ChatApp(App):
    CSS_PATH = "chat.tcss"
    TITLE = "edgeq chat"
    COMMANDS = App.COMMANDS | {ChatCommands}
    BINDINGS = [
        Binding("escape", "stop", "Stop", show=False),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+b", "toggle_sidebar", "Chats"),
        Binding("f2", "settings", "Settings"),
        Binding("ctrl+o", "pick_model", "Model"),
        Binding("ctrl+y", "copy_last", "Copy", show=False),
        Binding("ctrl+e", "export", "Export", show=False),
        Binding("f3", "rename", "Rename", show=False),
        Binding("ctrl+delete", "delete_chat", "Delete", show=False),
    ]

    def __init__(self, model=None, model_factory: Callable[[str], object] | None = None,
                 history: History | None = None, defaults: ChatSettings | None = None,
                 new_chat: bool = False, export_dir: Path | None = None):
        super().__init__()
        self.model = model
        self.model_factory = model_factory
        self.history = history or History.default()
        self.defaults = defaults or ChatSettings()
        self.start_new = new_chat
        self.export_dir = export_dir
        self.conv_id: int | None = None
        self.settings = self.defaults
        self.generating = False
        self.cancel = threading.Event()
        self.last_tps: float | None = None
        self.ctx_used = 0

    # ------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="sidebar"):
                yield Label("Chats  ^N new", classes="title")
                yield ListView(id="convs")
            with Vertical(id="chat"):
                yield VerticalScroll(id="messages")
                yield PromptInput(id="prompt", placeholder="Enter: send · Ctrl+J or \\⏎: newline · Esc: stop")
                yield Static("", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(PromptInput).recall = self.history.user_prompts()
        convs = self.history.conversations()
        if convs and not self.start_new:
            self.open_conversation(convs[0].id)
        else:
            self.action_new_chat()
        if self.size.width < 60:
            self.query_one("#sidebar").display = False
        self.query_one(PromptInput).focus()

    # ------------------------------------------------------------ conversations
    def refresh_sidebar(self) -> None:
        lv = self.query_one("#convs", ListView)
        lv.clear()
        index = None
        for i, c in enumerate(self.history.conversations()):
            lv.append(ConvItem(c.id, c.title))
            if c.id == self.conv_id:
                index = i
        lv.index = index

    def open_conversation(self, conv_id: int) -> None:
        if self.generating:
            self.action_stop()
        conv = self.history.get(conv_id)
        if conv is None:
            return
        self.conv_id = conv.id
        self.settings = conv.settings
        box = self.query_one("#messages", VerticalScroll)
        box.remove_children()
        box.mount_all([ChatMessage(m.role, m.content) for m in self.history.messages(conv.id)])
        box.scroll_end(animate=False)
        self.sub_title = conv.title
        self.refresh_sidebar()
        self.update_status()

    @on(ListView.Selected, "#convs")
    def conv_selected(self, event: ListView.Selected) -> None:
        item = event.item
        if isinstance(item, ConvItem) and item.conv_id != self.conv_id:
            self.open_conversation(item.conv_id)
        self.query_one(PromptInput).focus()

    def action_new_chat(self) -> None:
        if self.conv_id is not None and not self.history.messages(self.conv_id):
            self.query_one(PromptInput).focus()
            return  # the current chat is already empty
        conv = self.history.new_conversation(settings=replace(self.defaults))
        self.open_conversation(conv.id)
        self.query_one(PromptInput).focus()

    def action_delete_chat(self) -> None:
        if self.conv_id is None:
            return
        if self.generating:
            self.action_stop()
        self.history.delete(self.conv_id)
        self.conv_id = None
        rest = self.history.conversations()
        if rest:
            self.open_conversation(rest[0].id)
        else:
            self.action_new_chat()
        self.notify("chat deleted")

    def action_rename(self) -> None:
        conv = self.history.get(self.conv_id) if self.conv_id else None
        if conv is None:
            return

        def done(title: str | None) -> None:
            if title:
                self.history.rename(conv.id, title)
                self.sub_title = title
                self.refresh_sidebar()
        self.push_screen(RenameScreen(conv.title), done)

    def action_settings(self) -> None:
        def done(s: ChatSettings | None) -> None:
            if s is not None and self.conv_id is not None:
                self.settings = s
                self.history.save_settings(self.conv_id, s)
                self.notify("settings saved for this chat")
        self.push_screen(SettingsScreen(self.settings), done)

    def export_path(self) -> Path:
        from edgeq.assets import data_home

        conv = self.history.get(self.conv_id)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", conv.title).strip("-").lower()[:40] or "chat"
        d = self.export_dir or (data_home() / "exports")
        return d / f"chat-{conv.id}-{slug}.md"

    def action_export(self) -> None:
        if self.conv_id is None:
            return
        path = self.export_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.history.export_markdown(self.conv_id), encoding="utf-8")
        self.notify(f"exported to {path}", timeout=8)

    def last_reply(self) -> str | None:
        replies = [m for m in self.query(ChatMessage) if m.role == "assistant"]
        return replies[-1].content if replies else None

    def action_copy_last(self) -> None:
        text = self.last_reply()
        if not text:
            self.notify("no reply to copy yet", severity="warning")
            return
        self.copy_to_clipboard(text)
        self.notify("last reply copied")

    def action_toggle_sidebar(self) -> None:
        sb = self.query_one("#sidebar")
        sb.display = not sb.display

    # ------------------------------------------------------------ model
    def action_pick_model(self) -> None:
        if self.model_factory is None:
            self.notify("no other models can be loaded here", severity="warning")
            return

        def done(choice: str | None) -> None:
            if choice:
                self.load_model(choice)
        self.push_screen(ModelPicker(), done)

    @work(thread=True, exclusive=True, group="load")
    def load_model(self, ref: str) -> None:
        self.call_from_thread(self.notify, f"loading {Path(ref).name}…")
        done: dict = {}

        def load() -> None:
            try:
                done["model"] = self.model_factory(ref)
            except Exception as e:  # noqa: BLE001 - shown to the user, never a traceback
                done["error"] = e

        # a first load compiles kernels for a minute, which nothing can stop: it runs in a daemon thread that
        # this worker abandons when cancelled (quitting, another pick), so Ctrl+Q never waits for it
        loader = threading.Thread(target=load, name="edgeq-load", daemon=True)
        loader.start()
        me = get_current_worker()
        while loader.is_alive():
            loader.join(0.1)
            if me.is_cancelled:
                return
        if "error" in done:
            self.call_from_thread(self.notify, f"cannot load {ref}: {describe_error(done['error'])}",
                                  severity="error", timeout=10)
            return
        model = done["model"]
        self.cancel.set()
        self.model = model
        self.ctx_used = 0
        self.call_from_thread(self.update_status)
        self.call_from_thread(self.notify, f"model: {model.info.get('name')}")

    def update_status(self) -> None:
        if self.model is None:
            text = "no model loaded (Ctrl+O to pick one)"
        else:
            info = self.model.info
            tps = f"{self.last_tps:.1f} tok/s" if self.last_tps else "– tok/s"
            text = (f"{info.get('name', '?')} ({info.get('qtype', '?')}) │ {tps} │ "
                    f"ctx {self.ctx_used}/{self.model.n_ctx}")
            if self.generating:
                text += " │ generating… Esc stops"
        self.query_one("#status", Static).update(text)

    def on_unmount(self) -> None:
        self.cancel.set()  # quitting mid-reply: the worker stops; what it streamed is already saved

    # ------------------------------------------------------------ sending and streaming
    def action_stop(self) -> None:
        if self.generating:
            self.cancel.set()

    @on(PromptInput.Submitted)
    def submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text or self.generating:
            return
        if self.model is None:
            self.notify("no model loaded (Ctrl+O to pick one)", severity="error")
            return
        prompt = self.query_one(PromptInput)
        prompt.text = ""
        prompt.recall.append(text)
        conv = self.history.get(self.conv_id)
        self.history.add_message(self.conv_id, "user", text)
        if conv.title == "New chat":
            self.history.rename(self.conv_id, text.splitlines()[0][:40])
            self.sub_title = text.splitlines()[0][:40]
        self.refresh_sidebar()
        box = self.query_one("#messages", VerticalScroll)
        box.mount(ChatMessage("user", text))
        reply = ChatMessage("assistant", "")
        box.mount(reply)
        box.scroll_end(animate=False)
        self.cancel = threading.Event()
        self.generating = True
        self.update_status()
        self.generate(self.conv_id, reply, self.cancel)

    def fit_messages(self, conv_id: int) -> tuple[list[dict], int]:
        s = self.settings
        turns = [{"role": m.role, "content": m.content} for m in self.history.messages(conv_id)]
        return fit_messages(self.model, turns, s.system, s.max_tokens)

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, conv_id: int, reply: ChatMessage, cancel: threading.Event) -> None:
        model = self.model
        s = self.settings
        text = ""
        msg_id = None
        stream_box: dict = {}
        try:
            messages, dropped = self.fit_messages(conv_id)
            if dropped:
                self.call_from_thread(self.add_note, reply,
                                      f"Dropped the {dropped} oldest message(s) so the prompt and "
                                      f"{s.max_tokens} new tokens fit in the context ({model.n_ctx}).")
            max_tokens = s.max_tokens
            n_prompt = model.count_chat_tokens(messages)
            if n_prompt + max_tokens > model.n_ctx:
                max_tokens = model.n_ctx - n_prompt - 1
                if max_tokens < 1:
                    self.call_from_thread(self.add_note, reply, "This message alone does not fit in the context.")
                    return
                self.call_from_thread(self.add_note, reply, f"Reply limited to {max_tokens} tokens by the context size.")
            msg_id = self.history.add_message(conv_id, "assistant", "")
            pending = ""
            last_push = last_save = time.monotonic()
            pieces = model.chat(messages, max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p,
                                cancel=cancel)
            with contextlib.closing(pieces):  # closing releases the model's lock at once on Esc
                for piece in pieces:
                    text += piece
                    pending += piece
                    now = time.monotonic()
                    if now - last_push >= BATCH_S:
                        self.call_from_thread(self.push_piece, reply, pending, stream_box)
                        pending, last_push = "", now
                    if now - last_save >= SAVE_S:
                        self.history.update_message(msg_id, text)
                        last_save = now
                    if cancel.is_set():
                        break
            if pending:
                self.call_from_thread(self.push_piece, reply, pending, stream_box)
        except Exception as e:  # noqa: BLE001 - a readable note in the chat, never a traceback
            with contextlib.suppress(RuntimeError):  # RuntimeError: the app is gone
                self.call_from_thread(self.add_note, reply, f"Error: {describe_error(e)}")
        finally:
            if msg_id is not None:  # the last save; an empty reply leaves no empty message behind
                if text:
                    self.history.update_message(msg_id, text)
                else:
                    self.history.delete_message(msg_id)
            with contextlib.suppress(RuntimeError):
                self.call_from_thread(self.finish_reply, reply, text, cancel.is_set(), stream_box)

    async def push_piece(self, reply: ChatMessage, piece: str, stream_box: dict) -> None:
        reply.content += piece
        if "stream" not in stream_box:
            stream_box["stream"] = Markdown.get_stream(reply.body)
        await stream_box["stream"].write(piece)
        box = self.query_one("#messages", VerticalScroll)
        if box.max_scroll_y - box.scroll_y < 8:
            box.scroll_end(animate=False)

    async def finish_reply(self, reply: ChatMessage, text: str, stopped: bool, stream_box: dict) -> None:
        if "stream" in stream_box:
            await stream_box["stream"].stop()
        reply.content = text
        await reply.body.update(text)
        if stopped:
            self.add_note(reply, "(stopped)")
        if not text and not stopped and reply.is_attached and not reply.query(".note"):
            reply.remove()
        stats = getattr(self.model, "last_stats", None) or {}
        if stats.get("gen_s"):
            self.last_tps = stats.get("gen_tokens", 0) / stats["gen_s"]
        self.ctx_used = stats.get("prompt_tokens", 0) + stats.get("gen_tokens", 0)
        self.generating = False
        self.update_status()
        self.query_one("#messages", VerticalScroll).scroll_end(animate=False)

    def add_note(self, reply: ChatMessage, text: str) -> None:
        note = Static(text, classes="note", markup=False)
        if reply.is_attached:
            reply.mount(note, before=reply.body if text != "(stopped)" else None)
        else:
            self.query_one("#messages", VerticalScroll).mount(note)

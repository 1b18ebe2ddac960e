"""`edgeq chat`: a Textual chat app over any object with the engine's Model chat API.

The app takes a loaded model and a `model_factory(path_or_name) -> Model` (for the model picker), so
tests inject a fake model. Generation runs in a thread worker; pieces reach the UI in batches through
`call_from_thread`, the reply is rendered with a `MarkdownStream` and saved to SQLite as it grows.

Model names, file names, header fields and the model's text are untrusted: they are shown as plain text
(`markup=False`, `rich.text.Text`), never parsed as Textual markup, and through `safe_terminal_text`, since
Textual passes ESC and C1 control characters on to the terminal. Saved history and copies keep the raw text.
"""
from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from rich.text import Text
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
from edgeq.runtime.reasoning import ThinkSplitter, split_reasoning
from edgeq.text import safe_line, safe_terminal_text
from edgeq.tui.history import ChatSettings, History

# how often streamed pieces are pushed to the UI: each push renders in the app's thread beside the two compute threads
# (SmolLM2 on 2 cores, a real terminal: 81 tok/s streamed at 0.05 s, 93 at 0.1; Model.chat alone 150-160;
# benchmarks/chat_speed.py --batch-s)
BATCH_S = 0.1


def describe_error(e: BaseException) -> str:
    """One readable line for any failure to load or run a model (the UI never shows a traceback)."""
    from edgeq.errors import user_message

    msg = user_message(e)
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
    """One message: a role label and its markdown body; a thinking model's `<think>` block above the body,
    dimmed, collapsed to one line unless the app shows thinking (Ctrl+T, /think). `content` is the raw text,
    tags included, as the history keeps it."""

    def __init__(self, role: str, content: str, show_thinking: bool = False):
        super().__init__(classes=f"msg {role}")
        self.role = role
        self.content = content
        self.show_thinking = show_thinking
        self.reasoning, self.answer = split_reasoning(content) if role == "assistant" else ("", content)

    def compose(self) -> ComposeResult:
        yield Label("You" if self.role == "user" else "Assistant", classes="role")
        if self.role == "user":  # exactly as typed: newlines kept, no markdown surprises
            yield Static(safe_terminal_text(self.content), classes="body", markup=False)
        else:
            think = Static(self.thinking_text(), classes="think", markup=False)
            think.display = bool(self.reasoning)
            yield think
            yield Markdown(safe_terminal_text(self.answer), classes="body")

    def thinking_text(self) -> Text:
        if self.show_thinking:
            return Text(safe_terminal_text(self.reasoning), style="dim italic")
        words = len(self.reasoning.split())
        return Text(f"▸ thought ({words} words): Ctrl+T or /think shows it", style="dim italic")

    def set_thinking(self, reasoning: str | None = None, show: bool | None = None) -> None:
        if reasoning is not None:
            self.reasoning = reasoning
        if show is not None:
            self.show_thinking = show
        if self.role == "assistant" and self.is_mounted:
            think = self.query_one(".think", Static)
            think.update(self.thinking_text())
            think.display = bool(self.reasoning)

    @property
    def body(self) -> Markdown:
        return self.query_one(".body")


class ConvItem(ListItem):
    def __init__(self, conv_id: int, title: str):
        super().__init__(Label(safe_line(title), markup=False))
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
            row = f"{m.name}  {m.size / 1e6:.0f} MB {m.qtype} {m.arch}" + ("  (unreadable)" if m.problem else "")
            opts.append(Text(safe_line(row)))  # file names and header fields: plain text, never markup
        here = {m.name for m in assets.list_local()}
        for a in assets.MODELS.values():
            if a.name not in here:  # pulled on pick (hub or PyPI), the bytes shown in the status bar
                self.choices.append(a.name)
                size = f"{a.shown_size / 1e6:.0f} MB" if a.shown_size else "size unknown"
                note = "" if a.runnable else f", {a.arch}: not supported yet"
                opts.append(Text(f"{a.name}  (pull {size}{note})"))
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
        ("Show or hide thinking", "toggle_thinking", "expand or collapse the <think> blocks of replies (Ctrl+T)"),
        ("Thinking mode on", "thinking_on", "thinking models reason before answering (/think on)"),
        ("Thinking mode off", "thinking_off", "thinking models answer at once (/think off)"),
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
        Binding("ctrl+t", "toggle_thinking", "Thinking", show=False),
    ]

    def _handle_exception(self, error: Exception) -> None:
        """A failure the user can act on (EdgeqError: e.g. the history database failing mid-session) ends the
        app with one line, printed by `edgeq chat` after the screen is restored; anything else is a bug and
        keeps Textual's traceback, without local variables (they hold chat text)."""
        from edgeq.errors import EdgeqError, user_message

        if isinstance(error, EdgeqError):
            self.fatal_message = user_message(error) or str(error)
            self.exit(return_code=1)
            return
        super()._handle_exception(error)

    def _fatal_error(self) -> None:
        from rich.segment import Segments
        from rich.traceback import Traceback

        self.bell()
        self._exit_renderables.append(Segments(self.console.render(Traceback(show_locals=False, width=None),
                                                                   self.console.options)))
        self._close_messages_no_wait()

    def __init__(self, model=None, model_factory: Callable[[str], object] | None = None,
                 history: History | None = None, defaults: ChatSettings | None = None,
                 new_chat: bool = False, export_dir: Path | None = None, enable_thinking: bool | None = None):
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
        self.fatal_message: str | None = None  # a user-facing failure that ended the app, as one line
        self.ctx_used = 0
        self.enable_thinking = enable_thinking  # the template's enable_thinking; None: its default
        self.show_thinking = False              # <think> blocks collapsed to one line

    # ------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="sidebar"):
                yield Label("Chats  ^N new", classes="title")
                yield ListView(id="convs")
            with Vertical(id="chat"):
                yield VerticalScroll(id="messages")
                yield PromptInput(id="prompt", placeholder="Enter: send · Ctrl+J or \\⏎: newline · Esc: stop")
                yield Static("", id="status", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(PromptInput).recall = self.history.user_prompts()
        # the most recent chat no other `edgeq chat` has open (two processes never share a conversation)
        convs = [] if self.start_new else self.history.conversations()
        mine = next((c for c in convs if self.history.claim(c.id)), None)
        if mine is not None:
            self.open_conversation(mine.id)
        else:
            self.action_new_chat()
        if convs and (mine is None or mine.id != convs[0].id):
            self.notify("your latest chat is open in another edgeq chat", severity="warning")
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
        if not self.history.claim(conv.id):
            pid = self.history.owner(conv.id)
            self.notify(f"this chat is open in another edgeq chat{f' (pid {pid})' if pid else ''}",
                        severity="warning")
            self.refresh_sidebar()
            return
        if self.conv_id is not None and self.conv_id != conv.id:
            self.history.release(self.conv_id)
        self.conv_id = conv.id
        self.settings = conv.settings
        box = self.query_one("#messages", VerticalScroll)
        box.remove_children()
        box.mount_all([ChatMessage(m.role, m.content, self.show_thinking) for m in self.history.messages(conv.id)])
        box.scroll_end(animate=False)
        self.sub_title = safe_line(conv.title)
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
                self.sub_title = safe_line(title)
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
        self.notify(safe_line(f"exported to {path}"), timeout=8, markup=False)

    def last_reply(self) -> str | None:
        replies = [m for m in self.query(ChatMessage) if m.role == "assistant"]
        return replies[-1].answer if replies else None

    def action_copy_last(self) -> None:
        text = self.last_reply()
        if not text:
            self.notify("no reply to copy yet", severity="warning")
            return
        self.copy_to_clipboard(text)
        self.notify("last reply copied")

    # ------------------------------------------------------------ thinking
    def action_toggle_thinking(self) -> None:
        self.show_thinking = not self.show_thinking
        for m in self.query(ChatMessage):
            m.set_thinking(show=self.show_thinking)
        self.notify("thinking shown" if self.show_thinking else "thinking collapsed")

    def action_thinking_on(self) -> None:
        self.set_thinking_mode(True)

    def action_thinking_off(self) -> None:
        self.set_thinking_mode(False)

    def set_thinking_mode(self, on: bool | None) -> None:
        self.enable_thinking = on
        said = {True: "on: thinking models reason first", False: "off: thinking models answer at once",
                None: "the model's default"}[on]
        self.notify(f"thinking mode {said}")

    def think_command(self, text: str) -> bool:
        """`/think` (show or hide thinking), `/think on|off|default` (the thinking mode): True if it was one."""
        words = text.split()
        if not words or words[0] != "/think" or len(words) > 2:
            return False
        if len(words) == 1:
            self.action_toggle_thinking()
            return True
        mode = {"on": True, "off": False, "default": None}.get(words[1].lower(), "?")
        if mode == "?":
            self.notify("use /think, /think on, /think off or /think default", severity="warning")
        else:
            self.set_thinking_mode(mode)
        return True

    def template_kwargs(self) -> dict:
        """Keyword arguments for the model's chat calls (none when the template's default stands)."""
        if self.enable_thinking is None:
            return {}
        return {"template_kwargs": {"enable_thinking": self.enable_thinking}}

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
        self.call_from_thread(self.notify, safe_line(f"loading {Path(ref).name}…"), markup=False)
        done: dict = {}

        def load() -> None:
            try:
                done["model"] = self.model_factory(ref, progress=self._pull_progress) \
                    if self._factory_takes_progress() else self.model_factory(ref)
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
            self.call_from_thread(self.notify, safe_line(f"cannot load {ref}: {describe_error(done['error'])}"),
                                  severity="error", timeout=10, markup=False)
            return
        model = done["model"]
        self.cancel.set()
        self.model = model
        self.ctx_used = 0
        self.call_from_thread(self.update_status)
        self.call_from_thread(self.notify, safe_line(f"model: {model.info.get('name')}"), markup=False)

    def _factory_takes_progress(self) -> bool:
        import inspect

        try:
            return "progress" in inspect.signature(self.model_factory).parameters
        except (TypeError, ValueError):
            return False

    def _pull_progress(self, done: int, total: int, label: str) -> None:
        """Called from the loading thread while a model is downloaded: the bytes so far in the status bar."""
        pct = 100 * done / total if total else 0.0
        line = safe_line(f"pulling {label}: {pct:5.1f}% ({done / 1e6:.0f}/{total / 1e6:.0f} MB)", 1000)
        self.call_from_thread(self.query_one("#status", Static).update, Text(line))

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
        self.query_one("#status", Static).update(Text(safe_line(text, 1000)))  # the name comes from the file

    def on_unmount(self) -> None:
        self.cancel.set()  # quitting mid-reply: the worker stops; what it streamed is already saved
        if self.conv_id is not None:
            self.history.release(self.conv_id)  # another `edgeq chat` may open it now

    # ------------------------------------------------------------ sending and streaming
    def action_stop(self) -> None:
        if self.generating:
            self.cancel.set()

    @on(PromptInput.Submitted)
    def submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text or self.generating:
            return
        if self.think_command(text):
            self.query_one(PromptInput).text = ""
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
            self.sub_title = safe_line(text.splitlines()[0][:40])
        self.refresh_sidebar()
        box = self.query_one("#messages", VerticalScroll)
        box.mount(ChatMessage("user", text))
        reply = ChatMessage("assistant", "", self.show_thinking)
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
            n_prompt = model.count_chat_tokens(messages, **self.template_kwargs())
            if n_prompt + max_tokens > model.n_ctx:
                max_tokens = model.n_ctx - n_prompt - 1
                if max_tokens < 1:
                    self.call_from_thread(self.add_note, reply, "This message alone does not fit in the context.")
                    return
                self.call_from_thread(self.add_note, reply, f"Reply limited to {max_tokens} tokens by the context size.")
            msg_id = self.history.add_message(conv_id, "assistant", "")
            pending = ""
            last_push = time.monotonic()
            pieces = model.chat(messages, max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p,
                                cancel=cancel, **self.template_kwargs())
            with contextlib.closing(pieces):  # closing releases the model's lock at once on Esc
                for piece in pieces:
                    text += piece
                    pending += piece
                    now = time.monotonic()
                    if now - last_push >= BATCH_S:
                        # saved before it is shown: a kill at any moment leaves all that was on screen on disk
                        self.history.update_message(msg_id, text)
                        self.call_from_thread(self.push_piece, reply, pending, stream_box)
                        pending, last_push = "", now
                    if cancel.is_set():
                        break
            if pending:
                self.history.update_message(msg_id, text)
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
        splitter = stream_box.setdefault("think", ThinkSplitter())
        reasoning, piece = splitter.feed_pair(piece)
        if reasoning:
            reply.set_thinking(splitter.reasoning)
        if not piece:
            return
        reply.answer = splitter.content
        if "stream" not in stream_box:
            stream_box["stream"] = Markdown.get_stream(reply.body)
        await stream_box["stream"].write(safe_terminal_text(piece))  # per character: split sequences too
        box = self.query_one("#messages", VerticalScroll)
        if box.max_scroll_y - box.scroll_y < 8:
            box.scroll_end(animate=False)

    async def finish_reply(self, reply: ChatMessage, text: str, stopped: bool, stream_box: dict) -> None:
        if "stream" in stream_box:
            await stream_box["stream"].stop()
        reply.content = text
        reasoning, reply.answer = split_reasoning(text)
        reply.set_thinking(reasoning)
        await reply.body.update(safe_terminal_text(reply.answer))
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
        note = Static(safe_terminal_text(text), classes="note", markup=False)
        if reply.is_attached:
            reply.mount(note, before=reply.body if text != "(stopped)" else None)
        else:
            self.query_one("#messages", VerticalScroll).mount(note)

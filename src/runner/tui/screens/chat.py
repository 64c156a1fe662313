"""The main screen: history sidebar, plan panel, conversation, message box, status line.

Two thread workers do the slow work and post messages back (see `runner.tui.messages`):
  * `load_model`: spec -> plan -> (import the default model) -> the app's source loads -> Session
  * `generate`:   Session.stream(...) -> one ReplyChunk per step -> ReplyEnded / ReplyFailed
Every change to the screen happens in the handlers, on the UI thread. Writes to the history are
handed to the app's `HistoryRecorder`, which makes them in its own thread: the streamed reply at
most ten times a second, so a kill loses at most that last fraction of a second of it.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from runner.backend import GenerationChunk, Message, MemoryReport, Sampling, Session
from runner.budget import OFFLOAD, Plan
from runner.default_model import imported_folder
from runner.errors import RunnerError
from runner.tui import messages as msg
from runner.tui.history import COMPLETE, ERROR, PARTIAL, STOPPED, export_file_name, title_from
from runner.tui.loading import ModelChoice, weights_spec
from runner.tui.prompt import fit_to_context
from runner.tui.recorder import Row
from runner.tui.screens.confirm import ConfirmScreen
from runner.tui.screens.help import HelpScreen
from runner.tui.screens.picker import PickerScreen
from runner.tui.screens.settings import ChatSettings, SettingsScreen
from runner.tui.text import human_bytes, short_model_name
from runner.tui.widgets.conversation import AssistantMessage, Conversation, UserMessage
from runner.tui.widgets.plan_panel import PlanPanel

# unified memory: warn when the plan uses more than this share of what the GPU may wire
UNIFIED_PRESSURE = 0.75


@dataclass
class ActiveReply:
    """The reply being generated now."""

    row: Row                 # its message in the history
    widget: AssistantMessage
    cancel: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    last_chunk: GenerationChunk | None = None


def pressure_warning(plan: Plan | None, report: MemoryReport | None = None) -> str:
    """The banner text for offload or unified-memory pressure, or '' when there is none."""
    if plan is None:
        return ""
    offloaded = [share.device for share in plan.placement if share.kind in ("cpu", "disk") and share.weights_bytes]
    if plan.verdict == OFFLOAD or (plan.machine.gpus and offloaded):
        return (
            f"▲ Part of this model is offloaded to {' and '.join(offloaded) or 'CPU or disk'}: replies will be "
            f"many times slower. A smaller quant or a shorter context may fit (Ctrl+O to pick another model)."
        )
    for share in plan.placement:
        if share.kind == "unified" and share.total_bytes > UNIFIED_PRESSURE * share.capacity_bytes:
            return (
                f"▲ Memory pressure: this model uses {human_bytes(share.total_bytes)} of the "
                f"{human_bytes(share.capacity_bytes)} the GPU may use; macOS may swap and replies slow down sharply."
            )
    # measured: a backend that put weights on the CPU or disk beside a GPU (the plan did not)
    if report is not None and any(device.startswith("cuda") for device in report.measured):
        if report.measured.get("cpu", 0) + report.measured.get("disk", 0) > 0:
            return "▲ The backend placed part of the model on the CPU or disk: replies will be slow."
    return ""


class ChatScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+o", "pick_model", "Model"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+b", "toggle_sidebar", "History"),
        Binding("ctrl+l", "toggle_plan", "Plan"),
        Binding("ctrl+t", "export", "Export"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "app.quit", "Quit"),
        Binding("pageup", "scroll_conversation(-1)", "Scroll up", show=False),
        Binding("pagedown", "scroll_conversation(1)", "Scroll down", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.session: Session | None = None
        self.plan: Plan | None = None
        self.choice: ModelChoice | None = None
        self.model_state = "none"            # "none", "loading", "ready" or "failed"
        self.load_id = 0                     # counts loads; only the latest one's messages count
        self.conversation: Row | None = None   # the open conversation in the history
        self.reply: ActiveReply | None = None
        self.settings = self.app.initial_settings
        self.timing = ""                     # "first token 0.21 s · 17.9 tokens/s" of the last reply
        self.generation_lock = threading.Lock()   # one stream at a time on a Session

    # ---- layout ----------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Label("History", classes="panel-title")
                yield OptionList(id="history-list")
                yield Static("Enter open · Del delete", id="sidebar-hint")
            with Vertical(id="main"):
                yield Static("", id="banner")
                yield PlanPanel(id="plan")
                yield Conversation(id="conversation")
                yield Input(placeholder="Message (Enter to send)", id="prompt")
        with Horizontal(id="status"):
            yield Static("", id="status-model")
            yield Static("", id="status-speed")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#banner").display = False
        self.refresh_history_list()
        self.update_status()
        self.query_one("#prompt").focus()
        history = self.app.history
        if history.recovered_from is not None:
            self.notify(
                f"The chat history could not be read ({history.recovery_reason}). It was kept aside as "
                f"{history.recovered_from}; a fresh history was started.",
                title="History database damaged",
                severity="error",
                timeout=30,
            )
        if self.app.history_problem:
            self.notify(
                f"{self.app.history_problem}. This session's conversations are not saved; the history "
                "file was left as it is.",
                title="History not available",
                severity="error",
                timeout=30,
            )
        if self.app.pick_at_start:
            self.model_state = "none"
            self.show_empty_hint()
            self.action_pick_model()
        else:
            self.start_load(self.app.choice)

    @property
    def history(self):
        """The history, to read (on the UI thread)."""
        return self.app.history

    @property
    def recorder(self):
        """Writes to the history, made off the UI thread."""
        return self.app.recorder

    @property
    def conversation_id(self) -> int | None:
        """The open conversation's id in the history (None until it is written)."""
        return self.conversation.id if self.conversation is not None else None

    # ---- loading a model -------------------------------------------------------------------
    def start_load(self, choice: ModelChoice) -> None:
        self.choice = choice
        self.plan = None
        self.load_id += 1
        old, self.session = self.session, None
        if self.reply is not None:
            self.stop_reply()
        self.model_state = "loading"
        panel = self.query_one(PlanPanel)
        panel.display = True
        panel.reset(f"working out the plan for {choice.model_name}…")
        self.show_banner("")
        self.show_empty_hint()
        self.update_status()
        self.load_model(self.load_id, choice, old)

    @work(thread=True, exclusive=True, group="load")
    def load_model(self, load_id: int, choice: ModelChoice, old: Session | None) -> None:
        worker = get_current_worker()
        if old is not None:
            with self.generation_lock:   # let a stopping reply finish its last token first
                old.close()

        def progress(update) -> None:
            if not worker.is_cancelled:
                self.post_message(msg.LoadProgressed(load_id, update))

        try:
            spec, plan = self.app.source.plan(choice, self.app.machine())
            self.post_message(msg.PlanReady(load_id, plan))
            spec = weights_spec(choice, spec, progress)
            session = self.app.source.load(choice, spec, plan, progress)
        except RunnerError as error:
            self.post_message(msg.LoadFailed(load_id, str(error)))
            return
        except Exception as error:  # a bug or an unforeseen failure: show it, stay usable
            self.post_message(msg.LoadFailed(load_id, f"{type(error).__name__}: {error}"))
            return
        if worker.is_cancelled:  # another model was picked meanwhile
            session.close()
            return
        try:
            report = session.memory()
        except Exception:  # measuring is a nicety; never lose the session over it
            report = None
        self.post_message(msg.ModelLoaded(load_id, session, report))

    def on_plan_ready(self, message: msg.PlanReady) -> None:
        if message.load_id != self.load_id:
            return
        self.plan = message.plan
        self.query_one(PlanPanel).show_plan(message.plan)
        self.show_banner(pressure_warning(message.plan))
        self.update_status()

    def on_load_progressed(self, message: msg.LoadProgressed) -> None:
        if message.load_id == self.load_id and self.model_state == "loading":
            self.query_one(PlanPanel).show_progress(message.progress)

    def on_model_loaded(self, message: msg.ModelLoaded) -> None:
        if message.load_id != self.load_id:  # another model was picked while this one loaded
            message.session.close()
            return
        self.session = message.session
        self.model_state = "ready"
        panel = self.query_one(PlanPanel)
        if self.plan is not None:
            panel.show_plan(self.plan, message.report)
        panel.show_loaded(message.session.device_summary)
        self.show_banner(pressure_warning(self.plan, message.report))
        self.show_empty_hint()
        self.update_status()

    def on_load_failed(self, message: msg.LoadFailed) -> None:
        if message.load_id != self.load_id:
            return
        self.model_state = "failed"
        panel = self.query_one(PlanPanel)
        panel.display = True
        if self.plan is None:
            panel.show_message("No plan: runner could not read this model's shape.")
        panel.show_error(message.error + "\nPress Ctrl+O to pick another model.")
        self.show_empty_hint()
        self.update_status()

    # ---- chatting --------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    async def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.session is None:
            why = "is still loading" if self.model_state == "loading" else "is not loaded"
            self.notify(f"The model {why}; Ctrl+O picks another.", severity="warning")
            return
        if self.reply is not None:
            self.notify("A reply is being written: Esc stops it.", severity="warning")
            return
        event.input.value = ""
        turns = self.prompt_messages() + [Message("user", text)]
        if self.conversation is None:
            self.conversation = self.recorder.new_conversation(
                title_from(text), self.choice.model_name, self.settings.system_prompt
            )
        # The user's turn is queued for the history before generation starts; so is the reply's row.
        self.recorder.add_message(self.conversation, "user", text, COMPLETE)
        row = self.recorder.add_message(self.conversation, "assistant", "", PARTIAL)
        conversation_view = self.query_one(Conversation)
        self.query_one(PlanPanel).display = False   # room for the conversation; Ctrl+L shows it
        await conversation_view.add_user(text)
        widget = await conversation_view.add_assistant(streaming=True)
        self.reply = ActiveReply(row, widget)
        self.timing = ""
        self.update_status()
        self.refresh_bindings()
        self.generate(turns, self.settings.sampling(), self.reply)

    def prompt_messages(self) -> list[Message]:
        """The conversation as the model sees it: the system prompt, then every turn on screen
        that has text (what the user sees is what the model gets, saved or not)."""
        turns = [Message("system", self.settings.system_prompt)] if self.settings.system_prompt else []
        for widget in self.query_one(Conversation).query("UserMessage, AssistantMessage"):
            if widget.content:
                turns.append(Message("user" if isinstance(widget, UserMessage) else "assistant", widget.content))
        return turns

    @work(thread=True, group="reply")
    def generate(self, turns: list[Message], sampling: Sampling, reply: ActiveReply) -> None:
        with self.generation_lock:
            session = self.session
            if session is None or reply.cancel.is_set():
                self.post_message(msg.ReplyEnded(reply.row, "cancelled"))
                return
            finish = "stop"
            try:
                turns, dropped = fit_to_context(turns, session.tokenize, self.plan.context, sampling.max_tokens)
                if dropped:
                    self.post_message(msg.TurnsLeftOut(dropped, self.plan.context))
                for chunk in session.stream(turns, sampling, reply.cancel):
                    self.post_message(msg.ReplyChunk(reply.row, chunk))
                    if chunk.finish_reason:
                        finish = chunk.finish_reason
            except Exception as error:  # RunnerError or not: shown in the conversation
                detail = str(error) if isinstance(error, RunnerError) else f"{type(error).__name__}: {error}"
                self.post_message(msg.ReplyFailed(reply.row, detail))
                return
            self.post_message(msg.ReplyEnded(reply.row, finish))

    def _current(self, row: Row) -> ActiveReply | None:
        reply = self.reply
        return reply if reply is not None and reply.row is row else None

    async def on_reply_chunk(self, message: msg.ReplyChunk) -> None:
        reply = self._current(message.reply)
        if reply is None:  # stopped already: the rest is dropped
            return
        reply.last_chunk = message.chunk
        if message.chunk.text:
            reply.text += message.chunk.text
            await reply.widget.append(message.chunk.text)
            self.recorder.stream_reply(reply.row, reply.text)   # on disk within a tenth of a second
            self.query_one(Conversation).scroll_end(animate=False)
        self.timing = timing_text(message.chunk)
        self.update_status()

    def on_turns_left_out(self, message: msg.TurnsLeftOut) -> None:
        self.notify(
            f"The {message.count} oldest turns of this conversation no longer fit the context of "
            f"{message.context:,} tokens; they are left out of the prompt (still in the history).",
            severity="warning",
        )

    async def on_reply_ended(self, message: msg.ReplyEnded) -> None:
        reply = self._current(message.reply)
        if reply is None:
            return
        state = STOPPED if message.finish_reason == "cancelled" else COMPLETE
        await self.finish_reply(reply, state)
        if message.finish_reason == "length":
            self.notify(
                f"The reply reached the limit of {self.settings.max_tokens} tokens (Ctrl+S to raise it).",
                severity="warning",
            )

    async def on_reply_failed(self, message: msg.ReplyFailed) -> None:
        reply = self._current(message.reply)
        if reply is None:
            return
        await self.finish_reply(reply, ERROR, message.error)

    async def finish_reply(self, reply: ActiveReply, state: str, error: str = "") -> None:
        self.reply = None
        self.recorder.finish_reply(reply.row, reply.text, state, error)
        await reply.widget.finish(state, error)
        self.query_one(Conversation).scroll_end(animate=False)
        self.update_status()
        self.refresh_bindings()

    def stop_reply(self) -> ActiveReply | None:
        """Stop the reply now: the backend stops before its next token; the text so far stays."""
        reply = self.reply
        if reply is None:
            return None
        reply.cancel.set()
        self.reply = None
        self.recorder.finish_reply(reply.row, reply.text, STOPPED)
        return reply

    async def action_stop(self) -> None:
        reply = self.stop_reply()
        if reply is not None:
            await reply.widget.finish(STOPPED)
            self.update_status()
            self.refresh_bindings()

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "stop":
            return True if self.reply is not None else None  # None: shown greyed out
        return True

    # ---- conversations ---------------------------------------------------------------------
    def refresh_history_list(self) -> None:
        options = self.query_one("#history-list", OptionList)
        highlighted = options.highlighted
        options.clear_options()
        for conversation in self.history.conversations():
            marker = "▸ " if conversation.id == self.conversation_id else "  "
            title = Text(marker + conversation.title, no_wrap=True, overflow="ellipsis")
            options.add_option(Option(title, id=str(conversation.id)))
        if options.option_count:
            options.highlighted = min(highlighted or 0, options.option_count - 1)
        self.query_one("#sidebar-hint", Static).update(
            "Enter open · Del delete" if options.option_count else "No conversations yet"
        )

    async def open_conversation(self, conversation_id: int) -> None:
        if self.reply is not None:
            await self.action_stop()
        self.recorder.wait_idle(1.0)   # its last writes are on disk (a few ms; bounded if the disk is stuck)
        conversation = self.history.conversation(conversation_id)
        if conversation is None:
            return
        self.conversation = Row(conversation_id)
        self.settings = ChatSettings(
            conversation.system_prompt, self.settings.temperature, self.settings.top_p, self.settings.max_tokens
        )
        if self.model_state == "ready":
            self.query_one(PlanPanel).display = False   # room for the conversation; Ctrl+L shows it
        await self.query_one(Conversation).show_messages(self.history.messages(conversation_id))
        self.show_empty_hint()
        self.refresh_history_list()
        self.query_one("#prompt").focus()

    @on(OptionList.OptionSelected, "#history-list")
    async def history_selected(self, event: OptionList.OptionSelected) -> None:
        await self.open_conversation(int(event.option.id))

    async def on_key(self, event) -> None:
        options = self.query_one("#history-list", OptionList)
        if event.key in ("delete", "d") and self.focused is options and options.highlighted is not None:
            event.stop()
            conversation_id = int(options.get_option_at_index(options.highlighted).id)
            self.confirm_delete(conversation_id)

    def confirm_delete(self, conversation_id: int) -> None:
        conversation = self.history.conversation(conversation_id)
        if conversation is None:
            return

        async def answered(yes: bool | None) -> None:
            if not yes:
                return
            if conversation_id == self.conversation_id:
                await self.action_new_chat()
            self.recorder.delete_conversation(conversation_id)
            self.notify(f"Deleted “{conversation.title}”.")

        self.app.push_screen(ConfirmScreen(f"Delete “{conversation.title}”? This cannot be undone.", "Delete"), answered)

    async def action_new_chat(self) -> None:
        if self.reply is not None:
            await self.action_stop()
        self.conversation = None
        await self.query_one(Conversation).clear()
        self.show_empty_hint()
        self.refresh_history_list()
        self.query_one("#prompt").focus()

    def action_export(self) -> None:
        conversation_id = self.conversation_id
        options = self.query_one("#history-list", OptionList)
        if self.focused is options and options.highlighted is not None:
            conversation_id = int(options.get_option_at_index(options.highlighted).id)
        if conversation_id is None:
            self.notify("Nothing to export yet: send a message or open a conversation.", severity="warning")
            return
        self.recorder.wait_idle(1.0)
        conversation = self.history.conversation(conversation_id)
        path = Path.cwd() / export_file_name(conversation)
        try:
            path.write_text(self.history.export_markdown(conversation_id))
        except OSError as error:
            self.notify(f"Could not write {path}: {error.strerror}", severity="error")
            return
        self.notify(f"Exported to {path}", title="Export")

    # ---- other screens ---------------------------------------------------------------------
    def action_pick_model(self) -> None:
        current = self.choice.model_name if self.choice else None

        def picked(model: str | None) -> None:
            if model is None:
                if self.model_state == "none":
                    self.show_empty_hint()
                return
            base = self.choice or self.app.choice
            self.start_load(ModelChoice(model, base.backend, None, base.context, base.allow_offload))

        self.app.push_screen(PickerScreen(self.app.machine, current), picked)

    def action_settings(self) -> None:
        def saved(settings: ChatSettings | None) -> None:
            if settings is None:
                return
            self.settings = settings
            self.recorder.set_setting("chat", asdict(settings))   # the defaults next time
            if self.conversation is not None:
                self.recorder.set_system_prompt(self.conversation, settings.system_prompt)
            self.notify(
                f"temperature {settings.temperature} · top-p {settings.top_p} · max tokens {settings.max_tokens}",
                title="Settings saved",
            )

        self.app.push_screen(SettingsScreen(self.settings), saved)

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen(str(self.history.path)))

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar")
        sidebar.display = not sidebar.display

    def action_scroll_conversation(self, pages: int) -> None:
        conversation = self.query_one(Conversation)
        if pages < 0:
            conversation.scroll_page_up()
        else:
            conversation.scroll_page_down()

    def action_toggle_plan(self) -> None:
        panel = self.query_one(PlanPanel)
        panel.display = not panel.display

    # ---- status, banner, hints -------------------------------------------------------------
    def show_banner(self, text: str) -> None:
        banner = self.query_one("#banner", Static)
        banner.update(text)
        banner.display = bool(text)

    def show_empty_hint(self) -> None:
        name = short_model_name(self.choice.model_name) if self.choice else "a model"
        loading = f"Loading {name}… you can browse the history meanwhile."
        if self.choice is not None and self.choice.model is None and imported_folder() is None:
            loading += "\nFirst run: runner imports its built-in model once (under a minute); later starts take seconds."
        hint = {
            "ready": f"Ask {name} anything.  Enter sends · Esc stops a reply · F1 lists the keys",
            "loading": loading,
            "failed": "No model is loaded. Ctrl+O picks another; the history stays readable.",
            "none": "No model is loaded. Ctrl+O picks one.",
        }[self.model_state]
        self.query_one(Conversation).show_empty_hint(hint)

    def update_status(self) -> None:
        """Left: model, backend, quant, placement. Right: speed of the last reply, how to switch."""
        model = Text(short_model_name(self.choice.model_name) if self.choice else "no model", "bold")
        if self.model_state == "ready" and self.session is not None:
            # the placement's first clause ("cuda:0 (all 32 layers)"); the plan panel has the rest
            placement = self.session.device_summary.split(";")[0]
            model.append(f" · {self.session.backend} · {self.session.quant} · {placement}")
        elif self.model_state == "loading":
            model.append(" · loading…", "yellow")
        elif self.model_state == "failed":
            model.append(" · did not load", "red")
        model.no_wrap = True
        model.overflow = "ellipsis"
        speed = Text()
        if self.reply is not None:
            speed.append("● writing · " if self.timing else "● thinking… ", "bold green")
        if self.timing:
            speed.append(self.timing + " ")
        speed.append("│ Ctrl+O other model", "dim")
        self.query_one("#status-model", Static).update(model)
        self.query_one("#status-speed", Static).update(speed)


def timing_text(chunk: GenerationChunk) -> str:
    if chunk.generation_tokens == 0:
        return ""
    text = f"first token {chunk.time_to_first_token:.2f} s"
    if chunk.generation_tps > 0:
        text = f"{chunk.generation_tps:.1f} tokens/s · " + text
    return text

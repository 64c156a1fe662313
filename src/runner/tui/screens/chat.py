"""The main screen: it composes the widgets, routes their messages, and binds the keys.

    HistorySidebar │ Banner        (widgets/banner.py: offload, memory pressure, backend warnings)
    (widgets/      │ PlanPanel     (widgets/plan_panel.py: the plan, the load, measured memory)
    history_       │ Conversation  (widgets/conversation.py: the turns, the reply as it streams)
    sidebar.py)    │ PromptInput   (widgets/prompt_input.py: the message box)
    StatusLine     (widgets/status_line.py: model, speed, history not saved)

What is not drawn is delegated: `ModelLoader` (controllers/model_loader.py) loads a model in a
thread worker; `ReplyWriter` (controllers/replies.py) generates a reply in another; the app's
`HistoryRecorder` (recorder.py) writes the history in a thread of its own. The workers post the
small messages of `runner.tui.messages`; every change to the screen happens in the handlers here.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, replace

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Input

from runner.backend import Message
from runner.default_model import imported_folder
from runner.tui import messages as msg
from runner.tui.controllers.model_loader import ModelLoader
from runner.tui.controllers.replies import ActiveReply, ReplyWriter
from runner.tui.export import ExportError, write_export
from runner.tui.history import COMPLETE, ERROR, PARTIAL, STOPPED, export_file_name, title_from
from runner.tui.loading import LocalSource, ModelChoice
from runner.tui.recorder import Row
from runner.tui.screens.help import HelpScreen
from runner.tui.screens.kv_cache import KvCacheScreen, KvPicked
from runner.tui.screens.picker import PickerScreen
from runner.tui.screens.settings import ChatSettings, SettingsScreen
from runner.tui.text import short_model_name
from runner.tui.widgets.banner import Banner, load_warnings
from runner.tui.widgets.conversation import Conversation, UserMessage
from runner.tui.widgets.history_sidebar import HistorySidebar
from runner.tui.widgets.plan_panel import PlanPanel
from runner.tui.widgets.prompt_input import PromptInput
from runner.tui.widgets.status_line import StatusLine
from runner.words import counted

HISTORY_WAIT = 1.0   # seconds to wait for queued history writes before reading them back


class ChatScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+o", "pick_model", "Model"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+b", "toggle_sidebar", "History"),
        Binding("ctrl+l", "toggle_plan", "Plan"),
        Binding("ctrl+t", "export", "Export"),
        Binding("ctrl+g", "kv_cache", "KV cache", show=False),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "app.quit", "Quit"),
        Binding("pageup", "scroll_conversation(-1)", "Scroll up", show=False),
        Binding("pagedown", "scroll_conversation(1)", "Scroll down", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.loader = ModelLoader(self)
        self.replies = ReplyWriter(self, self.loader, self.app.recorder)
        self.conversation: Row | None = None   # the open conversation in the history
        self.settings = self.app.initial_settings
        self.history_problem: str | None = self.app.history_problem or None

    # ---- what the tests and the app read ------------------------------------------------------
    @property
    def model_state(self) -> str:
        return self.loader.state

    @property
    def session(self):
        return self.loader.session

    @property
    def generation_lock(self):
        return self.loader.generation_lock

    @property
    def reply(self) -> ActiveReply | None:
        return self.replies.active

    @property
    def conversation_id(self) -> int | None:
        """The open conversation's id in the history (None until it is written)."""
        return self.conversation.id if self.conversation is not None else None

    @property
    def history(self):
        """The history, to read (on the UI thread); writes go through `self.app.recorder`."""
        return self.app.history

    # ---- layout ----------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            yield HistorySidebar(id="sidebar")
            with Vertical(id="main"):
                yield Banner("", id="banner")
                yield PlanPanel(id="plan")
                yield Conversation(id="conversation")
                yield PromptInput(placeholder="Message (Enter to send)", id="prompt")
        yield StatusLine(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_history_list()
        self.update_status()
        self.query_one("#prompt").focus()
        history = self.app.history
        if history.recovered_from is not None:
            self.notify(
                f"The chat history could not be read ({history.recovery_reason}). It was kept aside as "
                f"{history.recovered_from}; a fresh history was started.",
                title="History database damaged", severity="error", timeout=30,
            )
        if self.app.history_problem:
            self.notify(
                f"{self.app.history_problem}. This session's conversations are not saved; the history "
                "file was left as it is.",
                title="History not available", severity="error", timeout=30,
            )
        if self.app.pick_at_start:
            self.show_empty_hint()
            self.action_pick_model()
        else:
            self.start_load(self.app.choice)

    # ---- loading a model (ModelLoader) ---------------------------------------------------------
    def start_load(self, choice: ModelChoice) -> None:
        reply = self.stop_reply()
        if reply is not None:
            self.call_later(reply.widget.finish, STOPPED)
        self.loader.start(choice)
        panel = self.query_one(PlanPanel)
        panel.display = True
        panel.reset(f"working out the plan for {choice.model_name}…")
        self.query_one(Banner).show([])
        self.show_empty_hint()
        self.update_status()

    def on_plan_ready(self, message: msg.PlanReady) -> None:
        if self.loader.accept_plan(message):
            self.query_one(PlanPanel).show_plan(message.plan)
            self.query_one(Banner).show(load_warnings(message.plan))
            self.update_status()

    def on_load_progressed(self, message: msg.LoadProgressed) -> None:
        if self.loader.accept_progress(message):
            self.query_one(PlanPanel).show_progress(message.progress)

    def on_model_loaded(self, message: msg.ModelLoaded) -> None:
        if not self.loader.accept_loaded(message):
            return
        panel = self.query_one(PlanPanel)
        if self.loader.plan is not None:
            panel.show_plan(self.loader.plan, message.report)
        panel.show_loaded(message.session.device_summary)
        self.query_one(Banner).show(load_warnings(self.loader.plan, message.report, message.session))
        self.show_empty_hint()
        self.update_status()

    def on_load_failed(self, message: msg.LoadFailed) -> None:
        if not self.loader.accept_failure(message):
            return
        panel = self.query_one(PlanPanel)
        panel.display = True
        if self.loader.plan is None:
            panel.show_message("No plan: runner could not read this model's shape.")
        panel.show_error(message.error + "\nPress Ctrl+O to pick another model.")
        self.show_empty_hint()
        self.update_status()

    # ---- chatting (ReplyWriter) ------------------------------------------------------------------
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
        recorder = self.app.recorder
        if self.conversation is None:
            self.conversation = recorder.new_conversation(
                title_from(text), self.loader.choice.model_name, self.settings.system_prompt
            )
        # The user's turn is handed to the history before generation starts; so is the reply's row.
        recorder.add_message(self.conversation, "user", text, COMPLETE)
        row = recorder.add_message(self.conversation, "assistant", "", PARTIAL)
        conversation_view = self.query_one(Conversation)
        self.query_one(PlanPanel).display = False   # room for the conversation; Ctrl+L shows it
        await conversation_view.add_user(text)
        widget = await conversation_view.add_assistant(streaming=True)
        self.replies.start(turns, self.settings.sampling(), row, widget)
        self.update_status()
        self.refresh_bindings()

    def prompt_messages(self) -> list[Message]:
        """The conversation as the model sees it: the system prompt, then every turn on screen
        that has text (what the user sees is what the model gets, saved or not)."""
        turns = [Message("system", self.settings.system_prompt)] if self.settings.system_prompt else []
        for widget in self.query_one(Conversation).query("UserMessage, AssistantMessage"):
            if widget.content:
                turns.append(Message("user" if isinstance(widget, UserMessage) else "assistant", widget.content))
        return turns

    async def on_reply_chunk(self, message: msg.ReplyChunk) -> None:
        if await self.replies.add_chunk(message):
            self.query_one(Conversation).scroll_end(animate=False)
            self.update_status()

    def on_turns_left_out(self, message: msg.TurnsLeftOut) -> None:
        one = message.count == 1
        turns = "The oldest turn of this conversation no longer fits" if one else \
            f"The {message.count} oldest turns of this conversation no longer fit"
        self.notify(
            f"{turns} the context of {counted(message.context, 'token', ',')}; "
            f"{'it is' if one else 'they are'} left out of the prompt (still in the history).",
            severity="warning",
        )

    async def on_reply_ended(self, message: msg.ReplyEnded) -> None:
        reply = self.replies.current(message)
        if reply is None:
            return
        await self.finish_reply(reply, STOPPED if message.finish_reason == "cancelled" else COMPLETE)
        if message.finish_reason == "length":
            self.notify(
                f"The reply reached the limit of {counted(self.settings.max_tokens, 'token')} "
                "(Ctrl+S to raise it).",
                severity="warning",
            )

    async def on_reply_failed(self, message: msg.ReplyFailed) -> None:
        reply = self.replies.current(message)
        if reply is not None:
            await self.finish_reply(reply, ERROR, message.error)

    async def finish_reply(self, reply: ActiveReply, state: str, error: str = "") -> None:
        await self.replies.finish(reply, state, error)
        self.query_one(Conversation).scroll_end(animate=False)
        self.update_status()
        self.refresh_bindings()

    def stop_reply(self) -> ActiveReply | None:
        """Stop the reply now (kept, marked stopped in the history); the widget is marked by the caller."""
        return self.replies.stop()

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

    # ---- conversations (HistorySidebar) -----------------------------------------------------------
    def refresh_history_list(self) -> None:
        # the recorder thread's "saved" can arrive while the app is closing and the sidebar is gone
        for sidebar in self.query(HistorySidebar):
            sidebar.show(self.history.conversations(), self.conversation_id)

    async def settled_history(self) -> None:
        """Wait (without freezing the screen) until the writes handed over so far are on disk."""
        await asyncio.to_thread(self.app.recorder.wait_idle, HISTORY_WAIT)

    async def on_conversation_opened(self, message: msg.ConversationOpened) -> None:
        await self.open_conversation(message.conversation_id)

    async def open_conversation(self, conversation_id: int) -> None:
        await self.action_stop()
        await self.settled_history()
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

    async def on_conversation_deleted(self, message: msg.ConversationDeleted) -> None:
        if message.conversation_id == self.conversation_id:
            await self.action_new_chat()
        self.app.recorder.delete_conversation(message.conversation_id)
        self.notify(f"Deleted “{message.title}”.")

    async def action_new_chat(self) -> None:
        await self.action_stop()
        self.conversation = None
        await self.query_one(Conversation).clear()
        self.show_empty_hint()
        self.refresh_history_list()
        self.query_one("#prompt").focus()

    async def action_export(self) -> None:
        conversation_id = self.query_one(HistorySidebar).highlighted_id() or self.conversation_id
        if conversation_id is None:
            self.notify("Nothing to export yet: send a message or open a conversation.", severity="warning")
            return
        await self.settled_history()
        conversation = self.history.conversation(conversation_id)
        if conversation is None:
            self.notify("This conversation is not in the history (yet): nothing to export.", severity="warning")
            return
        try:
            path = write_export(self.history.export_markdown(conversation_id), export_file_name(conversation))
        except ExportError as error:
            self.notify(f"Could not export: {error}", severity="error", timeout=15)
            return
        self.notify(f"Exported to {path}", title="Export")

    # ---- other screens ---------------------------------------------------------------------
    def action_pick_model(self) -> None:
        current = self.loader.choice.model_name if self.loader.choice else None

        def picked(model: str | None) -> None:
            if model is None:
                if self.model_state == "none":
                    self.show_empty_hint()
                return
            base = self.loader.choice or self.app.choice
            self.start_load(ModelChoice(model, base.backend, None, base.context, base.allow_offload,
                                        kv_bits=base.kv_bits))

        self.app.push_screen(PickerScreen(self.app.machine, current, self.loader.choice or self.app.choice), picked)

    def action_settings(self) -> None:
        def saved(settings: ChatSettings | None) -> None:
            if settings is None:
                return
            self.settings = settings
            self.app.recorder.set_setting("chat", asdict(settings))   # the defaults next time
            if self.conversation is not None:
                self.app.recorder.set_system_prompt(self.conversation, settings.system_prompt)
            self.notify(
                f"temperature {settings.temperature} · top-p {settings.top_p} · max tokens {settings.max_tokens}",
                title="Settings saved",
            )

        self.app.push_screen(SettingsScreen(self.settings), saved)

    def action_kv_cache(self) -> None:
        if not isinstance(self.app.source, LocalSource):   # runner launch's ranks take its --kv-bits
            self.notify("Over several hosts the KV cache is set when runner launch starts: --kv-bits 8 or 4.",
                        severity="warning")
            return
        choice = self.loader.choice or self.app.choice

        def picked(result: KvPicked | None) -> None:
            if result is not None and result.kv_bits != choice.kv_bits:
                self.start_load(replace(choice, kv_bits=result.kv_bits))

        self.app.push_screen(KvCacheScreen(choice, self.app.machine), picked)

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen(str(self.history.path)))

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one(HistorySidebar)
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

    # ---- hints and the status line ------------------------------------------------------------
    def show_empty_hint(self) -> None:
        choice = self.loader.choice
        name = short_model_name(choice.model_name) if choice else "a model"
        loading = f"Loading {name}… you can browse the history meanwhile."
        if choice is not None and choice.model is None and imported_folder() is None:
            loading += "\nFirst run: runner imports its built-in model once (under a minute); later starts take seconds."
        hint = {
            "ready": f"Ask {name} anything.  Enter sends · Esc stops a reply · F1 lists the keys",
            "loading": loading,
            "failed": "No model is loaded. Ctrl+O picks another; the history stays readable.",
            "none": "No model is loaded. Ctrl+O picks one.",
        }[self.model_state]
        self.query_one(Conversation).show_empty_hint(hint)

    def show_history_problem(self, problem: str | None) -> None:
        self.history_problem = problem
        self.update_status()

    def update_status(self) -> None:
        choice = self.loader.choice
        for line in self.query(StatusLine):     # none while the app closes (a thread's late message)
            line.show(
                choice.model_name if choice else None, self.model_state, self.session,
                self.reply is not None, self.replies.timing, self.history_problem,
                kv_bits=self.loader.plan.kv_bits if self.loader.plan is not None else None,
            )

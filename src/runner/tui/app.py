"""RunnerApp: the Textual application behind `runner chat`.

    RunnerApp(ModelChoice("path/or/id")).run()

It owns what outlives a screen: the history (read here, written by its recorder's thread), the
machine to plan for, the first model choice. The chat screen (`screens/chat.py`) does the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from textual.app import App
from textual.geometry import Size

from runner.hardware import Machine
from runner.tui.history import HistoryStore, HistoryUnavailable
from runner.tui.loading import LocalSource, ModelChoice, ModelSource, this_machine
from runner.tui.messages import HistoryProblem, HistorySaved
from runner.tui.recorder import HistoryRecorder
from runner.tui.screens.chat import ChatScreen
from runner.tui.screens.settings import ChatSettings, settings_from_dict
from runner.tui.screens.small import MIN_HEIGHT, MIN_WIDTH, TooSmallScreen


class RunnerApp(App[None]):
    CSS_PATH = "runner.tcss"
    TITLE = "runner"
    ENABLE_COMMAND_PALETTE = False

    def __init__(
        self,
        choice: ModelChoice | None = None,
        *,
        pick: bool = False,
        history_path: Path | None = None,
        machine: Machine | Callable[[], Machine] | None = None,
        settings: ChatSettings | None = None,
        source: ModelSource | None = None,
    ) -> None:
        """`machine`: the Machine to plan for (tests pass a fixed one); None detects this one.
        `source`: where sessions come from; None loads them here (`runner launch` passes its ranks)."""
        super().__init__()
        self.choice = choice or ModelChoice()
        self.source = source or LocalSource()
        self.pick_at_start = pick
        try:
            self.history = HistoryStore(history_path)
            self.history_problem = ""     # why the history file is not used this session
        except HistoryUnavailable as error:   # locked by another program, a folder not writable...
            self.history = HistoryStore.temporary()
            self.history_problem = str(error)
        self.recorder = HistoryRecorder(
            self.history,
            on_problem=lambda problem: self.post_message(HistoryProblem(problem)),
            on_saved=lambda: self.post_message(HistorySaved()),
        )
        # the settings saved last time (Ctrl+S), unless the caller gives some
        self.initial_settings = settings or settings_from_dict(self.history.setting("chat"))
        self._machine = machine
        self.chat: ChatScreen | None = None   # the main screen, once mounted
        self._detected: Machine | None = None

    def machine(self) -> Machine:
        """The machine plans are made for; detected once, on first use (from a worker thread)."""
        if isinstance(self._machine, Machine):
            return self._machine
        if self._detected is None:
            self._detected = self._machine() if callable(self._machine) else this_machine()
        return self._detected

    def on_mount(self) -> None:
        self.chat = ChatScreen()
        self.push_screen(self.chat)
        self.check_size(self.size)

    def on_resize(self, event) -> None:
        self.check_size(event.size)

    def check_size(self, size: Size) -> None:
        small = size.width < MIN_WIDTH or size.height < MIN_HEIGHT
        if small and not isinstance(self.screen, TooSmallScreen):
            self.push_screen(TooSmallScreen())
        elif not small and isinstance(self.screen, TooSmallScreen):
            self.pop_screen()

    async def action_quit(self) -> None:
        """Ctrl+Q: a reply being written is stopped first (kept, marked stopped), then the app exits."""
        chat = self.chat
        if chat is not None:
            await chat.action_stop()
        self.exit()

    def on_history_saved(self) -> None:
        chat = self.chat
        if chat is not None:
            chat.refresh_history_list()

    def on_history_problem(self, message: HistoryProblem) -> None:
        chat = self.chat
        if chat is not None:
            chat.show_history_problem(message.problem)
        if message.problem is None:
            self.notify("The history is saved again.", title="History")
        else:
            self.notify(f"{message.problem}. What is on screen stays; runner keeps trying.",
                        title="History not saved", severity="error", timeout=20)

    def on_unmount(self) -> None:
        chat = self.chat
        if chat is not None:
            chat.stop_reply()
            chat.loader.close()   # once the stopped reply has made its last token
        self.recorder.close()
        if self.history_problem:
            self.history.remove_temporary()
        else:
            self.history.close()

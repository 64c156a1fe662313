"""Shown instead of the app while the terminal is too small to draw it readably."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Static

MIN_WIDTH = 60
MIN_HEIGHT = 16


class TooSmallScreen(Screen[None]):
    BINDINGS = [("ctrl+q", "app.quit", "Quit")]

    def compose(self) -> ComposeResult:
        yield Static("", id="too-small")

    def on_mount(self) -> None:
        self.update_message()

    def on_resize(self) -> None:
        self.update_message()

    def update_message(self) -> None:
        width, height = self.app.size
        self.query_one("#too-small", Static).update(
            f"The terminal is {width}×{height}; runner needs at least {MIN_WIDTH}×{MIN_HEIGHT}.\n"
            "Make the window larger (the chat continues), or press Ctrl+Q to quit."
        )

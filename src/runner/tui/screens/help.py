"""The help screen: every key, and where runner keeps things."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static

KEYS = [
    ("Enter", "send the message"),
    ("Esc", "stop the reply being written (what came so far is kept, marked stopped)"),
    ("Ctrl+N", "new conversation"),
    ("Ctrl+O", "pick another model (each with its plan for this machine)"),
    ("Ctrl+S", "settings: system prompt, temperature, top-p, max tokens (remembered)"),
    ("Ctrl+G", "KV cache: none, 8-bit or 4-bit, with the plan of each (reloads the model)"),
    ("Ctrl+B", "show or hide the history sidebar"),
    ("Ctrl+L", "show or hide the plan and memory panel"),
    ("Ctrl+T", "export this conversation to Markdown (in the current folder)"),
    ("PgUp / PgDn", "scroll the conversation"),
    ("Tab", "move between the message box and the history list"),
    ("Enter / Del", "in the history list: open / delete a conversation"),
    ("F1", "this help"),
    ("Ctrl+Q", "quit"),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def __init__(self, history_path: str) -> None:
        super().__init__()
        self.history_path = history_path

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for key, what in KEYS:
            table.add_row(key, what)
        with Vertical(classes="dialog", id="help"):
            yield Label("Keys", classes="dialog-title")
            yield Static(table)
            yield Static(Text(f"\nHistory is saved as you chat, in {self.history_path}", "dim"))
            yield Static(Text("Esc closes this screen.", "dim"))

"""The settings screen: system prompt and sampling, checked before they are used."""

from __future__ import annotations

import math
from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from runner.backend import Sampling
from runner.errors import UserInputError


@dataclass(frozen=True)
class ChatSettings:
    system_prompt: str = ""
    temperature: float = 0.0     # greedy: small models answer best without sampling
    top_p: float = 1.0
    max_tokens: int = 512

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)


def settings_from_dict(saved: object) -> ChatSettings:
    """Settings saved earlier (a dict), or the defaults where something is missing or wrong."""
    if not isinstance(saved, dict):
        return ChatSettings()
    try:
        return parse_settings(
            str(saved.get("system_prompt", "")),
            str(saved.get("temperature", ChatSettings.temperature)),
            str(saved.get("top_p", ChatSettings.top_p)),
            str(saved.get("max_tokens", ChatSettings.max_tokens)),
        )
    except UserInputError:
        return ChatSettings()


def parse_settings(system_prompt: str, temperature: str, top_p: str, max_tokens: str) -> ChatSettings:
    """Settings from the form's text; UserInputError with a message naming the field otherwise."""
    try:
        t = float(temperature)
    except ValueError:
        raise UserInputError(f"temperature must be a number, not '{temperature}'") from None
    try:
        p = float(top_p)
    except ValueError:
        raise UserInputError(f"top-p must be a number, not '{top_p}'") from None
    # float() takes "nan" and "inf": every reply would then fail (or sample from nothing)
    if not math.isfinite(t):
        raise UserInputError(f"temperature must be a finite number, not '{temperature}'")
    if not math.isfinite(p):
        raise UserInputError(f"top-p must be a finite number, not '{top_p}'")
    try:
        n = int(max_tokens)
    except ValueError:
        raise UserInputError(f"max tokens must be a whole number, not '{max_tokens}'") from None
    settings = ChatSettings(system_prompt.strip(), t, p, n)
    settings.sampling()  # Sampling checks the ranges
    return settings


class SettingsScreen(ModalScreen[ChatSettings | None]):
    """Returns the new settings, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, settings: ChatSettings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(classes="dialog", id="settings"):
            yield Label("Settings", classes="dialog-title")
            yield Label("System prompt (applies to this conversation and new ones)")
            yield TextArea(s.system_prompt, id="system-prompt", soft_wrap=True, show_line_numbers=False)
            with Horizontal(classes="fields"):
                with Vertical():
                    yield Label("Temperature (0 = greedy)")
                    yield Input(str(s.temperature), id="temperature")
                with Vertical():
                    yield Label("Top-p (0–1]")
                    yield Input(str(s.top_p), id="top-p")
                with Vertical():
                    yield Label("Max tokens per reply")
                    yield Input(str(s.max_tokens), id="max-tokens")
            yield Static("", id="settings-error")
            with Horizontal(classes="buttons"):
                yield Button("Save (Ctrl+S)", variant="primary", id="save")
                yield Button("Cancel (Esc)", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()

    def on_input_submitted(self) -> None:
        self.action_save()

    def action_save(self) -> None:
        try:
            settings = parse_settings(
                self.query_one("#system-prompt", TextArea).text,
                self.query_one("#temperature", Input).value,
                self.query_one("#top-p", Input).value,
                self.query_one("#max-tokens", Input).value,
            )
        except UserInputError as error:
            self.query_one("#settings-error", Static).update(f"[b red]{error}[/]")
            return
        self.dismiss(settings)

    def action_cancel(self) -> None:
        self.dismiss(None)

"""The KV cache setting (Ctrl+G): the cache kept in the compute dtype, or quantized to 8 or 4 bits
(`--kv-bits` on the command line). Each row gives what the plan says that setting costs for the
model and context being used, and the longest context that fits with it; picking another one
reloads the model through the same path."""

from __future__ import annotations

from dataclasses import dataclass, replace

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList, Static
from textual.widgets.option_list import Option

from runner.budget import max_context_that_fits
from runner.errors import RunnerError
from runner.tui.loading import ModelChoice
from runner.tui.widgets.plan_panel import VERDICT_TEXT
from runner.tui.text import human_bytes
from runner.words import counted

SETTINGS: tuple[tuple[int | None, str], ...] = ((None, "none"), (8, "8-bit"), (4, "4-bit"))


@dataclass(frozen=True)
class KvPicked:
    """The setting picked: None is the KV cache in the compute dtype."""

    kv_bits: int | None


def option_id(kv_bits: int | None) -> str:
    return "kv-none" if kv_bits is None else f"kv-{kv_bits}"


def setting_line(name: str, cost: Text | None, current: bool) -> Text:
    line = Text(f"{name:<6}", "bold")
    if current:
        line.append(" (current)", "italic")
    line.append("  ")
    line.append_text(cost if cost is not None else Text("planning…", "dim"))
    return line


class KvCacheScreen(ModalScreen[KvPicked | None]):
    """Returns the setting picked, or None when cancelled."""

    DEFAULT_CSS = """
    #kv-cache { height: auto; }
    #kv-settings { height: auto; max-height: 8; }
    """
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, choice: ModelChoice, machine_source) -> None:
        super().__init__()
        self.choice = choice                   # what is loaded (or was asked for), with its kv_bits
        self.machine_source = machine_source   # a callable returning the Machine to plan for

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="kv-cache"):
            yield Label("KV cache", classes="dialog-title")
            yield Static(Text(
                "The cache of the conversation's keys and values, kept between replies. Quantized, it "
                "takes about half (8-bit) or a quarter (4-bit) of the memory, and changes the answers a "
                "little (8-bit) or more (4-bit): runner parity --b BACKEND:QUANT,kv8 measures how much.\n"
                "↑↓ move · Enter reload the model with it · Esc cancel", "dim"))
            yield OptionList(*[Option(setting_line(name, None, bits == self.choice.kv_bits), id=option_id(bits))
                               for bits, name in SETTINGS], id="kv-settings")

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.highlighted = options.get_option_index(option_id(self.choice.kv_bits))
        options.focus()
        self.plan_all()

    @work(thread=True, exclusive=True)
    def plan_all(self) -> None:
        machine = self.machine_source()
        for bits, name in SETTINGS:
            try:
                _, plan = self.app.source.plan(replace(self.choice, kv_bits=bits), machine)
            except RunnerError as error:
                self.app.call_from_thread(self._show, bits, name, Text(str(error), "red"), False)
                continue
            label, style = VERDICT_TEXT.get(plan.verdict, (plan.verdict, "bold"))
            cost = Text(f"{human_bytes(plan.kv_cache_bytes)} for {counted(plan.context, 'token', ',')} · {plan.quant} · ")
            cost.append(label, style)
            cost.append(f" (needs {human_bytes(plan.total_bytes)})", "dim")
            longest = max_context_that_fits(plan.model, plan.machine, plan.quant, plan.backend, kv_bits=bits)
            cost.append(f" · up to {counted(longest, 'token', ',')}" if longest else " · no context fits")
            self.app.call_from_thread(self._show, bits, name, cost, True)

    def _show(self, bits: int | None, name: str, cost: Text, possible: bool) -> None:
        if not self.is_attached:
            return
        options = self.query_one(OptionList)
        options.replace_option_prompt(option_id(bits), setting_line(name, cost, bits == self.choice.kv_bits))
        if not possible:
            options.disable_option(option_id(bits))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        bits = {option_id(bits): bits for bits, _ in SETTINGS}[event.option.id]
        self.dismiss(KvPicked(bits))

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

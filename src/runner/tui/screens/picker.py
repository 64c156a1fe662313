"""The model picker: models on this machine and in the catalog, each with its plan verdict here.

Enter on a model here loads it; on a catalog entry it opens the download's plan (screens/pull.py),
and once agreed the download runs under the conversation (widgets/download_bar.py) while the
chat stays usable; when it is verified the chat loads the model as if it had been picked here.
"""

from __future__ import annotations

import dataclasses

from rich.text import Text
from textual import work
from textual.worker import get_current_worker
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label, Static

from runner.budget import DOES_NOT_FIT, FITS, OFFLOAD
from runner.errors import RunnerError
from runner.hardware import Machine
from runner.tui.loading import ModelChoice, plan_for
from runner.tui.models import ModelEntry, config_file, find_models
from runner.tui.screens.confirm import ConfirmScreen
from runner.tui.screens.pull import PullOrder, PullScreen
from runner.tui.text import human_bytes
from runner.tui.widgets.download_bar import DownloadBar

VERDICT_STYLE = {FITS: ("✔ fits", "green"), OFFLOAD: ("▲ offload", "yellow"), DOES_NOT_FIT: ("✘ too big", "red")}


def verdict_cell(entry: ModelEntry, machine: Machine, base: ModelChoice = ModelChoice()) -> Text:
    """'✔ fits  nf4 5.61 GB' for this machine, or why there is no plan; planned with `base`'s
    backend, context and KV setting, as the chat would load the entry."""
    from runner.model import load_spec

    try:
        spec = load_spec(str(entry.path) if entry.path else entry.name)
        plan = plan_for(dataclasses.replace(base, model=entry.name, quant=None), spec, machine)
    except RunnerError as error:
        return Text(f"? {error}", "dim")
    label, style = VERDICT_STYLE.get(plan.verdict, (plan.verdict, ""))
    text = Text(label, style)
    text.append(f"  {plan.quant} {human_bytes(plan.total_bytes)}", "dim")
    return text


class PickerScreen(ModalScreen[str | None]):
    """Returns the chosen model (an id or a folder), or None when cancelled."""

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, machine_source, current: str | None = None, base: ModelChoice = ModelChoice()) -> None:
        super().__init__()
        self.machine_source = machine_source   # a callable returning the Machine to plan for
        self.current = current
        self.base = base                       # the backend, context and KV setting a pick loads with
        self.entries: list[ModelEntry] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="picker"):
            yield Label("Pick a model", classes="dialog-title")
            yield Static(
                Text("↑↓ move · Enter load · Esc cancel.  Enter on a catalog entry: its plan, then a download.", "dim")
            )
            table = DataTable(id="models", cursor_type="row", zebra_stripes=True)
            table.add_columns("Model", "From", "On disk", "Plan on this machine")
            yield table
            yield Static("", id="picker-problems")

    def on_mount(self) -> None:
        self.entries, problems = find_models()
        running = download_running(self.app)
        table = self.query_one("#models", DataTable)
        for index, entry in enumerate(self.entries):
            if entry.size_bytes:
                size = human_bytes(entry.size_bytes)
            elif running is not None and running.repo_id.lower() == entry.name.lower():
                size = "downloading"
            else:
                size = "package" if entry.where == "built-in" else "not here"
            name = Text(entry.name, "bold" if entry.downloaded or entry.where == "built-in" else "")
            if self.current and self.current in (entry.name, str(entry.path)):
                name.append(" (current)", "italic")
            table.add_row(name, entry.where, size, Text("planning…", "dim"), key=str(index))
        hint = f"Add folders to {config_file()} as model_dirs = [\"~/models\"]"
        self.query_one("#picker-problems", Static).update(Text("\n".join(problems + [hint]), "dim"))
        table.focus()
        self.plan_all()

    @work(thread=True, exclusive=True)
    def plan_all(self) -> None:
        machine = self.machine_source()
        worker = get_current_worker()
        for index, entry in enumerate(self.entries):
            if worker.is_cancelled:
                return
            cell = verdict_cell(entry, machine, self.base)
            self.app.call_from_thread(self._set_verdict, index, cell)

    def _set_verdict(self, index: int, cell: Text) -> None:
        if not self.is_attached:
            return
        table = self.query_one("#models", DataTable)
        table.update_cell(str(index), table.ordered_columns[3].key, cell, update_width=True)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        entry = self.entries[int(event.row_key.value)]
        if entry.where == "catalog":
            self.offer_download(entry.name)
        else:
            self.dismiss(str(entry.path) if entry.where in ("runner", "config") else entry.name)

    def offer_download(self, repo_id: str) -> None:
        """The download's plan first; then the download, under the conversation (one at a time)."""
        running = download_running(self.app)
        if running is not None and running.repo_id.lower() == repo_id.lower():
            def answered(stop: bool | None) -> None:
                if stop:
                    running.cancel()

            self.app.push_screen(ConfirmScreen(f"Stop downloading {repo_id}? What arrived is kept for later.",
                                               yes="Stop"), answered)
            return
        if running is not None:
            self.notify(f"{running.repo_id} is downloading; one download at a time (its Cancel stops it).",
                        severity="warning")
            return

        def agreed(order: PullOrder | None) -> None:
            if order is not None:
                start_download(self.app.chat, order)
                self.dismiss(None)

        self.app.push_screen(PullScreen(repo_id, self.machine_source, base_choice(self.app.chat)), agreed)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


def download_running(app) -> DownloadBar | None:
    """The picker's download under way, if any (one at a time)."""
    bars = app.chat.query(DownloadBar) if app.chat is not None else ()
    return next((bar for bar in bars if bar.state == "downloading"), None)


def base_choice(chat) -> ModelChoice:
    """The chat's current choice: a pulled model is planned and loaded with its backend and context."""
    return chat.loader.choice or chat.app.choice


def start_download(chat, order: PullOrder) -> None:
    """The download under `chat`'s conversation; once verified, the model loads as if picked."""

    def ready(repo_id: str) -> None:
        if chat.reply is not None:
            chat.notify(f"{repo_id} is ready: Ctrl+O loads it.", title="Download complete")
            return
        chat.start_load(dataclasses.replace(base_choice(chat), model=repo_id, quant=None))

    chat.mount(DownloadBar(order, ready), before="#status")

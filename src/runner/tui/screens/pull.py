"""Before a download from the picker: the Hub's listing, the plan for this machine, the disk.

    PullScreen("meta-llama/Llama-3.2-1B-Instruct", app.machine, base)  ->  PullOrder, or None

The listing and config.json come from the Hub in a thread worker (`runner.download.prepare`); the
plan and its refusal are `runner pull`'s (`download.plan_pull`), for the backend, context and KV
cache of `base` (the chat's current choice), which the model will be loaded with. A model the plan refuses is
offered only as "Download anyway" (`runner pull --force`); one the disk cannot hold, not at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

from runner.budget import FITS
from runner.download import Pull, PullPlan, human_size
from runner.errors import RunnerError
from runner.tui.loading import ModelChoice


@dataclass(frozen=True)
class PullOrder:
    """What the user agreed to download, with the plan they saw."""

    pull: Pull
    planned: PullPlan


class PullScreen(ModalScreen[PullOrder | None]):
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]
    AUTO_FOCUS = None     # Enter does nothing until the plan is shown; then Download has the focus if it fits

    def __init__(self, repo_id: str, machine_source, base: ModelChoice) -> None:
        super().__init__()
        self.repo_id = repo_id
        self.machine_source = machine_source   # a callable returning the Machine to plan for
        self.base = base
        self.order: PullOrder | None = None     # once the Hub answered and the disk can hold it

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="pull"):
            yield Label(f"Download {self.repo_id}?", classes="dialog-title")
            yield Static(Text("asking the Hub for its files and config.json…", "dim"), id="pull-body")
            with Horizontal(classes="buttons"):
                yield Button("Download", variant="primary", id="pull-start", disabled=True)
                yield Button("Cancel (Esc)", id="pull-cancel")

    def on_mount(self) -> None:
        self.ask_the_hub()

    @work(thread=True, exclusive=True)
    def ask_the_hub(self) -> None:
        from runner import download

        try:
            pull = download.prepare(self.repo_id)
            base = self.base
            planned = download.plan_pull(pull, self.machine_source(), base.backend, None, base.context, base.kv_bits)
            download.check_disk(pull)
        except RunnerError as error:    # no access, no network, not enough disk...
            self.app.call_from_thread(self._show, Text(f"✘ {error}", "red"), None)
            return
        self.app.call_from_thread(self._show, describe(pull, planned), PullOrder(pull, planned))

    def _show(self, body: Text, order: PullOrder | None) -> None:
        if not self.is_attached:
            return
        self.query_one("#pull-body", Static).update(body)
        self.order = order
        start = self.query_one("#pull-start", Button)
        if order is None:
            return
        start.disabled = False
        if order.planned.refusal is not None:
            start.label, start.variant = "Download anyway", "warning"
        else:
            start.focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.order if event.button.id == "pull-start" else None)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


def describe(pull: Pull, planned: PullPlan) -> Text:
    """The plan and the download in a few lines, as `runner pull` prints them."""
    from runner.choice import choice_line

    text = Text()
    plan = planned.choice.plan
    mark, style = ("✔", "green") if plan.verdict == FITS else ("✘", "red")
    text.append(f"{mark} {choice_line(planned.choice)}\n", style)
    text.append(f"  {planned.choice.reason}\n", "dim")
    for warning in planned.warnings:
        text.append(f"  ▲ {warning}\n", "yellow")
    if planned.refusal is not None:
        text.append(f"  ✘ {planned.refusal}\n  “Download anyway” fetches it all the same (runner pull --force).\n",
                    "red")
    text.append(f"\n{len(pull.files)} files, {human_size(pull.total_bytes)}; {human_size(pull.missing_bytes)} to "
                f"download into {pull.snapshot} ({human_size(pull.free_bytes)} free).\n")
    text.append("The chat stays usable while it downloads; the download can be cancelled and resumed.", "dim")
    return text

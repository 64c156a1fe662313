"""The plan panel: what the model needs, where it goes, whether it fits, and how the load is going.

One bar per device of the placement: weights, KV cache, runtime overhead, then what is left free
of the capacity the plan lets that device use. After the load, a second line per device gives the
bytes the backend measured, beside the plan's.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import ProgressBar, Static

from runner.backend import LoadProgress, MemoryReport
from runner.budget import DOES_NOT_FIT, FITS, OFFLOAD, DeviceShare, Plan
from runner.tui.text import human_bytes, short_model_name

BAR_WIDTH = 32
WEIGHTS_STYLE = "bold #5f87ff"
KV_STYLE = "bold #d75fd7"
OVERHEAD_STYLE = "bold #d7af00"
FREE_STYLE = "#4e4e4e"
MEASURED_STYLE = "bold #5fd75f"

VERDICT_TEXT = {
    FITS: ("✔ fits", "bold green"),
    OFFLOAD: ("▲ fits only with offload (slow)", "bold yellow"),
    DOES_NOT_FIT: ("✘ does not fit", "bold red"),
}


def device_bar(share: DeviceShare, width: int = BAR_WIDTH) -> Text:
    """█ weights, █ KV cache, █ overhead, ░ free; every non-empty part gets at least one cell."""
    capacity = max(share.capacity_bytes, share.total_bytes, 1)
    parts = [
        (share.weights_bytes, WEIGHTS_STYLE, "█"),
        (share.kv_cache_bytes, KV_STYLE, "█"),
        (share.overhead_bytes, OVERHEAD_STYLE, "█"),
    ]
    cells = [max(1, round(width * size / capacity)) if size > 0 else 0 for size, _, _ in parts]
    while sum(cells) > width:  # rounding up small parts can overflow: take from the largest
        cells[cells.index(max(cells))] -= 1
    bar = Text()
    for (_, style, glyph), count in zip(parts, cells):
        bar.append(glyph * count, style)
    bar.append("░" * (width - sum(cells)), FREE_STYLE)
    return bar


def measured_bar(measured: int, capacity: int, width: int = BAR_WIDTH) -> Text:
    capacity = max(capacity, measured, 1)
    count = max(1, round(width * measured / capacity)) if measured > 0 else 0
    bar = Text()
    bar.append("█" * count, MEASURED_STYLE)
    bar.append("░" * (width - count), FREE_STYLE)
    return bar


def _measured_for(share: DeviceShare, plan: Plan, report: MemoryReport) -> int | None:
    if share.device in report.measured:
        return report.measured[share.device]
    # one device and one measure under another name ("metal" planned, "mlx" measured)
    if len(plan.placement) == 1 and len(report.measured) == 1:
        return next(iter(report.measured.values()))
    return None


def render_plan(plan: Plan, report: MemoryReport | None = None) -> Text:
    """The plan as text: a title, then per device the planned bar (and the measured one after the
    load) and what the bytes are; the verdict, the speed ceiling, the warnings and notes."""
    text = Text()
    text.append(short_model_name(plan.model.name), "bold")
    text.append(f" · {plan.quant} · context {plan.context:,} · {plan.backend} backend\n\n")
    label_width = max([len(share.device) for share in plan.placement] + [4])
    indent = " " * (label_width + 1)
    for share in plan.placement:
        text.append(f"{share.device:<{label_width}} ", "bold")
        text.append_text(device_bar(share))
        text.append(f" planned {human_bytes(share.total_bytes)} of {human_bytes(share.capacity_bytes)}\n")
        if report is not None:
            measured = _measured_for(share, plan, report)
            if measured is not None:
                text.append(indent)
                text.append_text(measured_bar(measured, share.capacity_bytes))
                text.append(f" measured {human_bytes(measured)}\n", "green")
        text.append(indent)
        text.append("weights", WEIGHTS_STYLE)
        text.append(f" {human_bytes(share.weights_bytes)} · ")
        text.append("KV cache" if plan.kv_bits is None else f"KV cache ({plan.kv_bits}-bit)", KV_STYLE)
        text.append(f" {human_bytes(share.kv_cache_bytes)} · ")
        text.append("overhead", OVERHEAD_STYLE)
        text.append(f" {human_bytes(share.overhead_bytes)}\n")
    if not plan.placement:
        text.append("no device can hold any of it\n", "red")
    verdict, style = VERDICT_TEXT.get(plan.verdict, (plan.verdict, "bold"))
    text.append("\n")
    text.append(verdict, style)
    text.append(f" · needs {human_bytes(plan.total_bytes)}")
    if plan.roofline_tokens_per_s > 0:
        speed = plan.roofline_tokens_per_s
        speed_text = f"{speed:,.0f}" if speed >= 10 else f"{speed:.2g}"
        # the roofline reads every weight and the whole context's KV cache per token (runner plan's footnote)
        text.append(f" · at most ~{speed_text} tokens/s at a full context", "dim")
    for warning in plan.warnings:
        text.append("\n▲ ", "yellow")
        text.append(warning)
    for note in plan.notes:
        text.append("\n· " + note, "dim")
    return text


class PlanPanel(VerticalScroll):
    """The plan, the load progress and, if the load failed, why."""

    def compose(self) -> ComposeResult:
        self.border_title = "Plan"
        yield Static("", id="load-error")      # first, so that it is seen when the plan is long
        yield Static("working out the plan…", id="plan-body")
        yield Static("", id="load-stage")
        yield ProgressBar(id="load-progress", show_eta=False)

    def on_mount(self) -> None:
        self.query_one("#load-error").display = False
        self.query_one("#load-progress").display = False

    def show_plan(self, plan: Plan, report: MemoryReport | None = None) -> None:
        self.query_one("#plan-body", Static).update(render_plan(plan, report))

    def show_message(self, message: str) -> None:
        self.query_one("#plan-body", Static).update(message)

    def show_progress(self, progress: LoadProgress) -> None:
        bar = self.query_one("#load-progress", ProgressBar)
        bar.display = True
        stage = progress.stage
        if progress.total and progress.unit:
            done, total = progress.done, progress.total
            if progress.unit == "bytes":
                stage += f" ({human_bytes(done)} of {human_bytes(total)})"
            else:
                stage += f" ({done} of {total} {progress.unit})"
        self.query_one("#load-stage", Static).update(stage)
        if progress.total:
            bar.update(total=progress.total, progress=progress.done)
        else:
            bar.update(total=None)  # unknown length: an animated bar

    def show_loaded(self, summary: str) -> None:
        self.query_one("#load-progress", ProgressBar).display = False
        self.query_one("#load-stage", Static).update(Text("loaded: " + summary, "green"))

    def show_error(self, message: str) -> None:
        self.query_one("#load-progress", ProgressBar).display = False
        self.query_one("#load-stage", Static).update("")
        error = Text("The model did not load\n", "bold red")
        error.append(message, "red")
        self.query_one("#load-error", Static).update(error)
        self.query_one("#load-error").display = True
        self.scroll_home(animate=False)

    def reset(self, message: str) -> None:
        """Back to the start of a load."""
        self.query_one("#load-error").display = False
        self.query_one("#load-progress", ProgressBar).display = False
        self.query_one("#load-stage", Static).update("")
        self.show_message(message)

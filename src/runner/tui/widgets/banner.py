"""The banner at the top of the chat: what the user must know while this model is loaded
(part of it offloaded, memory pressure on a Mac, the backend's own warnings about the load)."""

from __future__ import annotations

from typing import Sequence

from textual.widgets import Static

from runner.backend import MemoryReport, Session
from runner.budget import OFFLOAD, Plan
from runner.tui.text import human_bytes

# unified memory: warn when the plan uses more than this share of what the GPU may wire
UNIFIED_PRESSURE = 0.75


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


def load_warnings(plan: Plan | None, report: MemoryReport | None = None, session: Session | None = None) -> list[str]:
    """Every line of the banner: the plan's pressure warning, then what the backend said about its load."""
    lines = [pressure_warning(plan, report)]
    lines += [f"▲ {warning}" for warning in (session.warnings if session is not None else ())]
    return [line for line in lines if line]


class Banner(Static):
    """Hidden while there is nothing to say."""

    def on_mount(self) -> None:
        self.display = False

    def show(self, lines: Sequence[str]) -> None:
        self.update("\n".join(lines))
        self.display = bool(lines)

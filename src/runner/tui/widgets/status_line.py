"""The status line under the message box. Left: the model, backend, quant and placement (or how
its load is going). Right: whether a reply is being written, the last reply's speed, a history
that is not being saved, and how to switch models."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Static

from runner.backend import GenerationChunk, Session
from runner.tui.text import short_model_name


def timing_text(chunk: GenerationChunk) -> str:
    """'17.9 tokens/s · first token 0.21 s', or '' before the first token."""
    if chunk.generation_tokens == 0:
        return ""
    text = f"first token {chunk.time_to_first_token:.2f} s"
    if chunk.generation_tps > 0:
        text = f"{chunk.generation_tps:.1f} tokens/s · " + text
    return text


class StatusLine(Horizontal):
    def compose(self) -> ComposeResult:
        yield Static("", id="status-model")
        yield Static("", id="status-speed")

    def show(
        self, model_name: str | None, model_state: str, session: Session | None,
        replying: bool, timing: str, history_problem: str | None, kv_bits: int | None = None,
    ) -> None:
        """`model_state`: "none", "loading", "ready" or "failed"; `timing`: see `timing_text`;
        `kv_bits`: the loaded model's KV cache bits (None: not quantized, not shown)."""
        model = Text(short_model_name(model_name) if model_name else "no model", "bold")
        if model_state == "ready" and session is not None:
            # the placement's first clause ("cuda:0 (all 32 layers)"); the plan panel has the rest
            placement = session.device_summary.split(";")[0]
            model.append(f" · {session.backend} · {session.quant}")
            if kv_bits is not None:
                model.append(f" · kv{kv_bits}", "bold magenta")   # as parity writes it: bf16,kv8
            model.append(f" · {placement}")
        elif model_state == "loading":
            model.append(" · loading…", "yellow")
        elif model_state == "failed":
            model.append(" · did not load", "red")
        model.no_wrap = True
        model.overflow = "ellipsis"
        speed = Text()
        if replying:
            speed.append("● writing · " if timing else "● thinking… ", "bold green")
        if timing:
            speed.append(timing + " ")
        if history_problem:
            speed.append("▲ history not saved ", "bold red")
        speed.append("│ Ctrl+O other model", "dim")
        self.query_one("#status-model", Static).update(model)
        self.query_one("#status-speed", Static).update(speed)

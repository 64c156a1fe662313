"""Snapshots of the main screens (SVG, in tests/__snapshots__/test_tui_snapshots/).

Deterministic: a fixed terminal size, a fixed hypothetical machine (one RTX 4090), catalog models
whose weights are not on this machine (so no backend is loaded and no timing is on screen), an
empty Hugging Face cache and a private RUNNER_HOME. Update after a deliberate change with
`pytest tests/test_tui_snapshots.py --snapshot-update`, then look at the SVGs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from runner.hardware import parse_machine
from runner.tui.app import RunnerApp
from runner.tui.history import COMPLETE, ERROR, PARTIAL, STOPPED, HistoryStore
from runner.tui.loading import ModelChoice
from runner.tui.screens.chat import ChatScreen

SIZE = (120, 40)
LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
LLAMA_70B = "meta-llama/Llama-3.1-70B-Instruct"


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """Nothing installed or cached: the picker lists only the built-in model and the catalog.
    Paths are relative to the test's folder, so the paths shown on screen are the same each run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNNER_HOME", "home")
    monkeypatch.setenv("HF_HUB_CACHE", "hf-cache")
    return Path(".")


def app_for(home, model: str, **choice) -> RunnerApp:
    return RunnerApp(
        ModelChoice(model, **choice), history_path=home / "history.db", machine=parse_machine("1xRTX4090")
    )


def steady_cursors(pilot) -> None:
    """A blinking cursor is on or off depending on when the picture is taken: keep it on."""
    for screen in pilot.app.screen_stack:
        for widget in screen.query("Input, TextArea"):
            widget.cursor_blink = False


async def until_load_ends(pilot) -> None:
    chat = next(s for s in pilot.app.screen_stack if isinstance(s, ChatScreen))
    deadline = time.monotonic() + 30
    while chat.model_state not in ("failed", "ready"):
        assert time.monotonic() < deadline, "the load did not end"
        await pilot.pause(0.02)
    steady_cursors(pilot)
    await pilot.pause(0.1)


def test_plan_and_load_error(snap_compare, fresh_home):
    """The plan for Llama 3.1 8B on one RTX 4090, and the error: its weights are not here."""
    assert snap_compare(app_for(fresh_home, LLAMA_8B), terminal_size=SIZE, run_before=until_load_ends)


def test_offload_banner(snap_compare, fresh_home):
    """70B in NF4 does not fit a 24 GB GPU: the plan offloads, and a banner says so."""
    app = app_for(fresh_home, LLAMA_70B, quant="nf4", allow_offload=True)
    assert snap_compare(app, terminal_size=SIZE, run_before=until_load_ends)


def test_resumed_conversation(snap_compare, fresh_home):
    """A conversation from the history: Markdown replies (a single newline is a line break), one
    stopped, one failed, one interrupted (runner was killed while writing it)."""
    store = HistoryStore(fresh_home / "history.db")
    store.create_conversation("An older chat", LLAMA_8B)
    c = store.create_conversation("Capital cities", LLAMA_8B)
    store.add_message(c.id, "user", "What is the capital of France?")
    store.add_message(c.id, "assistant", "The capital of France is **Paris**.\nIt lies on the Seine.\n\n- population: about 2.1 million\n- area: 105 km²", COMPLETE)
    store.add_message(c.id, "user", "Write it in Python")
    store.add_message(c.id, "assistant", "```python\ncapitals = {\"France\": \"Paris\",", STOPPED)
    store.add_message(c.id, "user", "And Spain?")
    store.add_message(c.id, "assistant", "", ERROR)
    store.update_message(store.messages(c.id)[-1].id, "", ERROR, "out of GPU memory after 4096 tokens")
    store.add_message(c.id, "user", "Tell me a story")
    store.add_message(c.id, "assistant", "Once upon a time", PARTIAL)   # runner was killed here
    store.close()

    async def open_it(pilot):
        await until_load_ends(pilot)
        await pilot.press("ctrl+l")          # hide the plan panel
        await pilot.press("tab")             # to the history list
        await pilot.press("enter")           # open the newest conversation
        await pilot.pause(0.3)

    assert snap_compare(app_for(fresh_home, LLAMA_8B), terminal_size=SIZE, run_before=open_it)


def test_help_screen(snap_compare, fresh_home):
    async def help(pilot):
        await until_load_ends(pilot)
        await pilot.press("f1")
        await pilot.pause(0.1)

    assert snap_compare(app_for(fresh_home, LLAMA_8B), terminal_size=SIZE, run_before=help)


def test_settings_screen_with_a_bad_value(snap_compare, fresh_home):
    async def settings(pilot):
        await until_load_ends(pilot)
        await pilot.press("ctrl+s")
        await pilot.pause(0.1)
        steady_cursors(pilot)
        pilot.app.screen.query_one("#temperature").value = "warm"
        await pilot.press("ctrl+s")          # refused: the error names the field
        await pilot.pause(0.1)

    assert snap_compare(app_for(fresh_home, LLAMA_8B), terminal_size=SIZE, run_before=settings)


def test_model_picker(snap_compare, fresh_home):
    """Every catalog model with its verdict for one RTX 4090."""

    async def picker(pilot):
        await until_load_ends(pilot)
        await pilot.press("ctrl+o")
        deadline = time.monotonic() + 30
        while "planning" in pilot.app.screen.query_one("#models").get_cell_at((len(pilot.app.screen.entries) - 1, 3)).plain:
            assert time.monotonic() < deadline
            await pilot.pause(0.05)
        await pilot.pause(0.1)

    assert snap_compare(app_for(fresh_home, LLAMA_8B), terminal_size=SIZE, run_before=picker)


def test_terminal_too_small(snap_compare, fresh_home):
    assert snap_compare(app_for(fresh_home, LLAMA_8B), terminal_size=(50, 12), run_before=until_load_ends)

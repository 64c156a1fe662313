"""Driving the chat app with its Pilot (shared by the TUI tests and the `runner launch` chat tests),
and another program holding the history file locked."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
import time

from runner.tui.app import RunnerApp
from runner.tui.screens.chat import ChatScreen

SIZE = (110, 36)


def run_async(test):
    """Run an async test in its own event loop (no pytest async plugin needed)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return run


async def wait_until(pilot, condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await pilot.pause(0.02)


def chat_screen(app: RunnerApp) -> ChatScreen:
    return next(s for s in app.screen_stack if isinstance(s, ChatScreen))


async def wait_loaded(pilot) -> ChatScreen:
    chat = chat_screen(pilot.app)
    await wait_until(pilot, lambda: chat.model_state in ("ready", "failed"), 120, "the model to load")
    assert chat.model_state == "ready", chat.query_one("#load-error").render()
    return chat


async def send(pilot, text: str) -> None:
    await pilot.click("#prompt")
    await pilot.press(*text)
    await pilot.press("enter")


HOLD_EXCLUSIVE_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[2] == "out-of-wal":
    db.execute("PRAGMA journal_mode=DELETE")  # a program that takes the file out of WAL mode: then
db.execute("BEGIN EXCLUSIVE")                 # nobody may even read it (in WAL mode: nobody may write)
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
"""


def hold_lock(path, out_of_wal: bool = True) -> subprocess.Popen:
    """Another program holding the history file locked; `.communicate("\\n")` lets it go."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_EXCLUSIVE_LOCK, str(path), "out-of-wal" if out_of_wal else "wal"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline() == "locked\n"
    return holder

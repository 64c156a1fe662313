"""The chat app driven by its Pilot over the real torch backend, on a tiny Llama on the CPU.

Each test runs the real RunnerApp: the plan is made for this machine, the model is loaded by the
`cuda` backend (which runs on the CPU here), replies are really generated and streamed, and the
history is a real SQLite file in the test's folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.tui import history as history_module
from runner.tui import recorder as recorder_module
from runner.tui.app import RunnerApp
from runner.tui.history import COMPLETE, ERROR, PARTIAL, STOPPED, HistoryStore
from runner.tui.loading import LocalSource, ModelChoice
from runner.tui.messages import ReplyChunk
from runner.tui.recorder import FLUSH_INTERVAL
from runner.tui.screens.settings import ChatSettings
from runner.tui.widgets.conversation import AssistantMessage, UserMessage
from tui_helpers import SIZE, chat_screen, hold_lock, run_async, send, wait_loaded, wait_until


def tiny_app(tiny_llama_dir: Path, history: Path, max_tokens: int = 24) -> RunnerApp:
    return RunnerApp(
        ModelChoice(str(tiny_llama_dir), quant="fp32"),
        history_path=history,
        settings=ChatSettings(max_tokens=max_tokens),
    )


@run_async
async def test_reply_streams_and_reaches_the_disk_a_few_times_a_second(tiny_llama_dir, tmp_path):
    history_path = tmp_path / "history.db"
    app = tiny_app(tiny_llama_dir, history_path, max_tokens=200)
    seen = []   # (time, text on screen, text in the file, its state) each time a new chunk arrives

    def on_message(message) -> None:
        """Called as each message reaches the app, before it is handled."""
        if isinstance(message, ReplyChunk):
            chat = chat_screen(app)
            if chat.reply is not None and chat.reply.row is message.reply and message.reply_id is not None:
                [stored] = [m for m in app.history.messages(chat.conversation_id) if m.id == message.reply_id]
                seen.append((time.monotonic(), chat.reply.widget.content, stored.content, stored.state))

    async with app.run_test(size=SIZE, message_hook=on_message) as pilot:
        chat = await wait_loaded(pilot)
        assert "fp32" in str(chat.query_one("#status-model").render())
        await send(pilot, "hello")
        await wait_until(pilot, lambda: chat.query(AssistantMessage)
                         and chat.query(AssistantMessage).last().state == COMPLETE, what="the reply")
        widget = chat.query(AssistantMessage).last()
        final = widget.content
        assert final
        # the text grew chunk by chunk; the file held a prefix of the screen, marked partial, and
        # was written at most ten times a second (not once per token)
        shown = [screen for _, screen, _, _ in seen]
        assert len(set(shown)) > 20
        assert all(len(a) <= len(b) and b.startswith(a) for a, b in zip(shown, shown[1:]))
        assert all(screen.startswith(stored) and state == PARTIAL for _, screen, stored, state in seen)
        writes = len({stored for _, _, stored, _ in seen})
        assert writes <= (seen[-1][0] - seen[0][0]) / FLUSH_INTERVAL + 2, writes
        assert app.recorder.wait_idle(5)
        user, assistant = app.history.messages(chat.conversation_id)
        assert (user.role, user.content, user.state) == ("user", "hello", COMPLETE)
        assert (assistant.content, assistant.state) == (final, COMPLETE)
        assert "tokens/s" in str(chat.query_one("#status-speed").render())
        assert [w.content for w in chat.query(UserMessage)] == ["hello"]


KILLED_MID_REPLY = """
import asyncio, json, os, signal, sys, time
sys.path.insert(0, {tests!r})
from runner.tui.app import RunnerApp
from runner.tui.messages import ReplyChunk
from runner.tui.recorder import FLUSH_INTERVAL
from runner.tui.screens.settings import ChatSettings
from tui_helpers import SIZE, chat_screen, send, wait_loaded, wait_until

app = RunnerApp(history_path={history!r}, settings=ChatSettings(max_tokens=400))
first_shown = []

def on_message(message):
    # each time a chunk arrives: the time and the reply's text on screen until then
    if isinstance(message, ReplyChunk) and chat_screen(app).reply is not None:
        first_shown[:] = first_shown or [time.monotonic()]
        print(json.dumps([time.monotonic(), chat_screen(app).reply.widget.content]), flush=True)

def streamed_a_while():
    # streamed FLUSH_INTERVAL + 0.5 s, so text older than the FLUSH_INTERVAL + 0.2 s the test holds the
    # file to exists, however fast the model
    reply = chat_screen(app).reply
    return (reply is not None and len(reply.widget.content) > 60 and bool(first_shown)
            and time.monotonic() - first_shown[0] > FLUSH_INTERVAL + 0.5)

async def main():
    async with app.run_test(size=SIZE, message_hook=on_message) as pilot:
        chat = await wait_loaded(pilot)
        await send(pilot, "Write a long story about a dragon.")
        await wait_until(pilot, streamed_a_while, 120)
        print(json.dumps([time.monotonic(), "KILL"]), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


@pytest.mark.slow
def test_kill_9_mid_reply_loses_at_most_the_last_fraction_of_a_second(default_model_dir, tmp_path):
    """A real `kill -9` of a process running the app while the default model writes a reply: the
    file holds what was on screen up to a fraction of a second before, and reopens as interrupted."""
    history_path = tmp_path / "history.db"
    script = KILLED_MID_REPLY.format(tests=str(Path(__file__).parent), history=str(history_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    killed_at = next(t for t, text in lines if text == "KILL")
    shown = [(t, text) for t, text in lines if text != "KILL"]
    on_screen_at_kill = shown[-1][1]
    settled = [text for t, text in shown if t <= killed_at - FLUSH_INTERVAL - 0.2]
    store = HistoryStore(history_path)
    [conversation] = store.conversations()
    user, reply = store.messages(conversation.id)
    assert user.content == "Write a long story about a dragon."
    assert reply.state == PARTIAL and on_screen_at_kill.startswith(reply.content)
    assert settled and reply.content.startswith(settled[-1]), (reply.content, settled[-1])
    assert "interrupted" in store.export_markdown(conversation.id)


@run_async
async def test_escape_stops_the_reply_and_keeps_it_marked(default_model_dir, tmp_path):
    """On the default model (a few tokens a second on a CPU: time to press Esc like a person)."""
    app = RunnerApp(history_path=tmp_path / "history.db", settings=ChatSettings(max_tokens=400))
    async with app.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        await send(pilot, "Write a long story about a dragon.")
        await wait_until(pilot, lambda: chat.reply is not None and len(chat.reply.widget.content) > 0,
                         what="the first words")
        widget = chat.reply.widget
        await pilot.press("escape")
        # stopped at once: no reply running, the text so far is kept and marked, on screen and on disk
        assert chat.reply is None
        kept = widget.content
        assert kept and widget.state == STOPPED
        assert "stopped by you" in str(widget.query_one(".reply-note").render())
        assert app.recorder.wait_idle(5)
        [_, stored] = app.history.messages(chat.conversation_id)
        assert (stored.content, stored.state) == (kept, STOPPED)
        await pilot.pause(0.5)
        assert widget.content == kept  # tokens the backend made after Esc are not added
        # the app is usable right away: the next message gets its own reply
        chat.settings = ChatSettings(max_tokens=8)
        await send(pilot, "Hi")
        await wait_until(pilot, lambda: chat.reply is None and len(chat.query(AssistantMessage)) == 2
                         and chat.query(AssistantMessage).last().state != PARTIAL, 120, "the second reply")
        assert app.recorder.wait_idle(5)
        assert [m.state for m in app.history.messages(chat.conversation_id)] == [COMPLETE, STOPPED, COMPLETE, COMPLETE]


@run_async
async def test_history_is_listed_and_resumed_after_a_restart(tiny_llama_dir, tmp_path):
    history_path = tmp_path / "history.db"
    first = tiny_app(tiny_llama_dir, history_path, max_tokens=8)
    async with first.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        await send(pilot, "first question")
        await wait_until(pilot, lambda: chat.reply is None and chat.query(AssistantMessage)
                         and chat.query(AssistantMessage).last().state == COMPLETE, what="the reply")
        reply_text = chat.query(AssistantMessage).last().content

    second = tiny_app(tiny_llama_dir, history_path, max_tokens=8)
    async with second.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        assert not chat.query(UserMessage)  # a new session starts with a new conversation
        history_list = chat.query_one("#history-list")
        assert history_list.option_count == 1
        assert "first question" in str(history_list.get_option_at_index(0).prompt)
        history_list.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(chat.query(UserMessage)) == 1, what="the conversation to open")
        assert chat.query_one(UserMessage).content == "first question"
        assert chat.query_one(AssistantMessage).content == reply_text
        # the resumed conversation goes on in the same record, with its earlier turns as context
        await send(pilot, "second question")
        await wait_until(pilot, lambda: chat.reply is None and len(chat.query(AssistantMessage)) == 2
                         and chat.query(AssistantMessage).last().state == COMPLETE, what="the second reply")
        assert second.recorder.wait_idle(5)
        [conversation] = second.history.conversations()
        assert [m.content for m in second.history.messages(conversation.id)][:3] == [
            "first question", reply_text, "second question"
        ]


@run_async
async def test_generation_error_is_shown_in_the_conversation_and_history_kept(tiny_llama_dir, tmp_path):
    """The tiny model holds 256 tokens: a longer prompt makes the backend fail the reply."""
    app = tiny_app(tiny_llama_dir, tmp_path / "history.db")
    async with app.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        long_prompt = "word " * 400
        chat.query_one("#prompt").value = long_prompt
        await pilot.press("enter")
        await wait_until(pilot, lambda: chat.reply is None and chat.query(AssistantMessage)
                         and chat.query(AssistantMessage).last().state == ERROR, what="the error")
        note = str(chat.query(AssistantMessage).last().query_one(".reply-note").render())
        assert "generation failed" in note
        assert app.recorder.wait_idle(5)
        user, assistant = app.history.messages(chat.conversation_id)
        assert user.content == long_prompt.strip() and assistant.state == ERROR and assistant.error
        # still usable
        await send(pilot, "short")
        await wait_until(pilot, lambda: chat.reply is None and len(chat.query(AssistantMessage)) == 2
                         and chat.query(AssistantMessage).last().state == COMPLETE, what="a normal reply")


@run_async
async def test_corrupt_history_is_reported_kept_aside_and_replaced(tiny_llama_dir, tmp_path):
    history_path = tmp_path / "history.db"
    history_path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    app = tiny_app(tiny_llama_dir, history_path, max_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        messages = [str(n.message) for n in app._notifications]
        assert any("kept aside" in m and "corrupt" in m for m in messages), messages
        aside = list(tmp_path.glob("history.db.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_bytes().startswith(b"SQLite format 3\x00\xff")
        await send(pilot, "hi")
        await wait_until(pilot, lambda: chat.reply is None and chat.query(AssistantMessage)
                         and chat.query(AssistantMessage).last().state == COMPLETE, what="a reply")
    assert len(HistoryStore(history_path).conversations()) == 1


@run_async
async def test_load_failure_shows_error_and_plan_then_another_model_loads(tiny_llama_dir, tmp_path, monkeypatch):
    # a model folder whose config is fine but whose weights are damaged
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_llama_dir / name).exists():
            (broken / name).write_bytes((tiny_llama_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 1000)
    # the picker finds the tiny model through the config file (in a RUNNER_HOME of this test)
    home = tmp_path / "home"
    (home / "config").mkdir(parents=True)
    (home / "config" / "config.toml").write_text(f'model_dirs = ["{tiny_llama_dir}"]\n')
    monkeypatch.setenv("RUNNER_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))

    app = RunnerApp(ModelChoice(str(broken), quant="fp32"), history_path=tmp_path / "h.db",
                    settings=ChatSettings(max_tokens=4))
    async with app.run_test(size=SIZE) as pilot:
        chat = chat_screen(app)
        await wait_until(pilot, lambda: chat.model_state == "failed", 120, "the load to fail")
        plan_text = str(chat.query_one("#plan-body").render())
        assert "fits" in plan_text and "weights" in plan_text  # the plan stays on screen
        error = str(chat.query_one("#load-error").render())
        assert "did not load" in error and "broken-model" in error
        # sending now says why not, and nothing is written
        await send(pilot, "hello?")
        assert app.history.conversations() == []
        # pick another model: the tiny one, listed from the config file
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "PickerScreen", what="the picker")
        picker = app.screen
        row = next(i for i, e in enumerate(picker.entries) if e.path == tiny_llama_dir)
        await wait_until(pilot, lambda: "planning" not in str(picker.query_one("#models").get_cell_at((row, 3))),
                         what="the verdicts")
        assert "fits" in str(picker.query_one("#models").get_cell_at((row, 3)))
        picker.query_one("#models").move_cursor(row=row)
        await pilot.press("enter")
        await wait_until(pilot, lambda: chat.model_state == "ready", 120, "the tiny model to load")
        assert not chat.query_one("#load-error").display
        await send(pilot, "hello")
        await wait_until(pilot, lambda: chat.reply is None and chat.query(AssistantMessage)
                         and chat.query(AssistantMessage).last().state == COMPLETE, what="a reply")


@run_async
async def test_no_model_named_opens_the_default_model_which_answers(default_model_dir, tmp_path):
    """`runner` alone: no choice to make, the built-in SmolLM2-135M-Instruct answers a real question."""
    app = RunnerApp(history_path=tmp_path / "history.db", settings=ChatSettings(max_tokens=24))  # greedy
    async with app.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        assert "SmolLM2-135M-Instruct" in str(chat.query_one("#status-model").render())
        assert "Ctrl+O other model" in str(chat.query_one("#status-speed").render())
        await send(pilot, "What is the capital of France?")
        await wait_until(pilot, lambda: chat.reply is None and chat.query(AssistantMessage)
                         and chat.query(AssistantMessage).last().state == COMPLETE, 120, "the answer")
        assert "Paris" in chat.query(AssistantMessage).last().content


@run_async
async def test_ctrl_q_during_a_reply_stops_the_generation_and_keeps_it_as_stopped(default_model_dir, tmp_path):
    app = RunnerApp(history_path=tmp_path / "history.db", settings=ChatSettings(max_tokens=2000))
    async with app.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        await send(pilot, "Write a long story about a dragon.")
        await wait_until(pilot, lambda: chat.reply is not None and len(chat.reply.widget.content) > 0,
                         what="the first words")
        await pilot.press("ctrl+q")
    # the backend stopped at once: its stream has ended (the lock around it is free) long before
    # the 2000 tokens it was asked for
    quit_at = time.monotonic()
    assert chat.generation_lock.acquire(timeout=10)
    assert time.monotonic() - quit_at < 10
    store = HistoryStore(tmp_path / "history.db")
    [conversation] = store.conversations()
    user, reply = store.messages(conversation.id)
    assert reply.state == STOPPED and reply.content


@run_async
async def test_a_history_locked_mid_session_costs_nothing_on_screen_and_is_written_later(
        tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(history_module, "BUSY_TIMEOUT", 0.2)
    monkeypatch.setattr(recorder_module, "RETRY_FOR", 0.5)
    history_path = tmp_path / "history.db"
    app = tiny_app(tiny_llama_dir, history_path, max_tokens=16)
    async with app.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        holder = hold_lock(history_path, out_of_wal=False)    # another program writes for a while
        try:
            await send(pilot, "typed while the file is locked")
            await wait_until(pilot, lambda: chat.reply is None and chat.query(AssistantMessage)
                             and chat.query(AssistantMessage).last().state == COMPLETE, what="the reply")
            await wait_until(pilot, lambda: chat.history_problem is not None, what="the history problem")
            assert "history not saved" in str(chat.query_one("#status-speed").render())
            assert any(n.title == "History not saved" for n in app._notifications)
            assert [w.content for w in chat.query(UserMessage)] == ["typed while the file is locked"]
            reply = chat.query(AssistantMessage).last().content
            assert app.history.conversations() == []
        finally:
            holder.communicate("\n", timeout=10)
        await wait_until(pilot, lambda: chat.history_problem is None, what="the history to be saved again")
        assert "history not saved" not in str(chat.query_one("#status-speed").render())
        assert app.recorder.wait_idle(5)
        [conversation] = app.history.conversations()
        assert [(m.content, m.state) for m in app.history.messages(conversation.id)] == [
            ("typed while the file is locked", COMPLETE), (reply, COMPLETE)
        ]


class WarningSource(LocalSource):
    """Loads here, as `runner chat` does, then says what a backend says about a load it warns about."""

    def load(self, choice, spec, plan, on_progress):
        session = super().load(choice, spec, plan, on_progress)
        session.warnings = ("this load is near the GPU's wired limit: replies may slow down",)
        return session


@run_async
async def test_the_sessions_warnings_are_shown_in_the_banner(tiny_llama_dir, tmp_path):
    app = RunnerApp(ModelChoice(str(tiny_llama_dir), quant="fp32"), history_path=tmp_path / "history.db",
                    source=WarningSource())
    async with app.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        banner = chat.query_one("#banner")
        assert banner.display
        assert str(banner.render()) == "▲ this load is near the GPU's wired limit: replies may slow down"

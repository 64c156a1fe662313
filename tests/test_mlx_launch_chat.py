"""`runner launch` with the chat app: the real RunnerApp, driven by its Pilot, over two real ranks
that mlx.launch starts on 127.0.0.1, rank 0 serving the app over its local socket.

Every test checks that no rank process is left once the app is closed.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time

import psutil
import pytest

from conftest import LONG_CONTEXT
from mlx_helpers import load, rank_processes, runner
from tui_helpers import SIZE, run_async, send, wait_loaded, wait_until

pytest.importorskip("mlx_lm")

from runner.backend import Message, Sampling  # noqa: E402
from runner.tui.app import RunnerApp  # noqa: E402
from runner.tui.history import COMPLETE, ERROR, STOPPED  # noqa: E402
from runner.tui.loading import ModelChoice  # noqa: E402
from runner.tui.messages import ReplyChunk  # noqa: E402
from runner.tui.screens.settings import ChatSettings  # noqa: E402
from runner.tui.widgets.conversation import AssistantMessage  # noqa: E402

LOOPBACK = "127.0.0.1,127.0.0.1"


def launch_source(split: str, context: int = 256):
    from runner_mlx.launcher import request_hosts
    from runner_mlx.remote import LaunchSource

    return LaunchSource(request_hosts(LOOPBACK, None, None, 5, rank0_here=True), split, context, rank_timeout=30)


CONTEXT = 256      # tokens: the tiny test model holds no more
CHAT_CONTEXT = 2048    # the default model's reply cannot fill it before Esc


def launch_app(model_dir, quant: str, split: str, history, max_tokens: int, context: int = 256):
    source = launch_source(split, context)
    app = RunnerApp(ModelChoice(str(model_dir), "mlx", quant, context), history_path=history,
                    settings=ChatSettings(max_tokens=max_tokens), source=source)
    return app, source


def single_process_tokens(model_dir, quant: str, turns: list[Message], max_tokens: int,
                          context: int | None = None) -> list[int]:
    """The greedy reply of one process; with `context`, to the turns that fit it, as the app
    leaves the oldest out (runner.tui.prompt.fit_to_context)."""
    from runner.tui.prompt import fit_to_context

    session = load(model_dir, quant, context=context or 256)
    try:
        if context is not None:
            turns, _ = fit_to_context(turns, session.tokenize, context, max_tokens)
        chunks = list(session.stream(turns, Sampling(max_tokens=max_tokens)))
    finally:
        session.close()
    return [c.token for c in chunks if c.token is not None]


def ranks_left() -> list[psutil.Process]:
    """Rank processes under this test process still running after a few seconds' grace."""
    ranks = list(rank_processes(os.getpid()).values())
    _, alive = psutil.wait_procs(ranks, timeout=5)
    return alive


def reply_tokens():
    """A message hook that keeps each reply's streamed token ids, by reply id (the hook sees a
    message at each node it passes, so each chunk is kept by its position in the reply)."""
    seen: dict[int, dict[int, int]] = {}

    def hook(message) -> None:
        if isinstance(message, ReplyChunk) and message.chunk.token is not None:
            seen.setdefault(message.reply_id, {})[message.chunk.generation_tokens] = message.chunk.token

    def tokens(reply_id: int) -> list[int]:
        return [token for _, token in sorted(seen.get(reply_id, {}).items())]

    return tokens, hook


@pytest.mark.slow
@pytest.mark.parametrize("quant, split", [("q4", "pipeline"), ("fp32", "tensor")])
@run_async
async def test_a_reply_streams_from_two_ranks_with_the_single_process_greedy_tokens(tiny_llama_dir, tmp_path,
                                                                                    quant, split):
    expected = single_process_tokens(tiny_llama_dir, quant, [Message("user", "hello")], 16)
    app, source = launch_app(tiny_llama_dir, quant, split, tmp_path / "history.db", 16)
    tokens, hook = reply_tokens()
    try:
        async with app.run_test(size=SIZE, message_hook=hook) as pilot:
            chat = await wait_loaded(pilot)
            assert set(rank_processes(os.getpid())) == {0, 1}
            status = str(chat.query_one("#status-model").render())
            assert f"mlx · {quant} · {split} split over 2 hosts on CPU" in status, status
            await send(pilot, "hello")
            await wait_until(pilot, lambda: chat.reply is None and chat.query(AssistantMessage)
                             and chat.query(AssistantMessage).last().state == COMPLETE, 120, "the reply")
            assert app.recorder.wait_idle(5)     # the history is written by the recorder's thread
            [reply] = [m for m in app.history.messages(chat.conversation_id) if m.role == "assistant"]
            assert tokens(reply.id) == expected
            assert (reply.content, reply.state) == (chat.query(AssistantMessage).last().content, COMPLETE)
            assert "tokens/s" in str(chat.query_one("#status-speed").render())
            await pilot.press("ctrl+q")
    finally:
        source.close()
    assert not ranks_left()


@pytest.mark.slow
@run_async
async def test_escape_stops_the_reply_on_every_rank_and_the_next_message_works(default_model_dir, tmp_path):
    # the default model, whose context (2,048 here) a reply cannot fill before Esc: the tiny model's
    # 256 positions can be written to the end before the key arrives on a busy machine
    app, source = launch_app(default_model_dir, "q8", "pipeline", tmp_path / "history.db", 100000, CHAT_CONTEXT)
    tokens, hook = reply_tokens()
    try:
        async with app.run_test(size=SIZE, message_hook=hook) as pilot:
            chat = await wait_loaded(pilot)
            ranks = rank_processes(os.getpid())
            await send(pilot, "Write a long story about a dragon.")
            await wait_until(pilot, lambda: chat.reply is not None and len(chat.reply.widget.content) > 20,
                             60, "the first words")
            widget = chat.reply.widget
            await pilot.press("escape")
            assert chat.reply is None and widget.state == STOPPED
            kept = widget.content
            # the ranks stop at the same step: the stream ends (its lock is free) and both stay up
            await wait_until(pilot, lambda: not chat.generation_lock.locked(), 30, "the ranks to stop")
            assert all(rank.is_running() for rank in ranks.values())
            assert app.recorder.wait_idle(5)     # the history is written by the recorder's thread
            [_, stopped] = app.history.messages(chat.conversation_id)
            assert (stopped.content, stopped.state) == (kept, STOPPED)

            chat.settings = ChatSettings(max_tokens=8)
            await send(pilot, "Hi")
            await wait_until(pilot, lambda: chat.reply is None and len(chat.query(AssistantMessage)) == 2
                             and chat.query(AssistantMessage).last().state == COMPLETE, 60, "the second reply")
            assert app.recorder.wait_idle(5)     # the history is written by the recorder's thread
            history = app.history.messages(chat.conversation_id)
            assert [m.state for m in history] == [COMPLETE, STOPPED, COMPLETE, COMPLETE]
            turns = [Message(m.role, m.content) for m in history[:3]]
            await pilot.press("ctrl+q")
    finally:
        source.close()
    assert not ranks_left()
    # the second reply saw the stopped one in its prompt, as one process would
    assert tokens(history[3].id) == single_process_tokens(default_model_dir, "q8", turns, 8, context=CHAT_CONTEXT)


@pytest.mark.slow
@run_async
async def test_a_rank_that_dies_while_chatting_ends_the_reply_with_a_clear_error(long_llama_dir, tmp_path):
    app, source = launch_app(long_llama_dir, "q4", "pipeline", tmp_path / "history.db", 100000, LONG_CONTEXT)
    try:
        async with app.run_test(size=SIZE) as pilot:
            chat = await wait_loaded(pilot)
            await send(pilot, "Write a long story about a dragon.")
            await wait_until(pilot, lambda: chat.reply is not None and len(chat.reply.widget.content) > 20,
                             60, "the first words")
            widget = chat.reply.widget
            rank_processes(os.getpid())[1].kill()
            started = time.monotonic()
            await wait_until(pilot, lambda: chat.reply is None, 30, "the reply to fail")
            assert time.monotonic() - started < 20
            assert widget.state == ERROR
            assert app.recorder.wait_idle(5)     # the history is written by the recorder's thread
            [_, failed] = app.history.messages(chat.conversation_id)
            assert failed.state == ERROR and failed.content and failed.content == widget.content
            assert failed.error.startswith("the model's ranks stopped: rank 1 (127.0.0.1) died (killed by "
                                           "signal 9, SIGKILL); every rank was stopped"), failed.error
            assert "Traceback" not in failed.error
            assert not ranks_left()                 # gone while the app is still open
            await send(pilot, "Hi")                 # the next message fails at once, with the same words
            await wait_until(pilot, lambda: chat.reply is None and len(chat.query(AssistantMessage)) == 2,
                             10, "the second reply to fail")
            assert app.recorder.wait_idle(5)     # the history is written by the recorder's thread
            assert app.history.messages(chat.conversation_id)[-1].error == failed.error
            await pilot.press("ctrl+q")
    finally:
        source.close()


# ---- without the app -------------------------------------------------------------------------


@pytest.mark.slow
def test_without_a_terminal_the_message_is_read_from_stdin(tiny_llama_dir):
    done = runner("launch", str(tiny_llama_dir), "--hosts", LOOPBACK, "--split", "pipeline", "--quant", "q4",
                  "--max-tokens", "8", stdin="hello\n", timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "runner: 8 tokens" in done.stderr or "(stop)" in done.stderr, done.stderr


def run_in_terminal(*args: str, timeout: float = 60) -> tuple[int, str]:
    """`runner ARGS` with a pseudo-terminal as stdin, stdout and stderr: (exit code, what it wrote)."""
    main, secondary = pty.openpty()
    code = "import sys\nfrom runner.cli import main\nsys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, *args], stdin=secondary, stdout=secondary,
                               stderr=secondary, close_fds=True)
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(main, 4096)
        except OSError:          # the terminal closed: the process is gone
            break
        if not data:
            break
        output += data
    os.close(main)
    return process.wait(timeout=10), output.decode(errors="replace")


def test_the_chat_needs_the_first_host_to_be_this_machine(tiny_llama_dir):
    code, output = run_in_terminal("launch", str(tiny_llama_dir), "--hosts", "192.0.2.1,127.0.0.1")
    assert code == 2, output
    assert output.strip() == (
        "runner: error: the chat needs the first host to be this machine (rank 0 serves the app over "
        "127.0.0.1), and 192.0.2.1 is not: put this machine first, or give -p for a one-shot reply")


def test_sampling_flags_become_the_chats_starting_settings():
    """`runner launch --temperature 0.7 --system ...` in the chat: the flags given override the saved
    settings, the others stay as saved; a bad value is refused like in a one-shot run."""
    from runner_mlx.launch_command import ONE_SHOT, starting_settings

    saved = ChatSettings(system_prompt="be brief", temperature=0.0, top_p=0.9, max_tokens=100)
    merged = starting_settings(saved, {"temperature": 0.7}, "answer in French")
    assert merged == ChatSettings(system_prompt="answer in French", temperature=0.7, top_p=0.9, max_tokens=100)
    assert starting_settings(saved, {}, None) == saved
    assert set(ONE_SHOT) <= {f for f in ChatSettings.__dataclass_fields__}
    done = runner("launch", "--hosts", "127.0.0.1,127.0.0.1", "--temperature", "-1", timeout=60)
    assert done.returncode == 2 and "temperature" in done.stderr and "Traceback" not in done.stderr

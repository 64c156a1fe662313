"""The history recorder: writes in order off the caller's thread, a streaming reply a few times a
second, and a history it cannot write (locked by another program) never loses what was handed over."""

from __future__ import annotations

import sqlite3
import time

from runner.tui import recorder as recorder_module
from runner.tui.history import COMPLETE, PARTIAL, STOPPED, HistoryStore
from runner.tui.recorder import FLUSH_INTERVAL, HistoryRecorder
from tui_helpers import hold_lock


def count_commits(path) -> "callable":
    """How many times the file changed since this was called (SQLite's data_version, read by
    another connection, goes up at each commit of another connection)."""
    watcher = sqlite3.connect(path)
    start = watcher.execute("PRAGMA data_version").fetchone()[0]
    return lambda: watcher.execute("PRAGMA data_version").fetchone()[0] - start


def test_writes_in_order_and_a_streaming_reply_a_few_times_a_second(tmp_path):
    store = HistoryStore(tmp_path / "history.db")
    recorder = HistoryRecorder(store)
    conversation = recorder.new_conversation("story", "m", "")
    recorder.add_message(conversation, "user", "tell me a story", COMPLETE)
    reply = recorder.add_message(conversation, "assistant", "", PARTIAL)
    assert recorder.wait_idle(5) and reply.id is not None
    commits = count_commits(tmp_path / "history.db")
    text, started = "", time.monotonic()
    for i in range(20_000):        # a very fast model: far more tokens a second than commits
        text += f"{i} "
        recorder.stream_reply(reply, text)
    elapsed = time.monotonic() - started
    assert recorder.wait_idle(5)
    assert commits() <= elapsed / FLUSH_INTERVAL + 2
    assert store.messages(conversation.id)[1].content == text   # the latest text is on disk
    recorder.stream_reply(reply, text + "more")
    recorder.finish_reply(reply, text + "the end", STOPPED)
    recorder.stream_reply(reply, "a late token")               # after the end: ignored
    assert recorder.close()
    user, stored = HistoryStore(tmp_path / "history.db").messages(conversation.id)
    assert (user.content, stored.content, stored.state) == ("tell me a story", text + "the end", STOPPED)


def test_a_history_locked_by_another_program_is_reported_then_written_when_free(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder_module, "RETRY_FOR", 0.5)
    path = tmp_path / "history.db"
    store = HistoryStore(path, busy_timeout=0.1)
    problems = []
    recorder = HistoryRecorder(store, on_problem=problems.append)
    conversation = recorder.new_conversation("first", "m", "")
    assert recorder.wait_idle(5)
    holder = hold_lock(path, out_of_wal=False)
    try:
        recorder.add_message(conversation, "user", "typed while locked", COMPLETE)
        reply = recorder.add_message(conversation, "assistant", "", PARTIAL)
        recorder.stream_reply(reply, "Once upon")
        assert not recorder.wait_idle(2.0)             # cannot be written now
        assert len(problems) == 1 and "locked" in problems[0]
        assert store.messages(conversation.id) == []   # the reader still reads (WAL)
    finally:
        holder.communicate("\n", timeout=10)
    assert recorder.wait_idle(5)                       # written once the lock is gone, in order
    assert problems[-1] is None
    assert [(m.content, m.state) for m in store.messages(conversation.id)] == [
        ("typed while locked", COMPLETE), ("Once upon", PARTIAL)
    ]
    recorder.close()

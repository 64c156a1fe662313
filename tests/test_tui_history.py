"""The chat history store: written per message, survives a kill, recovers from a damaged file."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from runner.tui.history import (
    COMPLETE, PARTIAL, STOPPED, HistoryStore, HistoryUnavailable, export_file_name, title_from,
)
from tui_helpers import hold_lock


def test_messages_round_trip_and_order(tmp_path):
    store = HistoryStore(tmp_path / "history.db")
    first = store.create_conversation("first", "model-a", "be brief")
    second = store.create_conversation("second", "model-b")
    store.add_message(first.id, "user", "hello")
    reply = store.add_message(first.id, "assistant", "", PARTIAL)
    store.update_message(reply, "Hi", PARTIAL)
    store.update_message(reply, "Hi there", STOPPED)
    store.close()

    reopened = HistoryStore(tmp_path / "history.db")
    assert reopened.recovered_from is None
    # the conversation with the latest message comes first
    assert [c.title for c in reopened.conversations()] == ["first", "second"]
    messages = reopened.messages(first.id)
    assert [(m.role, m.content, m.state) for m in messages] == [
        ("user", "hello", COMPLETE),
        ("assistant", "Hi there", STOPPED),
    ]
    assert reopened.conversation(first.id).system_prompt == "be brief"
    reopened.delete_conversation(first.id)
    assert reopened.messages(first.id) == []
    assert [c.id for c in reopened.conversations()] == [second.id]


def test_partial_reply_survives_a_kill(tmp_path):
    """A process killed mid-reply (no close, no clean exit) leaves the text it had written."""
    path = tmp_path / "history.db"
    script = textwrap.dedent(
        f"""
        import os, signal
        from runner.tui.history import HistoryStore, PARTIAL
        store = HistoryStore({str(path)!r})
        c = store.create_conversation("killed", "m")
        store.add_message(c.id, "user", "tell me a story")
        reply = store.add_message(c.id, "assistant", "", PARTIAL)
        store.update_message(reply, "Once upon", PARTIAL)
        store.update_message(reply, "Once upon a time", PARTIAL)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == -9
    store = HistoryStore(path)
    [conversation] = store.conversations()
    messages = store.messages(conversation.id)
    assert [(m.role, m.content, m.state) for m in messages] == [
        ("user", "tell me a story", COMPLETE),
        ("assistant", "Once upon a time", PARTIAL),
    ]
    assert "interrupted" in store.export_markdown(conversation.id)


def test_corrupt_file_is_kept_aside_and_a_fresh_one_made(tmp_path):
    path = tmp_path / "history.db"
    path.write_bytes(b"this is not a database, just some bytes" * 100)
    store = HistoryStore(path)
    assert store.recovered_from is not None
    assert store.recovered_from.read_bytes().startswith(b"this is not a database")
    assert store.recovered_from.name.startswith("history.db.corrupt-")
    assert store.conversations() == []
    c = store.create_conversation("new", "m")
    assert store.conversation(c.id).title == "new"


def test_database_of_another_shape_is_treated_as_corrupt(tmp_path):
    path = tmp_path / "history.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, text TEXT)")
    db.commit()
    db.close()
    store = HistoryStore(path)
    assert store.recovered_from is not None
    assert store.conversations() == []


def test_export_markdown(tmp_path):
    store = HistoryStore(tmp_path / "history.db")
    c = store.create_conversation(title_from("What is   the capital\nof France?"), "SmolLM2", "Answer briefly.")
    store.add_message(c.id, "user", "What is the capital of France?")
    store.add_message(c.id, "assistant", "**Paris**.")
    store.add_message(c.id, "user", "And of Spain?")
    store.add_message(c.id, "assistant", "Mad", STOPPED)
    text = store.export_markdown(c.id)
    assert text.startswith("# What is the capital of France?\n")
    assert "## System\n\nAnswer briefly." in text
    assert "## You\n\nWhat is the capital of France?\n\n## Assistant\n\n**Paris**." in text
    assert "Mad\n\n*(stopped by you)*" in text
    assert export_file_name(store.conversation(c.id)) == f"chat-{c.id}-what-is-the-capital-of-france.md"


def test_title_is_one_short_line():
    assert title_from("a\n\nb   c") == "a b c"
    assert len(title_from("x" * 200)) == 48


def test_settings_are_stored_as_json(tmp_path):
    store = HistoryStore(tmp_path / "history.db")
    assert store.setting("chat", {}) == {}
    store.set_setting("chat", {"temperature": 0.3})
    store.set_setting("chat", {"temperature": 0.5, "max_tokens": 9})
    store.close()
    assert HistoryStore(tmp_path / "history.db").setting("chat") == {"temperature": 0.5, "max_tokens": 9}


def test_a_healthy_file_locked_by_another_program_is_not_called_damaged(tmp_path):
    path = tmp_path / "history.db"
    store = HistoryStore(path)
    store.create_conversation("keep me", "m")
    store.close()
    holder = hold_lock(path)
    try:
        with pytest.raises(HistoryUnavailable, match="locked by another program"):
            HistoryStore(path, busy_timeout=0.2)
    finally:
        holder.communicate("\n", timeout=10)
    assert list(tmp_path.glob("*corrupt*")) == []
    assert [c.title for c in HistoryStore(path).conversations()] == ["keep me"]


def test_a_data_folder_that_is_a_file_is_unavailable_not_a_traceback(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(HistoryUnavailable, match="cannot use"):
        HistoryStore(tmp_path / "data" / "history.db")

"""HistoryRecorder: every write to the chat history, made by one thread of its own.

The UI never waits for SQLite. It hands the recorder what to write and goes on:

    conversation = recorder.new_conversation("Capital cities", model, system_prompt)
    recorder.add_message(conversation, "user", "What is the capital of France?")
    reply = recorder.add_message(conversation, "assistant", "", PARTIAL)
    recorder.stream_reply(reply, "The capital")        # as the reply streams, as often as it likes
    recorder.finish_reply(reply, "The capital is Paris.", COMPLETE)

Writes run in order, one transaction each. A streaming reply is written at most every
`FLUSH_INTERVAL` seconds (its latest text), so a `kill -9` loses at most that last fraction of a
second of what was on screen, and a fast GPU costs ten small commits a second, not hundreds of
growing ones. The rows are `Row`s: their `id` is set once the recorder's thread has written them,
so the UI can refer to a row before it exists on disk.

A write that fails (the file locked by another program, made read-only, a full disk) is retried
until it succeeds; after `RETRY_FOR` seconds of failing, `on_problem` is told (the app says
"history not saved"), and told again with None once writes succeed. Nothing on screen depends on it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from runner.tui.history import PARTIAL, HistoryStore, HistoryUnavailable

FLUSH_INTERVAL = 0.1     # seconds between two writes of a streaming reply
RETRY_FOR = 5.0          # seconds a write keeps failing before the user is told
RETRY_PAUSE = 0.5        # seconds between two tries of a failing write
CLOSE_TIMEOUT = 3.0      # seconds `close` waits for the writes still queued


@dataclass(eq=False)
class Row:
    """A conversation or a message in the history; `id` is None until the recorder wrote it."""

    id: int | None = None
    finished: bool = False   # a reply whose last text was handed over: later text is ignored


Job = Callable[[HistoryStore], None]


class HistoryRecorder:
    def __init__(
        self,
        store: HistoryStore,
        on_problem: Callable[[str | None], None] = lambda problem: None,
        on_saved: Callable[[], None] = lambda: None,
    ) -> None:
        """`store` is opened again (`sibling()`) in the recorder's thread. `on_problem` and
        `on_saved` (a conversation or message was added or deleted) are called from that thread."""
        self._store = store
        self._on_problem = on_problem
        self._on_saved = on_saved
        self._lock = threading.Condition()
        self._jobs: deque[tuple[Job, bool]] = deque()   # (job, whether the list of conversations changes)
        self._streaming: dict[Row, str] = {}          # reply -> its latest text, not yet written
        self._last_flush = 0.0
        self._busy = False                             # a job or a flush is being written now
        self._closing = False
        self._failing_since: float | None = None      # when the writes started failing
        self._retry_at = 0.0
        self._told = False                             # on_problem was told of the current failure
        self._thread = threading.Thread(target=self._run, name="history-recorder", daemon=True)
        self._thread.start()

    # ---- what the UI calls (returns at once) ------------------------------------------------
    def new_conversation(self, title: str, model: str, system_prompt: str) -> Row:
        row = Row()

        def job(store: HistoryStore) -> None:
            row.id = store.create_conversation(title, model, system_prompt).id

        self._queue(job, listed=True)
        return row

    def add_message(self, conversation: Row, role: str, content: str, state: str) -> Row:
        row = Row()

        def job(store: HistoryStore) -> None:
            row.id = store.add_message(conversation.id, role, content, state)

        self._queue(job, listed=True)
        return row

    def stream_reply(self, reply: Row, text: str) -> None:
        """The reply's text so far; written within `FLUSH_INTERVAL` (only the latest text)."""
        with self._lock:
            if not reply.finished:
                self._streaming[reply] = text
                self._lock.notify()

    def finish_reply(self, reply: Row, text: str, state: str, error: str = "") -> None:
        """The reply's last text and how it ended; later `stream_reply` calls for it are ignored."""
        with self._lock:
            reply.finished = True
            self._streaming.pop(reply, None)
        self._queue(lambda store: store.update_message(reply.id, text, state, error))

    def set_system_prompt(self, conversation: Row, system_prompt: str) -> None:
        self._queue(lambda store: store.set_system_prompt(conversation.id, system_prompt))

    def delete_conversation(self, conversation_id: int) -> None:
        self._queue(lambda store: store.delete_conversation(conversation_id), listed=True)

    def set_setting(self, name: str, value) -> None:
        self._queue(lambda store: store.set_setting(name, value))

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything handed over so far is written (or `timeout`); True if it is."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._jobs or self._streaming or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Write what is queued (waiting at most `timeout`), then stop; True if all was written."""
        written = self.wait_idle(timeout)
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout=1.0)
        return written

    # ---- the recorder's thread ----------------------------------------------------------------
    def _queue(self, job: Job, listed: bool = False) -> None:
        with self._lock:
            self._jobs.append((job, listed))
            self._lock.notify()

    def _run(self) -> None:
        store = None
        while True:
            with self._lock:
                work = self._next_work()
                while work is None and not self._closing:
                    self._lock.wait(self._wait_time())
                    work = self._next_work()
                if self._closing:     # `close` waited for what could be written; the rest is lost
                    break
                self._busy = True
            try:
                if store is None:
                    store = self._store.sibling()
                work(store)
            except (sqlite3.OperationalError, HistoryUnavailable) as error:   # locked, read-only, full: again
                self._failed(str(error), drop=None)
            except Exception as error:                     # anything else: this write is lost
                self._failed(f"{type(error).__name__}: {error}", drop=work)
            else:
                self._succeeded()
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()
        if store is not None:
            store.close()

    def _next_work(self) -> Job | None:
        """The next write to make now (called under the lock), or None to wait."""
        now = time.monotonic()
        if self._failing_since is not None and now < self._retry_at:
            return None
        if self._jobs:
            return self._run_first_job
        if self._streaming and now - self._last_flush >= FLUSH_INTERVAL:
            self._last_flush = now
            return self._flush_streaming
        return None

    def _run_first_job(self, store: HistoryStore) -> None:
        with self._lock:
            job, listed = self._jobs[0]
        job(store)
        with self._lock:
            self._jobs.popleft()
        if listed:
            self._on_saved()

    def _flush_streaming(self, store: HistoryStore) -> None:
        """Write the latest text of each streaming reply (usually one) in one transaction."""
        with self._lock:
            pending = dict(self._streaming)
        store.update_messages([(reply.id, text, PARTIAL) for reply, text in pending.items()])
        with self._lock:
            for reply, text in pending.items():
                if self._streaming.get(reply) == text:   # not changed or finished meanwhile
                    del self._streaming[reply]

    def _wait_time(self) -> float | None:
        if self._failing_since is not None:
            return max(0.0, self._retry_at - time.monotonic())
        if self._streaming:
            return max(0.0, self._last_flush + FLUSH_INTERVAL - time.monotonic())
        return None

    def _failed(self, problem: str, drop: Job | None) -> None:
        """A write failed; `drop`: the write that can never succeed (dropped), None: try again."""
        now = time.monotonic()
        with self._lock:
            if drop == self._run_first_job:
                self._jobs.popleft()
            elif drop == self._flush_streaming:
                self._streaming.clear()
            if self._failing_since is None:
                self._failing_since = now
            self._retry_at = now + RETRY_PAUSE
            tell = not self._told and (drop is not None or now - self._failing_since >= RETRY_FOR)
            self._told = self._told or tell
        if tell:
            self._on_problem(problem)

    def _succeeded(self) -> None:
        with self._lock:
            was_told = self._told
            self._failing_since, self._told = None, False
        if was_told:
            self._on_problem(None)

"""Chat history: one SQLite file in `data_dir()`, written message by message.

The rule (see DESIGN.md, "Chat history"): the user's turn is saved before generation starts, and
the assistant's reply is saved while it streams, in small transactions, marked `partial` until it
ends. So a crash or a kill loses nothing that was already on the screen, and a conversation is
always openable. A reply found still `partial` when the file is opened again was interrupted.

A file SQLite says is corrupt (its own corruption error, or `PRAGMA quick_check` failing) is moved
aside (`history.db.corrupt-<time>`) and a fresh one is created; `HistoryStore.recovered_from` then
names the old file so the app can say so. A file another program holds locked is not corrupt: the
store waits `BUSY_TIMEOUT` for it, then raises `HistoryUnavailable` and leaves the file alone.

Writes come from one thread, the app's `HistoryRecorder`; the UI thread reads through its own
connection (SQLite's WAL mode lets a reader go on while a writer works).
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from runner.errors import RunnerError
from runner.paths import data_dir
from runner.words import one_line

FILE_NAME = "history.db"
BUSY_TIMEOUT = 5.0           # seconds a statement waits for a lock another connection holds

# what SQLite itself calls a damaged file (sqlite3.h: SQLITE_CORRUPT, SQLITE_NOTADB)
CORRUPTION_CODES = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}

# states of a message
COMPLETE = "complete"        # the reply ended normally (or a user/system turn)
PARTIAL = "partial"          # still streaming; found on reopen: the app was killed mid-reply
STOPPED = "stopped"          # the user stopped the reply; the text is what came before
ERROR = "error"              # generation failed part-way; `error` says why

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id            INTEGER PRIMARY KEY,
    title         TEXT NOT NULL,
    model         TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id              INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role            TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content         TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('complete', 'partial', 'stopped', 'error')),
    error           TEXT NOT NULL DEFAULT '',
    created_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id);
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL          -- JSON
);
"""


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    model: str
    system_prompt: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class StoredMessage:
    id: int
    conversation_id: int
    role: str
    content: str
    state: str
    error: str
    created_at: float


class HistoryUnavailable(RunnerError):
    """The history file cannot be used now (locked by another program, a folder that cannot be
    written...); the message says why, in words. The file, if any, is left as it was."""


class Damaged(Exception):
    """SQLite says the file is corrupt, or it is a database of another shape."""


class HistoryStore:
    """Reads and writes of the history file through one connection: use it from one thread.
    `sibling()` opens another connection to the same file for another thread."""

    def __init__(self, path: Path | str | None = None, *, busy_timeout: float | None = None) -> None:
        self.path = Path(path) if path is not None else data_dir() / FILE_NAME
        self.busy_timeout = BUSY_TIMEOUT if busy_timeout is None else busy_timeout
        self.recovered_from: Path | None = None   # the corrupt file moved aside, if any
        self.recovery_reason = ""                  # what SQLite said about it
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = self._open()
            except Damaged as error:
                self.recovered_from = self._move_aside(str(error))
                self._db = self._open()
        except (sqlite3.Error, OSError, Damaged) as error:
            raise HistoryUnavailable(unavailable_reason(self.path, error)) from None

    def sibling(self) -> "HistoryStore":
        """Another connection to the same file (no recovery: this one already checked it)."""
        return HistoryStore(self.path, busy_timeout=self.busy_timeout)

    # ---- opening ---------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        # autocommit (transactions are explicit); `timeout` is SQLite's busy timeout
        db = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout)
        try:
            db.row_factory = sqlite3.Row
            # WAL + synchronous=NORMAL: each commit survives a crash or kill of this process
            # without an fsync per commit (a power cut may lose the last few commits).
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise Damaged(f"integrity check failed: {check}")
            db.executescript(SCHEMA)
            # make sure the tables we need are there with the columns we read
            db.execute("SELECT id, title, model, system_prompt, created_at, updated_at FROM conversations LIMIT 1")
            db.execute("SELECT id, conversation_id, role, content, state, error, created_at FROM messages LIMIT 1")
        except sqlite3.OperationalError as error:
            db.close()
            if "no such column" in str(error) or "no such table" in str(error):
                raise Damaged(f"a database of another shape ({error})") from None
            raise                  # busy, locked, read-only, full: not the file's fault
        except sqlite3.DatabaseError as error:
            db.close()
            if getattr(error, "sqlite_errorname", "") in CORRUPTION_CODES:
                raise Damaged(str(error)) from None
            raise
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self, reason: str) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        self.path.rename(aside)
        for suffix in ("-wal", "-shm"):  # the journal files belong to the corrupt file
            journal = self.path.with_name(self.path.name + suffix)
            if journal.exists():
                journal.rename(aside.with_name(aside.name + suffix))
        self.recovery_reason = reason
        return aside

    def close(self) -> None:
        self._db.close()

    @classmethod
    def temporary(cls) -> "HistoryStore":
        """A history in a new temporary folder, for a session whose history file cannot be used."""
        try:
            folder = Path(tempfile.mkdtemp(prefix="runner-history-"))
        except OSError as error:
            raise HistoryUnavailable(f"no temporary folder for the history either: {error}") from None
        return cls(folder / FILE_NAME)

    def remove_temporary(self) -> None:
        """Close and delete a history made by `temporary`."""
        self.close()
        shutil.rmtree(self.path.parent, ignore_errors=True)

    # ---- conversations ---------------------------------------------------------------------
    def create_conversation(self, title: str, model: str, system_prompt: str = "") -> Conversation:
        now = time.time()
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO conversations (title, model, system_prompt, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (title, model, system_prompt, now, now),
            )
        return Conversation(cursor.lastrowid, title, model, system_prompt, now, now)

    def conversations(self) -> list[Conversation]:
        """All conversations, the most recently active first."""
        rows = self._db.execute("SELECT * FROM conversations ORDER BY updated_at DESC, id DESC").fetchall()
        return [Conversation(**dict(row)) for row in rows]

    def conversation(self, conversation_id: int) -> Conversation | None:
        row = self._db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return Conversation(**dict(row)) if row else None

    def set_system_prompt(self, conversation_id: int, system_prompt: str) -> None:
        with self._transaction():
            self._db.execute("UPDATE conversations SET system_prompt = ? WHERE id = ?", (system_prompt, conversation_id))

    def delete_conversation(self, conversation_id: int) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # ---- messages --------------------------------------------------------------------------
    def add_message(self, conversation_id: int, role: str, content: str, state: str = COMPLETE) -> int:
        now = time.time()
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO messages (conversation_id, role, content, state, created_at) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, content, state, now),
            )
            self._db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
        return cursor.lastrowid

    def update_message(self, message_id: int, content: str, state: str, error: str = "") -> None:
        """Write the reply so far (called as it streams) or its final text and state."""
        with self._transaction():
            self._db.execute(
                "UPDATE messages SET content = ?, state = ?, error = ? WHERE id = ?", (content, state, error, message_id)
            )

    def update_messages(self, updates: list[tuple[int, str, str]]) -> None:
        """Write several replies' text and state (message id, content, state) in one transaction."""
        with self._transaction():
            self._db.executemany("UPDATE messages SET content = ?, state = ? WHERE id = ?",
                                 [(content, state, message_id) for message_id, content, state in updates])

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        rows = self._db.execute(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
        ).fetchall()
        return [StoredMessage(**dict(row)) for row in rows]

    # ---- settings (the chat settings the user saved, as JSON) --------------------------------
    def setting(self, name: str, default=None):
        row = self._db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        if row is None:
            return default
        try:
            return json.loads(row["value"])
        except json.JSONDecodeError:
            return default

    def set_setting(self, name: str, value) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (name, json.dumps(value)),
            )

    # ---- export ----------------------------------------------------------------------------
    def export_markdown(self, conversation_id: int) -> str:
        conversation = self.conversation(conversation_id)
        if conversation is None:
            raise KeyError(conversation_id)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation.created_at))
        lines = [f"# {conversation.title}", "", f"*{conversation.model}, {when}*", ""]
        if conversation.system_prompt:
            lines += ["## System", "", conversation.system_prompt, ""]
        for message in self.messages(conversation_id):
            heading = {"user": "You", "assistant": "Assistant", "system": "System"}[message.role]
            lines += [f"## {heading}", "", message.content]
            note = state_note(message)
            if note:
                lines += ["", f"*({note})*"]
            lines.append("")
        return "\n".join(lines)

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db)


class _Transaction:
    """BEGIN … COMMIT, or ROLLBACK on an exception (the connection runs in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")


def unavailable_reason(path: Path, error: BaseException) -> str:
    """Why the history at `path` cannot be used, in words."""
    if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
        return f"{path} is locked by another program ({error})"
    if isinstance(error, OSError):
        return f"cannot use {error.filename or path}: {error.strerror or error}"
    return f"cannot use {path}: {error}"


def state_note(message: StoredMessage) -> str:
    """The mark shown under a reply that did not end normally ('' for a complete one)."""
    if message.state == STOPPED:
        return "stopped by you"
    if message.state == PARTIAL:
        return "interrupted: runner was closed while this reply was being written"
    if message.state == ERROR:
        return f"generation failed: {message.error}" if message.error else "generation failed"
    return ""


def title_from(text: str, limit: int = 48) -> str:
    """A conversation title from its first message: one line, at most `limit` characters."""
    return one_line(text, limit)


def export_file_name(conversation: Conversation) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", conversation.title.lower()).strip("-")[:40] or "chat"
    return f"chat-{conversation.id}-{slug}.md"

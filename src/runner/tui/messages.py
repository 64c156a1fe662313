"""The small messages the workers post to the chat screen (from their threads; posting is
thread-safe in Textual). Every change to the screen happens in the handlers, on the UI thread."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from runner.backend import GenerationChunk, LoadProgress, MemoryReport, Session
from runner.budget import Plan
from runner.tui.recorder import Row


@dataclass
class PlanReady(Message):
    load_id: int           # which load this is about; messages of an abandoned load are ignored
    plan: Plan


@dataclass
class LoadProgressed(Message):
    load_id: int           # which load this is about; messages of an abandoned load are ignored
    progress: LoadProgress


@dataclass
class ModelLoaded(Message):
    load_id: int           # which load this is about; messages of an abandoned load are ignored
    session: Session
    report: MemoryReport | None


@dataclass
class LoadFailed(Message):
    load_id: int           # which load this is about; messages of an abandoned load are ignored
    error: str


@dataclass
class ReplyMessage(Message):
    reply: Row             # the assistant message in the history (its id is set once written)

    @property
    def reply_id(self) -> int | None:
        return self.reply.id


@dataclass
class ReplyChunk(ReplyMessage):
    chunk: GenerationChunk


@dataclass
class ReplyEnded(ReplyMessage):
    finish_reason: str     # "stop", "length" or "cancelled"


@dataclass
class ReplyFailed(ReplyMessage):
    error: str


@dataclass
class HistoryProblem(Message):
    problem: str | None    # why the history is not being saved; None: it is saved again


@dataclass
class HistorySaved(Message):
    """A conversation or a message was added to the history, or one was deleted."""


@dataclass
class TurnsLeftOut(Message):
    count: int             # the oldest turns left out of the prompt to fit the context
    context: int


@dataclass
class ConversationOpened(Message):
    conversation_id: int   # chosen in the history sidebar


@dataclass
class ConversationDeleted(Message):
    conversation_id: int   # the user confirmed; the screen deletes it
    title: str

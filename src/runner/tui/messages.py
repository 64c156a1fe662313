"""The small messages the workers post to the chat screen (from their threads; posting is
thread-safe in Textual). Every change to the screen happens in the handlers, on the UI thread."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from runner.backend import GenerationChunk, LoadProgress, MemoryReport, Session
from runner.budget import Plan


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
class ReplyChunk(Message):
    reply_id: int          # the history id of the assistant message
    chunk: GenerationChunk


@dataclass
class ReplyEnded(Message):
    reply_id: int
    finish_reason: str     # "stop", "length" or "cancelled"


@dataclass
class ReplyFailed(Message):
    reply_id: int
    error: str


@dataclass
class TurnsLeftOut(Message):
    count: int             # the oldest turns left out of the prompt to fit the context
    context: int

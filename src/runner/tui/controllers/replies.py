"""ReplyWriter: runs a reply in a thread worker, shows it as it streams, hands it to the history.

    Session.stream(...) -> one ReplyChunk per step -> ReplyEnded or ReplyFailed

The worker only generates and posts messages to the chat screen; on the UI thread, `add_chunk`
puts the text on screen and gives it to the history recorder (which writes it a few times a
second), and `finish` / `stop` mark how the reply ended, on screen and in the history.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from textual.screen import Screen

from runner.backend import GenerationChunk, Message, Sampling
from runner.errors import RunnerError
from runner.tui import messages as msg
from runner.tui.controllers.model_loader import ModelLoader
from runner.tui.history import STOPPED
from runner.tui.prompt import fit_to_context
from runner.tui.recorder import HistoryRecorder, Row
from runner.tui.widgets.conversation import AssistantMessage
from runner.tui.widgets.status_line import timing_text


@dataclass
class ActiveReply:
    """The reply being generated now."""

    row: Row                 # its message in the history
    widget: AssistantMessage
    cancel: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    last_chunk: GenerationChunk | None = None


class ReplyWriter:
    def __init__(self, host: Screen, loader: ModelLoader, recorder: HistoryRecorder) -> None:
        self.host = host                 # where the worker's messages go
        self.loader = loader             # the session, its plan, and the lock around its streams
        self.recorder = recorder
        self.active: ActiveReply | None = None
        self.timing = ""                 # "17.9 tokens/s · first token 0.21 s" of the last reply

    def start(self, turns: list[Message], sampling: Sampling, row: Row, widget: AssistantMessage) -> None:
        reply = self.active = ActiveReply(row, widget)
        self.timing = ""
        self.host.run_worker(lambda: self._generate(turns, sampling, reply), thread=True, group="reply")

    def _generate(self, turns: list[Message], sampling: Sampling, reply: ActiveReply) -> None:
        with self.loader.generation_lock:
            session, plan = self.loader.session, self.loader.plan
            if session is None or plan is None or reply.cancel.is_set():
                self.host.post_message(msg.ReplyEnded(reply.row, "cancelled"))
                return
            finish = "stop"
            try:
                turns, dropped = fit_to_context(turns, session.tokenize, plan.context, sampling.max_tokens)
                if dropped:
                    self.host.post_message(msg.TurnsLeftOut(dropped, plan.context))
                for chunk in session.stream(turns, sampling, reply.cancel):
                    self.host.post_message(msg.ReplyChunk(reply.row, chunk))
                    if chunk.finish_reason:
                        finish = chunk.finish_reason
            except Exception as error:  # RunnerError or not: shown in the conversation
                detail = str(error) if isinstance(error, RunnerError) else f"{type(error).__name__}: {error}"
                self.host.post_message(msg.ReplyFailed(reply.row, detail))
                return
            self.host.post_message(msg.ReplyEnded(reply.row, finish))

    def current(self, message: msg.ReplyMessage) -> ActiveReply | None:
        """The active reply this message is about; None for a reply stopped already."""
        reply = self.active
        return reply if reply is not None and reply.row is message.reply else None

    async def add_chunk(self, message: msg.ReplyChunk) -> bool:
        """On screen, then to the history; False if the reply was stopped (the rest is dropped)."""
        reply = self.current(message)
        if reply is None:
            return False
        reply.last_chunk = message.chunk
        if message.chunk.text:
            reply.text += message.chunk.text
            await reply.widget.append(message.chunk.text)
            self.recorder.stream_reply(reply.row, reply.text)   # on disk within a tenth of a second
        self.timing = timing_text(message.chunk)
        return True

    async def finish(self, reply: ActiveReply, state: str, error: str = "") -> None:
        self.active = None
        self.recorder.finish_reply(reply.row, reply.text, state, error)
        await reply.widget.finish(state, error)

    def stop(self) -> ActiveReply | None:
        """Stop the reply now: the backend stops before its next token; the text so far stays,
        marked stopped in the history (the caller marks the widget)."""
        reply = self.active
        if reply is None:
            return None
        reply.cancel.set()
        self.active = None
        self.recorder.finish_reply(reply.row, reply.text, STOPPED)
        return reply

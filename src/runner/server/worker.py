"""The model's one thread: it opens the session, then answers requests one at a time in the order
they came (one model, batch 1).

The event loop hands a `Job` over with `ModelHost.submit` (503 while the model loads, 429 when the
queue is full) and reads what the thread posts to the job's asyncio queue: `Started` once the
prompt is read, `Text` pieces, then `Finished` or `Failed`. Setting `job.cancel` (the client went
away) stops its generation at the next token and frees the thread for the next job. The session
is used by this thread only: load, tokenize, generate, close.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from contextlib import closing
from dataclasses import dataclass
from typing import Callable

from runner.backend import LoadProgress, Sampling, Session
from runner.errors import RunnerError, UserInputError
from runner.server.api import ApiError, GenerationRequest, Usage
from runner.server.stops import StopScanner
from runner.words import counted


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    reused_tokens: int      # prompt tokens whose KV cache the session kept from the previous request


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str      # "stop", "length" or "cancelled"
    usage: Usage


@dataclass(frozen=True)
class Failed:
    error: ApiError


class Job:
    """One request on its way through the queue and the model."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.cancel = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()
        self.number = 0
        self.queued_at = time.perf_counter()
        self.behind = False     # queued while another request was being answered
        self._loop = loop

    def post(self, event: Started | Text | Finished | Failed) -> None:
        """From the model's thread to the request's coroutine."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:   # the event loop is closed: the server is stopping
            pass


class ModelHost:
    """The loaded model, its queue of waiting jobs and the thread that answers them."""

    def __init__(self, open_session: Callable[[Callable[[LoadProgress], None]], Session], *, context: int,
                 queue_size: int, log: Callable[[str], None],
                 on_progress: Callable[[LoadProgress], None] | None = None,
                 on_ready: Callable[[Session], None] | None = None,
                 on_failed: Callable[[Exception], None] | None = None) -> None:
        self.context = context
        self.queue_size = queue_size
        self.state = "loading"        # "loading", "ready", "failed", "closed"
        self.stage = "starting"       # the load's current stage, for /health
        self.session: Session | None = None
        self.failure: Exception | None = None
        self._open = open_session
        self._log = log
        self._on_progress = on_progress
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._waiting: queue.Queue[Job | None] = queue.Queue()   # bounded by `submit`
        self._current: Job | None = None
        self._submitted = 0
        self._stopped_loading = False   # stop() came while the model was loading
        self._thread = threading.Thread(target=self._run, name="runner-model", daemon=True)

    # ---- the event loop's side -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, or refuse it at once. Called from the event loop only, so the check and the
        put cannot interleave with another submit."""
        if self.state == "loading":
            raise ApiError(503, f"the model is still loading ({self.stage}); retry in a moment", type="server_error",
                           code="model_loading", headers={"Retry-After": "2"})
        if self.state != "ready":
            raise ApiError(503, "the server is stopping", type="server_error", code="shutting_down")
        if self._waiting.qsize() >= self.queue_size:
            raise ApiError(429, f"{self.queue_size} request{'s are' if self.queue_size > 1 else ' is'} already waiting "
                                "for the model (one answer at a time); retry later",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        self._submitted += 1
        job.number = self._submitted
        job.behind = self.busy or self._waiting.qsize() > 0
        self._waiting.put(job)

    @property
    def queued(self) -> int:
        return self._waiting.qsize()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def stop(self) -> None:
        """Cancel what runs and what waits, without waiting: on Ctrl+C the replies under way end at
        their next token, so their responses finish inside the HTTP server's grace period."""
        if self.state == "closed":
            return
        self._stopped_loading, self.state = self.state == "loading", "closed"
        current = self._current
        if current is not None:
            current.cancel.set()
        self._waiting.put(None)

    def close(self, timeout: float = 10.0) -> None:
        """stop(), then let the thread close the session. A load still under way is not waited for
        (the thread closes the session when it ends)."""
        self.stop()
        if not self._stopped_loading:
            self._thread.join(timeout)

    # ---- the model's thread ----------------------------------------------------------------
    def _progress(self, progress: LoadProgress) -> None:
        self.stage = progress.stage
        if self._on_progress is not None:
            self._on_progress(progress)

    def _run(self) -> None:
        try:
            session = self._open(self._progress)
        except Exception as error:   # `runner serve` stops the server and reports it
            self._fail(error)
            return
        self.session = session
        try:
            if self.state == "loading":
                self.state = "ready"
                if self._on_ready is not None:
                    self._on_ready(session)
            while (job := self._waiting.get()) is not None:
                self._current = job
                try:
                    self._answer(job)
                finally:
                    self._current = None
        finally:
            session.close()

    def _fail(self, error: Exception) -> None:
        """The model cannot answer (it did not load, or its ranks are gone): the server stops and
        `runner serve` reports `error` as its last line."""
        self.failure = error
        self.state = "failed"
        if self._on_failed is not None:
            self._on_failed(error)

    def _answer(self, job: Job) -> None:
        label = f"{'chat' if job.request.chat else 'completion'} #{job.number}"
        if job.cancel.is_set() or self.state == "closed":
            job.post(Finished("cancelled", Usage(0, 0, 0)))
            why = "the server is stopping" if self.state == "closed" else "the client went away"
            self._log(f"{label} · cancelled before it started ({why})")
            return
        try:
            self._generate(job, label)
        except ApiError as error:
            job.post(Failed(error))
        except UserInputError as error:
            job.post(Failed(ApiError(400, str(error))))
        except RunnerError as error:
            job.post(Failed(ApiError(500, str(error), type="server_error")))
            if getattr(self.session, "broken", None):   # the ranks of `runner launch` are gone: stop serving
                self._fail(error)
        except Exception as error:   # a bug or a backend failure: the server answers 500 and goes on
            self._log(f"{label} · failed:\n{traceback.format_exc().rstrip()}")
            job.post(Failed(ApiError(500, f"the model failed while answering ({type(error).__name__}: {error}); "
                                          "the server goes on", type="server_error")))

    def _generate(self, job: Job, label: str) -> None:
        request = job.request
        waited = time.perf_counter() - job.queued_at
        ids = self._prompt_ids(request)
        room = self.context - len(ids)
        if room < 1:
            raise ApiError(400, f"the prompt is {counted(len(ids), 'token')} but this server's context is "
                                f"{counted(self.context, 'token')} "
                                "(prompt and reply together): shorten it, or restart runner serve with a larger --context",
                           param="messages" if request.chat else "prompt", code="context_length_exceeded")
        sampling = Sampling(temperature=request.temperature, top_p=request.top_p,
                            max_tokens=min(request.max_tokens or room, room), seed=request.seed)
        scanner = StopScanner(request.stop)
        last, stopped = None, False
        with closing(self.session.stream_tokens(ids, sampling, job.cancel)) as chunks:
            for chunk in chunks:
                if last is None:
                    job.post(Started(chunk.prompt_tokens, chunk.reused_tokens))
                last = chunk
                text, stopped = scanner.feed(chunk.text)
                if text:
                    job.post(Text(text))
                if stopped:
                    break
        if not stopped and (rest := scanner.flush()):
            job.post(Text(rest))
        finish = "stop" if stopped else last.finish_reason
        usage = Usage(last.prompt_tokens, last.generation_tokens, last.reused_tokens)
        if finish == "cancelled" and self.state == "closed":   # Ctrl+C: the client is told, not handed a short reply
            job.post(Failed(ApiError(503, "the server is stopping: the reply was cut short", type="server_error",
                                     code="shutting_down")))
        else:
            job.post(Finished(finish, usage))
        queue_note = f"waited {waited:.2f} s · " if job.behind else ""
        tokens = f"{counted(usage.completion_tokens, 'token')}"
        if finish == "cancelled":
            why = "the server is stopping" if self.state == "closed" else "the client went away"
            outcome = f"{tokens} (cancelled: {why})"
        else:
            outcome = (f"{tokens} ({finish}) · {last.generation_tps:.1f} tokens/s · "
                       f"first token {last.time_to_first_token:.2f} s")
        self._log(f"{label} · {queue_note}{counted(usage.prompt_tokens, 'prompt token')}, {usage.reused_tokens} reused · {outcome}")

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.chat:
            return list(self.session.tokenize(request.messages))
        return list(self.session.encode(request.prompt))

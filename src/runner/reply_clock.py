"""A streamed reply as the sessions that run their own decode loop make it (cuda, llama.cpp; mlx-lm
has its own): its chunks from its token ids (`reply_chunks`: when it stops and why), and the
timings every GenerationChunk reports, measured one way (`ReplyClock`)."""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator, Protocol

from runner.backend import GenerationChunk


class ReplyClock:
    """One reply's clock: the time to its first token and the prefill's speed, then the decode's."""

    def __init__(self, prompt_tokens: int, reused: int, started: float) -> None:
        self.prompt_tokens = prompt_tokens
        self.reused = reused               # prompt tokens whose KV cache was kept, not prefilled
        self.started = started             # when the call began: the time to first token counts from here
        self.first_token_at = 0.0
        self.time_to_first_token = 0.0
        self.prompt_tps = 0.0

    def first_token(self, prefilled: int, step_started: float) -> None:
        """The first token is out, from a step begun at `step_started` that prefilled `prefilled` tokens."""
        self.first_token_at = time.perf_counter()
        self.time_to_first_token = self.first_token_at - self.started
        self.prompt_tps = prefilled / max(self.first_token_at - step_started, 1e-9)

    def chunk(self, text: str, token: int | None, generated: int, finish: str | None,
              peak_memory: int) -> GenerationChunk:
        """The chunk for `text` after `generated` tokens; the decode speed counts from the first token."""
        elapsed = time.perf_counter() - self.first_token_at if generated > 1 else 0.0
        return GenerationChunk(
            text=text,
            token=token,
            prompt_tokens=self.prompt_tokens,
            prompt_tps=self.prompt_tps,
            generation_tokens=generated,
            generation_tps=(generated - 1) / elapsed if elapsed > 0 else 0.0,
            time_to_first_token=self.time_to_first_token,
            peak_memory=peak_memory,
            finish_reason=finish,
            reused_tokens=self.reused,
        )


class ReplyTextLike(Protocol):
    """A reply's text as its ids come: `add(id)` the new text, `flush()` whatever is held back."""

    def add(self, token: int) -> str: ...

    def flush(self) -> str: ...


def reply_chunks(tokens: Iterator[int], text: ReplyTextLike, clock: ReplyClock, limit: int, eos_ids,
                 cancel: threading.Event | None, peak_memory: Callable[[], int]) -> Iterator[GenerationChunk]:
    """The chunks of one reply whose ids `tokens` yields (`next` runs a step). It ends when `cancel`
    is set (checked before each step), at an end-of-sequence id (the stop chunk carries it, and it
    is counted), or after `limit` ids. `tokens` is closed before the last chunk comes out, so a
    session can put its cache in order first (and also when the caller drops the stream)."""
    generated = 0
    try:
        while True:
            if cancel is not None and cancel.is_set():
                tokens.close()
                yield clock.chunk(text.flush(), None, generated, "cancelled", peak_memory())
                return
            step_started = time.perf_counter()
            token = next(tokens)
            generated += 1
            if generated == 1:
                clock.first_token(clock.prompt_tokens - clock.reused, step_started)
            if token in eos_ids:
                tokens.close()
                yield clock.chunk(text.flush(), token, generated, "stop", peak_memory())
                return
            piece = text.add(token)
            if generated >= limit:
                tokens.close()
                yield clock.chunk(piece + text.flush(), token, generated, "length", peak_memory())
                return
            yield clock.chunk(piece, token, generated, None, peak_memory())
    finally:
        tokens.close()

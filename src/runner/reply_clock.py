"""The timings a streamed reply reports in every GenerationChunk, measured one way by the sessions
that run their own decode loop (cuda, llama.cpp; mlx-lm measures its own)."""

from __future__ import annotations

import time

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

"""What the prefix-cache tests of every backend share: a conversation, one streamed reply (with an
optional cancel, as Esc does), and the model's own greedy continuation without any cache."""

from __future__ import annotations

import threading

import numpy as np

from runner.backend import Sampling

QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which one is larger?", "Thanks. One more: Spain?"]


def argmax_continuation(session, prompt: list[int], steps: int) -> list[int]:
    """One full forward per token, no cache: the reply a kept cache must reproduce."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(session.logits(ids)[-1])))
    return ids[len(prompt):]


def reply(session, messages, max_tokens: int, cancel_after: int | None = None):
    """(prompt ids, reply ids, chunks) of one streamed reply; `cancel_after` stops it after that
    many tokens, as Esc in the chat does."""
    cancel = threading.Event()
    chunks = []
    for chunk in session.stream(messages, Sampling(max_tokens=max_tokens), cancel):
        chunks.append(chunk)
        if cancel_after is not None and len(chunks) == cancel_after:
            cancel.set()
    return session.tokenize(messages), [c.token for c in chunks if c.token is not None], chunks

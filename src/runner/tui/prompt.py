"""Fitting a conversation into the model's context.

A long conversation ends up longer than the context the model was loaded with. Rather than fail
every later message, the oldest turns are left out of the prompt (they stay in the history) so
that the newest message and room for the reply fit. The system prompt is always kept.
"""

from __future__ import annotations

from typing import Callable, Sequence

from runner.backend import Message


def fit_to_context(
    turns: Sequence[Message], tokenize: Callable[[Sequence[Message]], list[int]], context: int, max_tokens: int
) -> tuple[list[Message], int]:
    """The newest turns whose prompt leaves room for a reply, and how many turns were left out.

    Room kept for the reply: `max_tokens`, but at most half the context. If the newest message
    alone is too long, it is returned as is and the backend says so.
    """
    system = [t for t in turns if t.role == "system"][:1]
    rest = [t for t in turns if t.role != "system"]
    budget = context - min(max_tokens, context // 2)
    dropped = 0
    while len(rest) > 1 and len(tokenize(system + rest)) > budget:
        rest.pop(0)
        dropped += 1
    # a prompt should not open with the assistant's words
    while len(rest) > 1 and rest[0].role == "assistant":
        rest.pop(0)
        dropped += 1
    return system + rest, dropped

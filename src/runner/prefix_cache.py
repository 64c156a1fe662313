"""Which part of a prompt a session's kept KV cache already holds.

A session keeps the KV cache of its last reply together with the token ids in it. The next
request (a chat's next turn, the server's next call) usually starts with those ids: only the rest
is prefilled. Otherwise the cache is cut back to the common prefix, or dropped. Both backends
decide with `reusable_prefix`; each cuts its own cache objects.
"""

from __future__ import annotations

from typing import Sequence


def reusable_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """How many of `prompt`'s first tokens can come from a cache holding `cached`: their common
    prefix, short of the prompt's last token (it must go through the model to give the logits of
    the first reply token)."""
    limit = min(len(cached), len(prompt) - 1)
    common = 0
    while common < limit and cached[common] == prompt[common]:
        common += 1
    return common

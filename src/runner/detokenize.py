"""A reply's text, one token at a time, as the tokenizer decodes it (the cuda and mlx sessions;
llama.cpp's session appends each token's bytes, which keep their spaces).

Byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen) split a multi-byte character such as "é" or
"🙂" over several tokens; decoding each token alone gives U+FFFD replacement characters. Like
text-generation-inference, `ReplyText` decodes a short window of recent ids twice (with and without
the newest) and emits the difference, holding text back while it ends in an incomplete character.
Given the prompt, the window starts with its last ids, so that the first reply token is decoded
where it stands: an SPM tokenizer strips a space at the start of what it decodes, and mlx-lm's
streaming detokenizers (0.32) drop it too, which turned a completion's " Paris." into "Paris.".
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 4    # prompt ids decoded ahead of the reply: enough for spaces and merges


class ReplyText:
    def __init__(self, tokenizer, prompt: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt[-PROMPT_CONTEXT:])
        self._window = 0                 # start of the window decoded for context
        self._emitted = len(self._ids)   # ids before this are prompt or already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """The new text `token` completes ("" while a character is unfinished)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._window:self._emitted])
        now = self._decode(self._ids[self._window:])
        if len(now) > len(before) and not now.endswith(REPLACEMENT):
            self._window, self._emitted = self._emitted, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an unfinished character comes out as U+FFFD, as a full decode would)."""
        before = self._decode(self._ids[self._window:self._emitted])
        now = self._decode(self._ids[self._window:])
        self._window = self._emitted = len(self._ids)
        return now[len(before):]

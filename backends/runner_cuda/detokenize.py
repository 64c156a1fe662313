"""Turn generated token ids into text one token at a time.

Byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen) split a multi-byte character such as "é" or
"🙂" over several tokens; decoding each token alone gives U+FFFD replacement characters. Like
text-generation-inference, we decode a short window of recent tokens twice (with and without the
newest) and emit only the difference, holding text back while it ends in an incomplete character.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0   # start of the window decoded for context (spaces, merges)
        self.read_offset = 0     # tokens before this are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add one token; return the new text it completes ("" while a character is unfinished)."""
        self.ids.append(token_id)
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        current = self._decode(self.ids[self.prefix_offset :])
        if len(current) > len(emitted) and not current.endswith(REPLACEMENT):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return current[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character comes out as U+FFFD, as a full decode would)."""
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        current = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return current[len(emitted) :]

"""The message box: one line; Enter sends.

Typed characters are inserted a batch at a time. A terminal without bracketed paste (or a
multiplexer) sends a paste as one key event per character: Textual's Input redraws and scrolls
after each, so 33 KB took about 90 s (each insert costs more as the line grows). Here a printable
key is kept and inserted with the keys queued behind it, in one edit; any other key (Enter,
arrows, Ctrl+...) first inserts what is kept, so the order of edits is the order of the keys.
"""

from __future__ import annotations

from textual import events
from textual.widgets import Input


class PromptInput(Input):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._typed: list[str] = []

    def on_key(self, event: events.Key) -> None:
        if event.is_printable and event.character is not None:
            event.stop()
            event.prevent_default()      # Input's own handler would insert it now
            self._typed.append(event.character)
            if len(self._typed) == 1:    # runs after the key events already queued
                self.call_later(self.insert_typed)
        else:
            self.insert_typed()

    def on_paste(self, event: events.Paste) -> None:
        """A bracketed paste: all of it, lines joined by spaces (Input would keep the first line only)."""
        event.stop()
        event.prevent_default()
        self.insert_typed()
        self.insert_at_cursor(" ".join(event.text.splitlines()))
        # Input scrolls to the cursor before the new text is laid out: a long paste stayed
        # scrolled to its start, the cursor out of sight; scroll again once it is laid out
        if self.cursor_at_end:
            self.call_after_refresh(lambda: self.scroll_to(x=self.max_scroll_x, animate=False))

    def insert_typed(self) -> None:
        """Insert the characters kept so far, in one edit."""
        text = "".join(self._typed)
        self._typed.clear()
        self.insert_at_cursor(text)

    def insert_at_cursor(self, text: str) -> None:
        if not text:
            return
        if self.selection.is_empty:
            self.insert_text_at_cursor(text)
        else:
            self.replace(text, *self.selection)

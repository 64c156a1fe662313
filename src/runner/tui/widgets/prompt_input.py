"""The message box: one line; Enter sends."""

from __future__ import annotations

from textual.widgets import Input


class PromptInput(Input):
    pass

"""The conversation: the user's turns as plain text, the replies as Markdown that grows as it streams."""

from __future__ import annotations

from markdown_it import MarkdownIt
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Markdown, Static
from textual.widgets._markdown import MarkdownStream

from runner.tui.history import COMPLETE, ERROR, PARTIAL, STOPPED, StoredMessage, state_note


def chat_markdown() -> MarkdownIt:
    """GitHub-flavoured Markdown where a single newline is a line break, as models mean it
    ("Red\nBlue\nYellow" is three lines, not one paragraph)."""
    parser = MarkdownIt("gfm-like")

    def newlines_are_line_breaks(state) -> None:
        for token in state.tokens:
            for child in token.children or ():
                if child.type == "softbreak":
                    child.type = "hardbreak"

    parser.core.ruler.push("newlines_are_line_breaks", newlines_are_line_breaks)
    return parser


class UserMessage(Static):
    """One of the user's turns."""

    def __init__(self, content: str) -> None:
        super().__init__(Text(content), classes="user-message")
        self.content = content


class AssistantMessage(Vertical):
    """One reply. While streaming, `append` adds text; `finish` marks how it ended."""

    def __init__(self, content: str = "", state: str = PARTIAL, error: str = "", streaming: bool = False) -> None:
        super().__init__(classes="assistant-message")
        self.content = content
        self.state = state
        self.error = error
        self.streaming = streaming        # a reply being generated now (not one read from history)
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Markdown(self.content or "", classes="reply", parser_factory=chat_markdown)
        yield Static("", classes="reply-note")

    def on_mount(self) -> None:
        self._show_note()

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    async def append(self, text: str) -> None:
        if not text:
            return
        self.content += text
        if self._stream is None:
            self._stream = Markdown.get_stream(self.markdown)
            self._show_note()
        await self._stream.write(text)

    async def finish(self, state: str, error: str = "") -> None:
        """Stop streaming, render the final text exactly, and show the mark if it did not complete."""
        self.state, self.error = state, error
        self.streaming = False
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        await self.markdown.update(self.content)
        self._show_note()

    def _show_note(self) -> None:
        note = self.query_one(".reply-note", Static)
        if self.streaming:
            note.update(Text("thinking…", "dim italic"))
            note.display = not self.content
            return
        if self.state == COMPLETE:
            note.display = False
            return
        text = state_note(
            StoredMessage(0, 0, "assistant", self.content, self.state, self.error, 0.0)
        )
        style = {STOPPED: "bold yellow", ERROR: "bold red"}.get(self.state, "bold yellow")
        symbol = {STOPPED: "■ ", ERROR: "✘ "}.get(self.state, "▲ ")
        note.update(Text(symbol + text, style))
        note.display = True
        self.set_class(self.state == STOPPED, "stopped")
        self.set_class(self.state == ERROR, "failed")


class Conversation(VerticalScroll):
    """The scrolling list of turns."""

    def compose(self) -> ComposeResult:
        yield Static("", id="conversation-empty")

    def show_empty_hint(self, hint: str) -> None:
        empty = self.query_one("#conversation-empty", Static)
        empty.update(hint)
        empty.display = not self.query(".user-message, .assistant-message")

    async def clear(self) -> None:
        await self.query(".user-message, .assistant-message, .notice").remove()
        self.query_one("#conversation-empty").display = True

    async def add_user(self, content: str) -> UserMessage:
        self.query_one("#conversation-empty").display = False
        widget = UserMessage(content)
        await self.mount(widget)
        self.scroll_end(animate=False)
        return widget

    async def add_assistant(
        self, content: str = "", state: str = PARTIAL, error: str = "", streaming: bool = False
    ) -> AssistantMessage:
        self.query_one("#conversation-empty").display = False
        widget = AssistantMessage(content, state, error, streaming)
        await self.mount(widget)
        self.scroll_end(animate=False)
        return widget

    async def add_notice(self, text: str, style: str = "yellow") -> None:
        await self.mount(Static(Text(text, style), classes="notice"))
        self.scroll_end(animate=False)

    async def show_messages(self, messages: list[StoredMessage]) -> None:
        await self.clear()
        for message in messages:
            if message.role == "user":
                await self.add_user(message.content)
            elif message.role == "assistant":
                await self.add_assistant(message.content, message.state, message.error)

"""The history sidebar: the conversations, newest first; Enter opens one, Del deletes one (after
asking). It posts `ConversationOpened` / `ConversationDeleted`; the chat screen does the rest."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, OptionList, Static
from textual.widgets.option_list import Option

from runner.tui.history import Conversation
from runner.tui.messages import ConversationDeleted, ConversationOpened
from runner.tui.screens.confirm import ConfirmScreen


class HistorySidebar(Vertical):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.titles: dict[int, str] = {}

    def compose(self) -> ComposeResult:
        yield Label("History", classes="panel-title")
        yield OptionList(id="history-list")
        yield Static("Enter open · Del delete", id="sidebar-hint")

    @property
    def options(self) -> OptionList:
        return self.query_one("#history-list", OptionList)

    def show(self, conversations: list[Conversation], current_id: int | None) -> None:
        """The list, the open conversation marked; the highlight stays where it was."""
        options = self.options
        highlighted = options.highlighted
        options.clear_options()
        self.titles = {conversation.id: conversation.title for conversation in conversations}
        for conversation in conversations:
            marker = "▸ " if conversation.id == current_id else "  "
            title = Text(marker + conversation.title, no_wrap=True, overflow="ellipsis")
            options.add_option(Option(title, id=str(conversation.id)))
        if options.option_count:
            options.highlighted = min(highlighted or 0, options.option_count - 1)
        self.query_one("#sidebar-hint", Static).update(
            "Enter open · Del delete" if options.option_count else "No conversations yet"
        )

    def highlighted_id(self) -> int | None:
        """The conversation under the cursor while the list has the focus, else None."""
        options = self.options
        if self.screen.focused is not options or options.highlighted is None:
            return None
        return int(options.get_option_at_index(options.highlighted).id)

    @on(OptionList.OptionSelected, "#history-list")
    def opened(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.post_message(ConversationOpened(int(event.option.id)))

    def on_key(self, event) -> None:
        conversation_id = self.highlighted_id()
        if event.key in ("delete", "d") and conversation_id is not None:
            event.stop()
            self.confirm_delete(conversation_id)

    def confirm_delete(self, conversation_id: int) -> None:
        title = self.titles.get(conversation_id, "this conversation")

        def answered(yes: bool | None) -> None:
            if yes:
                self.post_message(ConversationDeleted(conversation_id, title))

        self.app.push_screen(ConfirmScreen(f"Delete “{title}”? This cannot be undone.", "Delete"), answered)

"""The app's screens and keys that need no loaded model: history list, export, delete, settings,
help, a terminal too small. The model is a catalog entry with no weights here, so its load fails
at once (and the app must stay usable, which is part of what these tests check)."""

from __future__ import annotations

import time

import pytest
from textual import events

from runner.hardware import parse_machine
from runner.tui import history as history_module
from runner.tui.app import RunnerApp
from runner.tui.history import COMPLETE, HistoryStore, export_file_name
from runner.tui.loading import ModelChoice
from runner.tui.screens.chat import ChatScreen
from runner.tui.screens.help import HelpScreen
from runner.tui.screens.settings import SettingsScreen
from runner.tui.screens.small import TooSmallScreen
from runner.tui.widgets.conversation import AssistantMessage, UserMessage
from tui_helpers import SIZE, hold_lock, run_async

@pytest.fixture
def history_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # exports land here
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    path = tmp_path / "history.db"
    store = HistoryStore(path)
    c = store.create_conversation("Capital cities", "m")
    store.add_message(c.id, "user", "What is the capital of France?")
    store.add_message(c.id, "assistant", "**Paris**.", COMPLETE)
    store.close()
    return path


def make_app(history_path) -> RunnerApp:
    return RunnerApp(ModelChoice("meta-llama/Llama-3.1-8B-Instruct"), history_path=history_path,
                     machine=parse_machine("1xRTX4090"))


async def settle(pilot) -> ChatScreen:
    chat = next(s for s in pilot.app.screen_stack if isinstance(s, ChatScreen))
    deadline = time.monotonic() + 30
    while chat.model_state != "failed":
        assert time.monotonic() < deadline
        await pilot.pause(0.02)
    return chat


async def open_first_conversation(pilot, chat) -> None:
    chat.query_one("#history-list").focus()
    await pilot.press("enter")
    await pilot.pause(0.1)


@run_async
async def test_open_export_and_delete_a_conversation(history_path, tmp_path):
    app = make_app(history_path)
    async with app.run_test(size=SIZE) as pilot:
        chat = await settle(pilot)
        await open_first_conversation(pilot, chat)
        assert chat.query_one(UserMessage).content == "What is the capital of France?"
        assert chat.query_one(AssistantMessage).content == "**Paris**."
        await pilot.press("ctrl+t")
        [exported] = tmp_path.glob("chat-*.md")
        assert "## You\n\nWhat is the capital of France?" in exported.read_text()
        # delete from the list: asks first; "n" keeps it, "y" deletes it
        chat.query_one("#history-list").focus()
        await pilot.press("delete")
        await pilot.press("n")
        assert app.recorder.wait_idle(5)
        assert len(app.history.conversations()) == 1
        await pilot.press("delete")
        await pilot.press("y")
        await pilot.pause(0.1)
        assert app.recorder.wait_idle(5)
        await pilot.pause(0.1)
        assert app.history.conversations() == []
        assert chat.query_one("#history-list").option_count == 0
        assert not chat.query(UserMessage)  # the open conversation was the one deleted


@run_async
async def test_settings_are_checked_and_saved_with_the_conversation(history_path):
    app = make_app(history_path)
    async with app.run_test(size=SIZE) as pilot:
        chat = await settle(pilot)
        await open_first_conversation(pilot, chat)
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#top-p").value = "1.5"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)  # refused
        assert "top-p" in str(app.screen.query_one("#settings-error").render())
        app.screen.query_one("#top-p").value = "0.8"
        app.screen.query_one("#temperature").value = "0.3"
        app.screen.query_one("#max-tokens").value = "64"
        app.screen.query_one("#system-prompt").text = "Answer in one word."
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, ChatScreen)
        assert (chat.settings.temperature, chat.settings.top_p, chat.settings.max_tokens) == (0.3, 0.8, 64)
        assert app.recorder.wait_idle(5)
        [conversation] = app.history.conversations()
        assert conversation.system_prompt == "Answer in one word."
        # Esc cancels without changing anything
        await pilot.press("ctrl+s")
        app.screen.query_one("#max-tokens").value = "9"
        await pilot.press("escape")
        assert chat.settings.max_tokens == 64
    # saved settings are the defaults of the next session
    again = make_app(history_path)
    async with again.run_test(size=SIZE) as pilot:
        chat = await settle(pilot)
        assert (chat.settings.temperature, chat.settings.top_p, chat.settings.max_tokens) == (0.3, 0.8, 64)
        assert chat.settings.system_prompt == "Answer in one word."


@run_async
async def test_help_lists_the_keys(history_path):
    app = make_app(history_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        text = app.export_screenshot()  # what is on screen (SVG text)
        for key in ("Esc", "Ctrl+O", "Ctrl+S", "Ctrl+T", "Ctrl+Q"):
            assert key in text
        await pilot.press("escape")
        assert isinstance(app.screen, ChatScreen)


@run_async
async def test_terminal_too_small_shows_a_message_until_it_grows(history_path):
    app = make_app(history_path)
    async with app.run_test(size=(40, 10)) as pilot:
        await pilot.pause(0.1)
        assert isinstance(app.screen, TooSmallScreen)
        assert "40×10" in str(app.screen.query_one("#too-small").render())
        await pilot.resize_terminal(100, 30)
        await pilot.pause(0.1)
        assert isinstance(app.screen, ChatScreen)
        await pilot.resize_terminal(50, 30)
        await pilot.pause(0.1)
        assert isinstance(app.screen, TooSmallScreen)


@run_async
async def test_pick_at_start_then_a_catalog_entry_offers_its_download(history_path, monkeypatch):
    """Enter on a catalog entry opens its download (tests/test_tui_pull.py pulls one); offline, the
    screen says so in one line and offers no download."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)    # the Hub is never asked here
    app = RunnerApp(ModelChoice(), pick=True, history_path=history_path, machine=parse_machine("1xRTX4090"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.1)
        from runner.tui.screens.picker import PickerScreen
        from runner.tui.screens.pull import PullScreen

        assert isinstance(app.screen, PickerScreen)
        await pilot.press("escape")
        chat = app.screen
        assert isinstance(chat, ChatScreen) and chat.model_state == "none"
        assert "Ctrl+O picks one" in str(chat.query_one("#conversation-empty").render())
        await pilot.press("ctrl+o")
        picker = app.screen
        row = next(i for i, e in enumerate(picker.entries) if e.name == "meta-llama/Llama-3.1-8B-Instruct")
        picker.query_one("#models").move_cursor(row=row)
        await pilot.press("enter")
        offer = app.screen
        assert isinstance(offer, PullScreen)
        deadline = time.monotonic() + 30
        while "HF_HUB_OFFLINE is set" not in str(offer.query_one("#pull-body").render()):
            assert time.monotonic() < deadline
            await pilot.pause(0.02)
        assert offer.query_one("#pull-start").disabled
        await pilot.press("escape")
        assert app.screen is picker
        await pilot.press("escape")
        assert app.screen is chat and chat.model_state == "none"


@run_async
async def test_a_locked_history_is_left_alone_and_the_app_says_so(history_path, monkeypatch):
    monkeypatch.setattr(history_module, "BUSY_TIMEOUT", 0.2)
    holder = hold_lock(history_path)
    try:
        app = make_app(history_path)
        async with app.run_test(size=SIZE) as pilot:
            chat = await settle(pilot)
            messages = [str(n.message) for n in app._notifications]
            assert any("locked by another program" in m and "not saved" in m for m in messages), messages
            assert chat.query_one("#history-list").option_count == 0
    finally:
        holder.communicate("\n", timeout=10)
    assert list(history_path.parent.glob("*corrupt*")) == []
    assert [c.title for c in HistoryStore(history_path).conversations()] == ["Capital cities"]


@run_async
async def test_a_data_folder_that_is_a_file_opens_the_app_with_a_message(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    app = make_app(tmp_path / "data" / "history.db")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        messages = [str(n.message) for n in app._notifications]
        assert any("cannot use" in m and "not saved" in m for m in messages), messages


@run_async
async def test_export_never_follows_a_symlink_nor_overwrites_a_file(history_path, tmp_path):
    conversation = HistoryStore(history_path).conversations()[0]
    name = export_file_name(conversation)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / name).symlink_to(victim)               # a link where the export would go
    app = make_app(history_path)
    async with app.run_test(size=SIZE) as pilot:
        chat = await settle(pilot)
        await open_first_conversation(pilot, chat)
        await pilot.press("ctrl+t")
        await pilot.press("ctrl+t")                     # again: a new file, the first one stays
        await pilot.pause(0.2)
    assert victim.read_text() == "precious" and (tmp_path / name).is_symlink()
    stem = name.removesuffix(".md")
    for exported in (tmp_path / f"{stem}-2.md", tmp_path / f"{stem}-3.md"):
        assert "What is the capital of France?" in exported.read_text()


@run_async
async def test_export_after_the_current_folder_was_deleted_says_so(history_path, tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    app = make_app(history_path)
    async with app.run_test(size=SIZE) as pilot:
        chat = await settle(pilot)
        await open_first_conversation(pilot, chat)
        await pilot.press("ctrl+t")
        await pilot.pause(0.2)
        messages = [str(n.message) for n in app._notifications]
        assert any("Could not export" in m and "no longer exists" in m for m in messages), messages


@run_async
async def test_a_paste_typed_as_33_kb_of_keys_does_not_freeze_the_message_box(history_path):
    """A terminal without bracketed paste sends a paste as one key event per character (as
    Textual's driver posts them); each then used to redraw the growing line: ~90 s for 33 KB."""
    text = ("lorem ipsum dolor sit amet, " * 1200)[:33_000]
    app = make_app(history_path)
    async with app.run_test(size=SIZE) as pilot:
        chat = await settle(pilot)
        prompt = chat.query_one("#prompt")
        started = time.monotonic()
        for character in text + "!":
            app.post_message(events.Key("space" if character == " " else character, character))
        while prompt.value != text + "!":
            await pilot.pause(0.05)
        assert time.monotonic() - started < 20
        # the keys that follow still edit where they should
        await pilot.press("home", "x", "end", "backspace")
        assert prompt.value == "x" + text
        # a bracketed paste of several lines keeps them all, and shows its end (where the cursor is)
        prompt.value = ""
        prompt.post_message(events.Paste("first line\n" + "lorem ipsum " * 300 + "\nlast line"))
        await pilot.pause(0.2)
        assert prompt.value == "first line " + "lorem ipsum " * 300 + " last line"
        assert prompt.scroll_x == prompt.max_scroll_x > 0


def test_the_pickers_verdicts_are_planned_as_the_pick_would_load():
    """A catalog entry's verdict uses the chat's backend, context and KV setting (what a pick keeps)."""
    from runner.hardware import parse_machine
    from runner.tui.loading import ModelChoice
    from runner.tui.models import ModelEntry
    from runner.tui.screens.picker import verdict_cell

    entry = ModelEntry("meta-llama/Llama-3.1-8B-Instruct", "catalog", None)
    machine = parse_machine("1xRTX4090")
    long = verdict_cell(entry, machine, ModelChoice(context=131072)).plain
    long_kv4 = verdict_cell(entry, machine, ModelChoice(context=131072, kv_bits=4)).plain
    short = verdict_cell(entry, machine, ModelChoice(context=4096)).plain
    assert long != long_kv4 != short, (long, long_kv4, short)
    assert "not a GGUF file" in verdict_cell(entry, machine, ModelChoice(backend="llamacpp")).plain

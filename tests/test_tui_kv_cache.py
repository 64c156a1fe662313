"""The chat's KV cache setting (Ctrl+G), driven by the Pilot on the real app: the plan of each
setting, the model reloaded through the same path with the KV cache quantized, and shown."""

from __future__ import annotations

import pytest

from runner.tui.app import RunnerApp
from runner.tui.loading import LocalSource, ModelChoice
from runner.tui.screens.kv_cache import KvCacheScreen
from runner.tui.screens.settings import ChatSettings
from runner.tui.widgets.conversation import AssistantMessage
from tui_helpers import SIZE, chat_screen, run_async, send, wait_loaded, wait_until


def option_texts(screen: KvCacheScreen) -> list[str]:
    from textual.widgets import OptionList

    options = screen.query_one(OptionList)
    return [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]


async def open_kv_screen(pilot) -> KvCacheScreen:
    await pilot.press("ctrl+g")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, KvCacheScreen), 10, "the KV cache screen")
    screen = pilot.app.screen
    await wait_until(pilot, lambda: not any("planning…" in t for t in option_texts(screen)), 30, "the plans")
    return screen


@pytest.mark.slow
@run_async
async def test_kv8_reloads_the_model_with_a_quantized_cache_and_says_so(default_model_dir, tmp_path):
    app = RunnerApp(ModelChoice(str(default_model_dir), quant="fp32"), history_path=tmp_path / "h.db",
                    settings=ChatSettings(max_tokens=12))
    async with app.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        assert "kv" not in str(chat.query_one("#status-model").render())
        first_load = chat.loader.load_id
        screen = await open_kv_screen(pilot)
        none, kv8, kv4 = option_texts(screen)
        assert none.startswith("none   (current)") and "fits" in kv8 and "fits" in kv4
        # the plan's KV bytes of SmolLM2 (30 layers x 3 KV heads x 64, K and V) at 4,096 tokens: fp32
        # 256 bytes per head and token; 8-bit 64 + an fp32 scale and bias = 72; 4-bit 32 + 8 = 40
        assert "189 MB for 4,096 tokens" in none
        assert "53.1 MB for 4,096 tokens" in kv8 and "29.5 MB for 4,096 tokens" in kv4
        assert all(text.endswith("up to 8,192 tokens") for text in (none, kv8, kv4))   # the model's maximum
        await pilot.press("down", "enter")
        chat = await wait_loaded(pilot)
        assert chat.loader.load_id == first_load + 1
        assert chat.loader.choice.kv_bits == 8 and chat.loader.plan.kv_bits == 8
        assert chat.session.kv_bits == 8 and "KV cache 8-bit" in chat.session.device_summary
        assert "fp32 · kv8 · " in str(chat.query_one("#status-model").render())
        assert "KV cache (8-bit) 53.1 MB" in str(chat.query_one("#plan-body").render())
        await send(pilot, "What is the capital of Germany?")     # not France: a near tie (tests/test_kv_bits.py)
        await wait_until(pilot, lambda: chat.query(AssistantMessage)
                         and chat.query(AssistantMessage).last().state == "complete", 60, "the reply")
        assert "Berlin" in chat.query(AssistantMessage).last().content

        # back to the cache unquantized: reloaded, and the status line says nothing of KV
        screen = await open_kv_screen(pilot)
        assert "(current)" in option_texts(screen)[1]
        await pilot.press("up", "enter")
        chat = await wait_loaded(pilot)
        assert chat.session.kv_bits is None and chat.loader.load_id == first_load + 2
        assert "kv" not in str(chat.query_one("#status-model").render())


@run_async
async def test_a_model_whose_heads_cannot_be_quantized_offers_none_only(tiny_llama_dir, tmp_path):
    app = RunnerApp(ModelChoice(str(tiny_llama_dir), quant="fp32"), history_path=tmp_path / "h.db")
    async with app.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        first_load = chat.loader.load_id
        screen = await open_kv_screen(pilot)
        none, kv8, kv4 = option_texts(screen)
        assert "fits" in none
        assert "head size 16 is not a multiple of 64" in kv8 and "head size 16 is not a multiple of 64" in kv4
        from textual.widgets import OptionList

        options = screen.query_one(OptionList)
        assert [options.get_option_at_index(i).disabled for i in range(3)] == [False, True, True]
        await pilot.press("down", "enter")      # the disabled rows are skipped: none stays highlighted
        await wait_until(pilot, lambda: not isinstance(app.screen, KvCacheScreen), 10, "the screen to close")
        assert chat.loader.load_id == first_load and chat.model_state == "ready"   # the same setting: no reload
        screen = await open_kv_screen(pilot)
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, KvCacheScreen), 10, "the screen to close")
        assert chat.loader.load_id == first_load and chat.session.kv_bits is None


class ForwardingSource:
    """A ModelSource other than this process's LocalSource, as `runner launch`'s ranks are (whose
    KV setting is its --kv-bits): it loads through LocalSource here, on the tiny model."""

    def __init__(self) -> None:
        self.local = LocalSource()

    def plan(self, choice, machine):
        return self.local.plan(choice, machine)

    def load(self, choice, spec, plan, on_progress):
        return self.local.load(choice, spec, plan, on_progress)


@run_async
async def test_ctrl_g_over_another_source_says_where_the_setting_is(tiny_llama_dir, tmp_path):
    app = RunnerApp(ModelChoice(str(tiny_llama_dir), quant="fp32"), history_path=tmp_path / "h.db",
                    source=ForwardingSource())
    async with app.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        notified = []
        chat.notify = lambda message, **options: notified.append(message)
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert not isinstance(app.screen, KvCacheScreen) and chat.model_state == "ready"
        assert notified and "runner launch starts: --kv-bits" in notified[0]


@run_async
async def test_each_setting_shows_the_longest_context_that_fits(tmp_path):
    """Llama 3.1 8B in bf16 at 128k planned for a 24 GB GPU (its weights are not here: the load
    fails, the plans do not need them): only the 4-bit cache holds the whole context."""
    from runner.hardware import parse_machine

    app = RunnerApp(ModelChoice("meta-llama/Llama-3.1-8B-Instruct", quant="bf16", context=131072),
                    history_path=tmp_path / "h.db", machine=parse_machine("1xRTX4090"))
    async with app.run_test(size=SIZE) as pilot:
        chat = chat_screen(app)
        await wait_until(pilot, lambda: chat.model_state == "failed", 30, "the load to fail")
        none, kv8, kv4 = option_texts(await open_kv_screen(pilot))
    assert "17.2 GB for 131,072 tokens" in none and "9.13 GB" in kv8 and "4.83 GB" in kv4
    assert "offload" in none and "offload" in kv8 and "✔ fits" in kv4
    # measured: up to 58,319 tokens unquantized, 109,778 with kv8
    longest = [int(text.rpartition("up to ")[2].removesuffix(" tokens").replace(",", "")) for text in (none, kv8, kv4)]
    assert longest[0] < longest[1] < longest[2] == 131072

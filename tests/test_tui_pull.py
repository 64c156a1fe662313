"""Pulling a catalog model from the chat's picker: the plan first, the download under the
conversation (bytes, speed, time left) while the chat answers, Cancel, resume, and the model then
loaded through the chat's usual path. The real Textual app (Pilot) and the real huggingface_hub
client, against test_pull.py's Hub-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from runner.tui.app import RunnerApp
from runner.tui.loading import ModelChoice
from runner.tui.screens.picker import PickerScreen
from runner.tui.screens.pull import PullScreen
from runner.tui.screens.settings import ChatSettings
from runner.tui.widgets.conversation import AssistantMessage
from runner.tui.widgets.download_bar import DownloadBar, DownloadMeter
from runner.download import PullProgress
from test_pull import CATALOG, Repo, hub, small_repo, snapshot, tiny_repo  # noqa: F401  (fixtures)
from tui_helpers import SIZE, run_async, send, wait_loaded, wait_until

CATALOG_ID = "meta-llama/Llama-3.2-1B-Instruct"


@pytest.fixture
def hub_here(hub, monkeypatch):
    """test_pull's server for huggingface_hub in this process: its constants are read from the
    environment at import, so they are set here to what HF_ENDPOINT and HF_HOME would give."""
    from huggingface_hub import constants

    home = Path(os.environ["HF_HOME"])
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "no-tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 60)   # a held download waits for the test
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub


def tiny_app(tiny_llama_dir: Path, tmp_path: Path) -> RunnerApp:
    return RunnerApp(ModelChoice(str(tiny_llama_dir), quant="fp32"), history_path=tmp_path / "history.db",
                     settings=ChatSettings(max_tokens=8))


async def open_pull_screen(pilot, repo_id: str) -> PullScreen:
    """Ctrl+O, the catalog entry `repo_id`, Enter: the download's plan, once the Hub answered."""
    await pilot.press("ctrl+o")
    picker = pilot.app.screen
    assert isinstance(picker, PickerScreen)
    row = next(i for i, e in enumerate(picker.entries) if e.name == repo_id)
    assert picker.entries[row].where == "catalog"
    picker.query_one("#models").move_cursor(row=row)
    await pilot.press("enter")
    screen = pilot.app.screen
    assert isinstance(screen, PullScreen)
    await wait_until(pilot, lambda: "asking the Hub" not in body(screen), 60, "the Hub's answer")
    return screen


async def press_download(pilot) -> None:
    """Enter on the Download button, which has the focus once the plan says the model fits."""
    start = pilot.app.screen.query_one("#pull-start")
    await wait_until(pilot, lambda: pilot.app.focused is start, 10, "the focus on Download")
    await pilot.press("enter")


def body(screen: PullScreen) -> str:
    return str(screen.query_one("#pull-body").render())


def progress(bar: DownloadBar) -> str:
    return str(bar.query_one("#download-text").render())


def held(hub, bar: DownloadBar) -> bool:
    """The server holds the weights mid-file, and the bar shows their bytes so far."""
    return hub.reached.is_set() and progress(bar).endswith(" left · model.safetensors")


def picker_row(pilot, name: str):
    return next(e for e in pilot.app.screen.entries if e.name == name)


@pytest.mark.slow
@run_async
async def test_a_catalog_model_is_pulled_from_the_picker_while_the_chat_answers(hub_here, tiny_repo, tiny_llama_dir,
                                                                                  tmp_path):
    hub_here.repos[CATALOG_ID] = Repo(dict(tiny_repo))
    hub_here.hold_after["model.safetensors"] = 5_000_000     # the download stalls there until released
    app = tiny_app(tiny_llama_dir, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        chat = await wait_loaded(pilot)
        screen = await open_pull_screen(pilot, CATALOG_ID)
        shown = body(screen)
        assert f"{CATALOG_ID} · cuda" in shown and "fits" in shown
        assert re.search(r"\d+ files, [\d.]+ MB; [\d.]+ MB to download into .*models--meta-llama--Llama-3.2-1B", shown)
        start = screen.query_one("#pull-start")
        assert not start.disabled and str(start.label) == "Download"
        await press_download(pilot)
        await wait_until(pilot, lambda: app.screen is chat, 10, "the picker to close")

        bar = chat.query_one(DownloadBar)
        await wait_until(pilot, lambda: held(hub_here, bar), 60, "the progress line")
        assert re.fullmatch(r"↓ Llama-3\.2-1B-Instruct: [\d.]+ MB of [\d.]+ MB · [\d.]+ [KMG]B/s · .+ left · model\.safetensors",
                            progress(bar)), progress(bar)

        await wait_until(pilot, lambda: "waiting for the Hub… · " in progress(bar), 30, "the stall to show")
        assert re.fullmatch(r"↓ Llama-3\.2-1B-Instruct: waiting for the Hub… · [\d.]+ MB of [\d.]+ MB · model\.safetensors",
                            progress(bar)), progress(bar)
        await send(pilot, "hello")           # the chat answers while the download waits
        await wait_until(pilot, lambda: chat.reply is None and chat.query(AssistantMessage), 60, "the reply")
        assert chat.query(AssistantMessage).last().content
        assert bar.state == "downloading" and chat.loader.choice.model == str(tiny_llama_dir)

        hub_here.release.set()
        await wait_until(pilot, lambda: not chat.query(DownloadBar), 120, "the download to end")
        assert bar.state == "ready"
        await wait_until(pilot, lambda: chat.loader.choice.model == CATALOG_ID and chat.model_state != "loading",
                         120, "the pulled model to load")
        assert chat.model_state == "ready", str(chat.query_one("#load-error").render())
        assert "Llama-3.2-1B-Instruct" in str(chat.query_one("#status-model").render())

        await pilot.press("ctrl+o")          # now a model on disk, like any other
        entry = picker_row(pilot, CATALOG_ID)
        assert entry.where == "HF cache" and entry.path == snapshot(CATALOG_ID)
        await pilot.press("escape")
    assert not (snapshot(CATALOG_ID) / ".runner-pull-incomplete").exists()
    assert not [e for e in hub_here.log if e.get("file") in ("pytorch_model.bin", "README.md")]


@pytest.mark.slow
@run_async
async def test_a_pull_cancelled_in_the_app_keeps_its_bytes_and_resumes(hub_here, tiny_repo, tiny_llama_dir, tmp_path):
    hub_here.repos[CATALOG_ID] = Repo(dict(tiny_repo))
    hub_here.hold_after["model.safetensors"] = 5_000_000
    size = tiny_repo["model.safetensors"].stat().st_size
    app = RunnerApp(ModelChoice(), pick=True, history_path=tmp_path / "history.db")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.1)
        await pilot.press("escape")          # no model loaded: the download alone
        chat = app.chat
        screen = await open_pull_screen(pilot, CATALOG_ID)
        await press_download(pilot)
        bar = chat.query_one(DownloadBar)
        await wait_until(pilot, lambda: held(hub_here, bar), 60, "the progress line")

        await pilot.press("ctrl+o")           # the entry says it is downloading; Enter offers to stop it
        assert app.screen.query_one("#models").get_row_at(
            next(i for i, e in enumerate(app.screen.entries) if e.name == CATALOG_ID))[2] == "downloading"
        row = next(i for i, e in enumerate(app.screen.entries) if e.name == CATALOG_ID)
        app.screen.query_one("#models").move_cursor(row=row)
        await pilot.press("enter")
        await pilot.press("y")
        assert bar.cancel_requested.is_set()
        await pilot.press("escape")
        hub_here.release.set()               # the next bytes meet the cancel
        await wait_until(pilot, lambda: not chat.query(DownloadBar), 60, "the download to stop")
        assert bar.state == "cancelled" and chat.model_state == "none"
        blobs = snapshot(CATALOG_ID).parents[1] / "blobs"
        kept = sum(p.stat().st_size for p in blobs.glob("*.incomplete"))
        assert kept >= 5_000_000
        assert (snapshot(CATALOG_ID) / ".runner-pull-incomplete").exists()

        screen = await open_pull_screen(pilot, CATALOG_ID)   # again: only the rest is to download
        missing = screen.order.pull.missing_bytes
        assert missing == size - kept
        await press_download(pilot)
        await wait_until(pilot, lambda: chat.model_state == "ready", 120, "the pulled model to load")
    resumed = [e["range"] for e in hub_here.downloads("model.safetensors")]
    assert resumed[-1] == f"bytes={kept}-"
    assert (snapshot(CATALOG_ID) / "model.safetensors").read_bytes() == tiny_repo["model.safetensors"].read_bytes()


@run_async
async def test_the_pull_screen_refuses_what_does_not_fit_and_says_why_the_hub_said_no(hub_here, tmp_path):
    """405B's config.json: the plan's refusal, and only "Download anyway"; a gated repository: its
    one line, and no download button."""
    config = json.loads((CATALOG / "meta-llama--Llama-3.1-405B-Instruct.json").read_text())
    hub_here.repos["meta-llama/Llama-3.1-405B-Instruct"] = Repo(small_repo(tmp_path / "huge", config=config))
    hub_here.repos["meta-llama/Llama-3.1-70B-Instruct"] = Repo(small_repo(tmp_path / "gated"), gated=401)
    from runner.hardware import parse_machine

    app = RunnerApp(ModelChoice(), pick=True, history_path=tmp_path / "history.db", machine=parse_machine("1xRTX4090"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.1)
        await pilot.press("escape")
        screen = await open_pull_screen(pilot, "meta-llama/Llama-3.1-405B-Instruct")
        shown = body(screen)
        assert "fits only with CPU/disk offload" in shown and "Download anyway" in shown
        assert str(screen.query_one("#pull-start").label) == "Download anyway"
        await pilot.press("escape")
        await pilot.press("escape")
        # planned with the chat's backend and context, which the model would be loaded with
        app.chat.loader.choice = ModelChoice(backend="mlx", context=2048)
        screen = await open_pull_screen(pilot, "meta-llama/Llama-3.1-405B-Instruct")
        assert "meta-llama/Llama-3.1-405B-Instruct · mlx · q4 · 2048 tokens of context" in body(screen)
        assert "does not fit" in body(screen)
        await pilot.press("escape")
        await pilot.press("escape")
        screen = await open_pull_screen(pilot, "meta-llama/Llama-3.1-70B-Instruct")
        await wait_until(pilot, lambda: "✘" in body(screen), 30, "the refusal")
        assert "hf auth login" in body(screen) and "licence" in body(screen)
        assert screen.query_one("#pull-start").disabled
    assert not [e for e in hub_here.log if e["path"].startswith("/cdn/")]


def test_the_meter_counts_this_runs_bytes_and_the_time_left():
    now = [0.0]
    meter = DownloadMeter(30_000_000, clock=lambda: now[0])
    meter.update(PullProgress("a.safetensors", "downloading", 10_000_000, 40_000_000))   # resumed at 10 MB
    assert meter.line() == "0 bytes of 30 MB"
    now[0] = 2.0
    meter.update(PullProgress("a.safetensors", "downloading", 20_000_000, 40_000_000))
    assert meter.done == 10_000_000
    assert meter.line() == "10 MB of 30 MB · 5 MB/s · 4 s left"
    meter.update(PullProgress("b.safetensors", "checking", 1, 2))
    assert meter.stage == "checking b.safetensors 50%"

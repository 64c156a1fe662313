"""A download started from the picker, under the conversation while it runs: the bytes, the speed,
the time left, and a Cancel button. The chat stays usable meanwhile.

    bar = DownloadBar(order, on_ready)     # order: screens/pull.py's PullOrder
    await chat.mount(bar, before="#status")

`runner.download.fetch` runs in a thread worker of the bar, which writes the progress line; the
bar shows it ten times a second (a stalled download shows its last bytes), and the end comes back
as a message. Cancel makes the next progress report raise `PullCancelled` inside the download:
what arrived is kept, and the next pull of the model resumes it. When every file is verified,
`on_ready(repo_id)` is called (the chat loads the model through its usual path).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Button, Static

from runner.download import PullCancelled, PullProgress, human_size
from runner.errors import RunnerError
from runner.tui.text import short_model_name

SPEED_WINDOW = 5.0     # seconds of progress the speed is measured over
REFRESH = 0.1          # seconds between two updates of the line on screen
STALLED = 3.0          # seconds without a byte after which the line says the download waits


class DownloadMeter:
    """Bytes received in this run, the speed over the last seconds, the time left (the `total` bar
    of `runner pull`, in one line). Resumed bytes count as already there, not as speed."""

    def __init__(self, to_download: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.to_download = to_download
        self.clock = clock
        self.started: dict[str, int] = {}    # where each file's download began in this run
        self.received: dict[str, int] = {}
        self.samples: deque[tuple[float, int]] = deque()
        self.stage = ""                       # the file being checked or downloaded

    def update(self, event: PullProgress) -> None:
        if event.stage == "downloading":
            start = min(self.started.setdefault(event.file, event.done), event.done)
            self.started[event.file] = start
            self.received[event.file] = event.done - start
            now = self.clock()
            self.samples.append((now, self.done))
            while len(self.samples) > 2 and now - self.samples[1][0] > SPEED_WINDOW:
                self.samples.popleft()
            self.stage = event.file
        elif event.stage == "checking":
            self.stage = f"checking {event.file} {100 * event.done // max(event.total, 1)}%"

    @property
    def done(self) -> int:
        return sum(self.received.values())

    def speed(self) -> float:
        """Bytes per second over the last few seconds (0 until two reports)."""
        if len(self.samples) < 2:
            return 0.0
        (first, then), (last, now) = self.samples[0], self.samples[-1]
        return (now - then) / (last - first) if last > first else 0.0

    def line(self, stalled: bool = False) -> str:
        """'412 MB of 2.47 GB · 38.2 MB/s · 54 s left'; `stalled`: the bytes alone (no speed to tell)."""
        parts = [f"{human_size(self.done)} of {human_size(self.to_download)}"]
        speed = self.speed()
        if speed > 0 and not stalled:
            parts.append(f"{human_size(int(speed))}/s")
            parts.append(f"{duration((self.to_download - self.done) / speed)} left")
        return " · ".join(parts)


def duration(seconds: float) -> str:
    seconds = max(int(seconds + 0.5), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass
class PullEnded(Message):
    error: str          # "" when the model is ready
    cancelled: bool = False


class DownloadBar(Horizontal):
    DEFAULT_CSS = """
    DownloadBar { height: 1; padding: 0 1; background: $boost; }
    DownloadBar #download-text { width: 1fr; height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    DownloadBar Button { margin-left: 1; min-width: 8; }
    """

    def __init__(self, order, on_ready: Callable[[str], None]) -> None:
        super().__init__(id="download")
        self.order = order
        self.on_ready = on_ready
        self.cancel_requested = threading.Event()
        self.state = "downloading"     # "downloading", "ready", "failed" or "cancelled"
        self.line = ""                  # written by the worker thread, shown by a timer
        self.stalled_line = ""          # the same without speed and time left, once no byte comes
        self.reported_at = time.monotonic()

    @property
    def repo_id(self) -> str:
        return self.order.pull.repo_id

    def compose(self) -> ComposeResult:
        yield Static(Text(f"↓ {short_model_name(self.repo_id)}: starting…"), id="download-text")
        yield Button("Cancel", id="download-cancel", variant="warning", compact=True)

    def on_mount(self) -> None:
        self.set_interval(REFRESH, self._show_progress)
        self.run_worker(self._fetch, thread=True, exclusive=True, group="pull")

    def _show_progress(self) -> None:
        if self.state != "downloading" or not self.line or self.cancel_requested.is_set():
            return
        text = Text(f"↓ {short_model_name(self.repo_id)}: ")
        if time.monotonic() - self.reported_at > STALLED:
            text.append("waiting for the Hub… · ", "yellow")
            text.append(self.stalled_line)
        else:
            text.append(self.line)
        self.query_one("#download-text", Static).update(text)

    def _fetch(self) -> None:
        from runner import download

        pull = self.order.pull
        meter = DownloadMeter(pull.missing_bytes)

        def report(event: PullProgress) -> None:
            if self.cancel_requested.is_set():
                raise PullCancelled(f"the download of {pull.repo_id} was stopped")
            meter.update(event)
            self.line = f"{meter.line()} · {meter.stage}"    # the file last: the first to go on a narrow screen
            self.stalled_line = f"{meter.line(stalled=True)} · {meter.stage}"
            self.reported_at = time.monotonic()

        try:
            download.fetch(pull, report)
        except PullCancelled:
            self.post_message(PullEnded("", cancelled=True))
        except RunnerError as error:
            self.post_message(PullEnded(str(error)))
        except Exception as error:   # a bug or an unforeseen failure: say it, the chat stays up
            self.post_message(PullEnded(f"{type(error).__name__}: {error}"))
        else:
            self.post_message(PullEnded(""))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.cancel()

    def cancel(self) -> None:
        """Stop at the next bytes that arrive (what arrived is kept)."""
        self.cancel_requested.set()
        self.query_one("#download-text", Static).update(Text(f"{self.repo_id}: stopping…", "dim"))

    def on_pull_ended(self, message: PullEnded) -> None:
        pull = self.order.pull
        if message.cancelled:
            self.state = "cancelled"
            self.notify(f"Stopped downloading {pull.repo_id}; what arrived is kept: pick it again (Ctrl+O) to resume.",
                        title="Download stopped")
        elif message.error:
            self.state = "failed"
            self.notify(message.error, title=f"Download of {pull.repo_id} failed", severity="error", timeout=30)
        else:
            self.state = "ready"
            self.notify(f"{pull.repo_id} is ready ({human_size(pull.total_bytes)} in {pull.snapshot}).",
                        title="Download complete")
        if self.state == "ready":
            self.on_ready(pull.repo_id)
        self.remove()

    def on_unmount(self) -> None:
        self.cancel_requested.set()    # the app is closing: the worker stops at its next report

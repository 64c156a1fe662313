"""ModelLoader: loads the chosen model in a thread worker and holds what came of it.

    spec -> plan -> (import the default model) -> the app's source loads -> Session

The worker posts `PlanReady`, `LoadProgressed`, then `ModelLoaded` or `LoadFailed` to the chat
screen, each with the load's number: a message of a load given up for another is ignored (and
its session closed). The screen's handlers call `accept_*` here, then update the widgets.
"""

from __future__ import annotations

import threading

from textual.screen import Screen
from textual.worker import get_current_worker

from runner.backend import Session
from runner.budget import Plan
from runner.errors import RunnerError
from runner.tui import messages as msg
from runner.tui.loading import ModelChoice, weights_spec

CLOSE_WAIT = 10.0    # seconds to wait for a stopping reply's last token before closing its session


class ModelLoader:
    def __init__(self, host: Screen) -> None:
        self.host = host                     # where the worker's messages go
        self.choice: ModelChoice | None = None
        self.plan: Plan | None = None
        self.session: Session | None = None
        self.state = "none"                  # "none", "loading", "ready" or "failed"
        self.load_id = 0                     # counts loads; only the latest one's messages count
        self.generation_lock = threading.Lock()   # one stream at a time on a Session

    def start(self, choice: ModelChoice) -> None:
        """Load `choice`; the session loaded before (if any) is closed by the worker."""
        self.choice, self.plan, self.state = choice, None, "loading"
        self.load_id += 1
        old, self.session = self.session, None
        load_id, app = self.load_id, self.host.app
        self.host.run_worker(lambda: self._load(load_id, choice, old, app), thread=True, exclusive=True,
                             group="load")

    def _load(self, load_id: int, choice: ModelChoice, old: Session | None, app) -> None:
        worker = get_current_worker()
        if old is not None:
            with self.generation_lock:   # let a stopping reply finish its last token first
                old.close()

        def progress(update) -> None:
            if not worker.is_cancelled:
                self.host.post_message(msg.LoadProgressed(load_id, update))

        try:
            spec, plan = app.source.plan(choice, app.machine())
            self.host.post_message(msg.PlanReady(load_id, plan))
            spec = weights_spec(spec, plan, progress)
            session = app.source.load(choice, spec, plan, progress)
        except RunnerError as error:
            self.host.post_message(msg.LoadFailed(load_id, str(error)))
            return
        except Exception as error:  # a bug or an unforeseen failure: show it, stay usable
            self.host.post_message(msg.LoadFailed(load_id, f"{type(error).__name__}: {error}"))
            return
        if worker.is_cancelled:  # another model was picked meanwhile
            session.close()
            return
        try:
            report = session.memory()
        except Exception:  # measuring is a nicety; never lose the session over it
            report = None
        self.host.post_message(msg.ModelLoaded(load_id, session, report))

    # ---- the worker's messages, as the screen receives them: True if they are for this load ----
    def accept_plan(self, message: msg.PlanReady) -> bool:
        if message.load_id != self.load_id:
            return False
        self.plan = message.plan
        return True

    def accept_progress(self, message: msg.LoadProgressed) -> bool:
        return message.load_id == self.load_id and self.state == "loading"

    def accept_loaded(self, message: msg.ModelLoaded) -> bool:
        if message.load_id != self.load_id:  # another model was picked while this one loaded
            message.session.close()
            return False
        self.session, self.state = message.session, "ready"
        return True

    def accept_failure(self, message: msg.LoadFailed) -> bool:
        if message.load_id != self.load_id:
            return False
        self.state = "failed"
        return True

    def close(self) -> None:
        """Free the session once a stopping reply has made its last token (bounded wait)."""
        if self.session is not None and self.generation_lock.acquire(timeout=CLOSE_WAIT):
            try:
                self.session.close()
                self.session = None
            finally:
                self.generation_lock.release()

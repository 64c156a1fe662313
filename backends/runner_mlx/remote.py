"""The chat app over several hosts: `runner launch` with no -p, in a terminal.

mlx.launch pipes the ranks' output, so the chat app runs here, in the launcher process, which has
the terminal; rank 0 runs on this machine and serves it over a socket on 127.0.0.1
(`runner_mlx.link`). The ranks still talk to each other through mx.distributed alone.

    LaunchSource   the app's ModelSource: plans the split over the hosts, starts the ranks
    RemoteSession  runner's Session protocol over the link: tokenize, stream, cancel, memory, close
    Ranks          mlx.launch and its ranks, watched: their messages, how they ended, stopping them

A rank that dies, freezes or loses the network ends the run (the ranks' watchdogs, mlx.launch's
report): the session then raises one clear error within a bounded time and nothing is left running.
"""

from __future__ import annotations

import collections
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

from runner.backend import GenerationChunk, LoadProgress, MemoryReport, Message, Sampling
from runner.errors import GenerationError, LoadError, UserInputError

from runner_mlx.launcher import (
    LaunchPlan, RankReport, check_holdings, convert_here, kill_group, mlx_launch_argv, plan_launch,
)
from runner_mlx.link import JsonLink, LinkClosed
from runner_mlx.split import LaunchHost

POLL = 0.2              # seconds between checks on the ranks while waiting for rank 0
CONNECT_SECONDS = 5     # ssh's answer to the pre-flight check, as the one-shot waits
CONNECT_LIMIT = 120.0   # rank 0 connects before it imports mlx: this is only python starting
CLOSE_LIMIT = 10.0      # after "close", how long the ranks get to finish by themselves


class Ranks:
    """mlx.launch and its ranks in a process group of their own, watched from two threads."""

    def __init__(self, argv: list[str], hosts: Sequence[LaunchHost], grace: float):
        self.grace = grace
        self.said: collections.deque[str] = collections.deque(maxlen=40)   # their last stderr lines
        self.report = RankReport(list(hosts), verbose=False, echo=self.said.append)
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
        self._threads = [threading.Thread(target=self.report.read, args=(self.process.stderr,), daemon=True),
                         threading.Thread(target=self._drain, args=(self.process.stdout,), daemon=True)]
        for thread in self._threads:
            thread.start()

    def _drain(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            self.said.append(raw.decode(errors="replace").rstrip("\n"))

    def failed(self) -> bool:
        return self.process.poll() is not None or self.report.first_failure is not None

    def failure(self) -> str:
        """Why the run ended, in one line (plus what the ranks said); everything is stopped first."""
        try:
            self.process.wait(timeout=self.grace)      # mlx.launch stops the other ranks itself
        except subprocess.TimeoutExpired:
            pass
        self.stop()
        _, line = self.report.verdict()
        errors = [said.removeprefix("runner: error: ") for said in self.said if said.startswith("runner: error: ")]
        if line is None:
            line = "the ranks stopped unexpectedly; every rank was stopped"
        return line + "".join(f"\n  {error}" for error in errors[:3])

    def finish(self, limit: float) -> None:
        """Wait up to `limit` seconds for the ranks to end by themselves, then stop what is left."""
        try:
            self.process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            pass
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            kill_group(self.process, signal.SIGTERM)     # the ranks' watchdogs say why they stop
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.process, signal.SIGKILL)         # whatever is left of the ranks on this machine
        self.process.wait()
        for thread in self._threads:
            thread.join(timeout=2)


class RemoteSession:
    """A model loaded by the ranks of `runner launch`, answering through rank 0."""

    backend = "mlx"
    warnings: tuple[str, ...] = ()   # each rank checks its own host before it loads

    def __init__(self, plan: LaunchPlan, ranks: Ranks, link: JsonLink, ready: dict):
        self.model = plan.spec
        self.quant = plan.quant
        self.plan = plan
        self.device_summary = ready["summary"]     # "pipeline split over 2 hosts on Metal GPU, 8-bit, group 64"
        names = [share.host for share in plan.shares]
        self._memory = MemoryReport(measured=dict(zip(names, ready["memory"])),
                                    planned={share.host: share.weights_bytes for share in plan.shares},
                                    peak=dict(zip(names, ready["peak"])))
        self._ranks = ranks
        self._link = link
        self._lock = threading.Lock()     # one exchange with rank 0 at a time
        self._replies = 0
        self._broken: str | None = None   # why the ranks are gone, once they are

    @property
    def broken(self) -> str | None:
        """Why the ranks are gone, once they are: this session cannot answer again."""
        return self._broken

    # ---- the protocol ----------------------------------------------------------------------
    def tokenize(self, messages: Sequence[Message]) -> list[int]:
        return self._tokens({"tokenize": True, "messages": [asdict(m) for m in messages]})

    def encode(self, text: str) -> list[int]:
        return self._tokens({"encode": text})

    def _tokens(self, request: dict) -> list[int]:
        """Rank 0's token ids for a request ("tokenize" a chat, "encode" plain text)."""
        with self._lock:
            self._send(request)
            while True:
                message = self._receive()
                if message is None:
                    continue
                if "error" in message:
                    raise UserInputError(message["error"])
                if "tokens" in message:
                    return message["tokens"]

    def stream(self, messages: Sequence[Message], sampling: Sampling,
               cancel: threading.Event | None = None) -> Iterator[GenerationChunk]:
        return self.stream_tokens(self.tokenize(messages), sampling, cancel)

    def stream_tokens(self, prompt: Sequence[int], sampling: Sampling,
                      cancel: threading.Event | None = None) -> Iterator[GenerationChunk]:
        with self._lock:
            self._replies += 1
            reply = self._replies
            self._send({"generate": reply, "tokens": list(prompt), "sampling": asdict(sampling)})
            finished = cancel_sent = False
            try:
                while not finished:
                    if cancel is not None and cancel.is_set() and not cancel_sent:
                        self._send({"cancel": reply})
                        cancel_sent = True
                    message = self._receive()
                    if message is None:
                        continue
                    if "error" in message:
                        finished = True
                        raise UserInputError(message["error"])
                    if message.get("chunk") == reply:
                        fields = {k: v for k, v in message.items() if k != "chunk"}
                        chunk = GenerationChunk(**fields)
                        finished = chunk.finish_reason is not None
                        yield chunk
            finally:
                if not finished and self._broken is None:   # the caller left early: stop the ranks' reply
                    self._send({"cancel": reply})
                    while True:
                        message = self._receive()
                        if message is not None and message.get("chunk") == reply and message.get("finish_reason"):
                            break

    def logits(self, token_ids: Sequence[int]):
        raise UserInputError("logits() is not available over runner launch (the ranks stream replies only); "
                             "compare logits on one host with runner parity")

    def memory(self) -> MemoryReport:
        return self._memory

    def close(self) -> None:
        """Ask the ranks to finish, wait for them, and stop anything that is left."""
        if self._ranks is None:
            return
        if self._broken is None:
            try:
                self._link.send({"close": True})
            except LinkClosed:
                pass
        self._ranks.finish(CLOSE_LIMIT)
        self._link.close()
        self._ranks = None

    # ---- the link --------------------------------------------------------------------------
    def _send(self, message: dict) -> None:
        if self._broken is not None:
            raise GenerationError(self._broken)
        try:
            self._link.send(message)
        except LinkClosed:
            raise self._lost() from None

    def _receive(self) -> dict | None:
        """The next message from rank 0, or None after POLL seconds; GenerationError when the ranks are gone."""
        if self._broken is not None:
            raise GenerationError(self._broken)
        try:
            message = self._link.receive(POLL)
        except (LinkClosed, ValueError):
            raise self._lost() from None
        if message is None and self._ranks.failed():
            raise self._lost()
        return message

    def _lost(self) -> GenerationError:
        self._broken = f"the model's ranks stopped: {self._ranks.failure()}"
        return GenerationError(self._broken)


def start_ranks(plan: LaunchPlan, rank_timeout: float, grace: float,
                on_progress: Callable[[LoadProgress], None] | None) -> RemoteSession:
    """Start the ranks with rank 0 serving this process, and wait until the model is loaded."""
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            tempfile.TemporaryDirectory(prefix="runner-launch-") as scratch:
        listener.settimeout(POLL)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        argv = mlx_launch_argv(plan, Path(scratch), rank_timeout, False, ["--serve", address])
        ranks = Ranks(argv, plan.hosts, grace)
        try:
            link = accept(listener, ranks)
            return RemoteSession(plan, ranks, link, wait_ready(link, ranks, on_progress))
        except BaseException:
            ranks.stop()
            raise


def accept(listener: socket.socket, ranks: Ranks) -> JsonLink:
    deadline = time.monotonic() + CONNECT_LIMIT
    while True:
        try:
            connection, _ = listener.accept()
            return JsonLink(connection)
        except TimeoutError:
            pass
        if ranks.failed():
            raise LoadError(f"the ranks did not start: {ranks.failure()}")
        if time.monotonic() > deadline:
            raise LoadError(f"rank 0 did not answer within {CONNECT_LIMIT:.0f} s; every rank was stopped")


def wait_ready(link: JsonLink, ranks: Ranks, on_progress) -> dict:
    """Relay rank 0's load progress until it says the model is loaded on every rank."""
    while True:
        try:
            message = link.receive(POLL)
        except (LinkClosed, ValueError):
            raise LoadError(f"the model did not load: {ranks.failure()}") from None
        if message is None:
            if ranks.failed():
                raise LoadError(f"the model did not load: {ranks.failure()}")
            continue
        if "ready" in message:
            return message["ready"]
        if "progress" in message and on_progress is not None:
            on_progress(LoadProgress(**message["progress"]))


class LaunchSource:
    """The chat app's ModelSource for `runner launch`: each model is split over the same hosts and
    loaded by ranks that mlx.launch starts; picking another model starts new ranks. The first host
    must be this machine (see `request_hosts(..., rank0_here=True)`)."""

    def __init__(self, hosts: Sequence[LaunchHost], split: str, context: int, rank_timeout: float = 120.0,
                 grace: float = 5.0, kv_bits: int | None = None):
        self.hosts = list(hosts)
        self.split = split
        self.context = context
        self.kv_bits = kv_bits                 # every model it starts keeps its KV cache so quantized
        self.rank_timeout = rank_timeout
        self.grace = grace
        self.sessions: list[RemoteSession] = []

    def launch_plan(self, choice) -> LaunchPlan:
        from runner_mlx.launcher import launch_spec
        from runner_mlx.split import default_launch_quant

        spec = launch_spec(choice.model)      # a share (runner launch --pull) too
        quant = choice.quant or default_launch_quant(spec)
        return plan_launch(spec, quant, choice.context or self.context, self.hosts, self.split, self.kv_bits)

    def plan(self, choice, machine):
        plan = self.launch_plan(choice).as_plan()
        return plan.model, plan

    def load(self, choice, spec, plan, on_progress) -> RemoteSession:
        if spec.path is None:
            raise UserInputError(f"{spec.name}: no local folder with weights; runner launch needs the model "
                                 "folder at the same path on every host")
        launch_plan = plan_launch(spec, plan.quant, plan.context, self.hosts, plan.parallel, self.kv_bits)
        check_holdings(launch_plan, CONNECT_SECONDS)   # as the one-shot does: the model (or its share) and python
        convert_here(launch_plan, on_progress)
        session = start_ranks(launch_plan, self.rank_timeout, self.grace, on_progress)
        self.sessions.append(session)
        return session

    def close(self) -> None:
        """Stop every rank this source started (the app closes its session; this is the safety net)."""
        for session in self.sessions:
            session.close()


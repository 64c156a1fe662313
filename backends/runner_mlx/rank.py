"""One rank of a multi-host run: `python -m runner_mlx.rank ...`, started on every host by
`mlx.launch` (see `runner_mlx.launcher`; users type `runner launch`).

Every rank:
 1. joins the ring (`mx.distributed.init(backend="ring")`),
 2. checks that every host holds the same model (a hash of config.json and the weights index),
 3. loads its share: mlx-lm's `sharded_load` (tensor split) or runner's pipeline stage,
 4. follows rank 0: rank 0 owns the user interface and broadcasts each request (prompt token ids,
    sampling, seed) with `mx.distributed.all_sum`; every rank then runs the same
    `mlx_lm.stream_generate` steps, and only rank 0 prints (one-shot) or streams the reply to
    runner launch's chat app over a socket on its machine (`--serve`, see `runner_mlx.link`).
    After each token rank 0 also broadcasts whether to stop (Esc in the app): all ranks stop at the
    same step and wait for the next request; while idle, rank 0 sends a heartbeat 10 times a second.
    Each rank's session keeps the KV cache of its own layers between requests; as every rank sees the
    same prompts, samples the same tokens and stops at the same step, the caches stay in step and a
    next turn prefills only its new tokens on every rank.
A watchdog thread ends the rank with a clear message when the others stop answering (a host died,
the network dropped, a peer froze), or when the launcher is gone: no rank waits forever. It also
exchanges a heartbeat with every other rank (a UDP datagram every half second, on each rank's ring
address): a host that goes silent is noticed within seconds, while loading or in the middle of a
step, which the per-step limit (--rank-timeout) could only notice after minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from runner.backend import LoadProgress, Message, Sampling, checked_prompt
from runner.errors import RunnerError, UserInputError
from runner.words import counted

EXIT_WATCHDOG = 3     # no progress within the time limit
EXIT_STOPPED = 4      # stopped by the launcher (another rank failed) or the launcher is gone
EXIT_LOST_PEER = 5    # the ring lost a peer: a consequence of another rank's failure
EXIT_SILENT_PEER = 6  # no heartbeat from another rank: that rank is the cause (runner_mlx.launcher reads which)

BEAT_EVERY = 0.5      # seconds between heartbeats
SILENT_AFTER = 5.0    # seconds without a peer's heartbeat before it counts as gone


# ---- the watchdog ----------------------------------------------------------------------------


class Watchdog:
    """Ends this process when the current phase makes no progress within its time limit, or when
    another rank's heartbeat stops.

    mlx releases the GIL while it waits on the network or computes, so this thread runs even when
    the main thread is stuck in `mx.eval` on a peer that will never answer."""

    def __init__(self, name: str, launcher_pid: int | None = None):
        self.name = name
        self.launcher_pid = launcher_pid
        self.phase = "starting"
        self.limit: float | None = None
        self.last_beat = time.monotonic()
        self.heartbeat: Heartbeat | None = None
        self.parent = os.getppid()
        self._lock = threading.Lock()
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._signals = read_fd
        signal.set_wakeup_fd(write_fd)        # SIGTERM is seen here even while mlx blocks
        signal.signal(signal.SIGTERM, lambda *_: None)
        threading.Thread(target=self._watch, name="runner-watchdog", daemon=True).start()

    def enter(self, phase: str, limit: float | None) -> None:
        with self._lock:
            self.phase, self.limit, self.last_beat = phase, limit, time.monotonic()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def joined(self) -> None:
        """The ring is up: every peer was alive just now, heard yet or not."""
        heartbeat = self.heartbeat
        if heartbeat is not None:
            heartbeat.joined = time.monotonic()

    def listen(self, heartbeat: "Heartbeat | None") -> None:
        """Exchange heartbeats with the other ranks from now on (None: stop, the run is ending)."""
        with self._lock:
            self.heartbeat = heartbeat

    def _stop(self, message: str, code: int) -> None:
        try:
            print(f"runner: error: {self.name}: {message}", file=sys.stderr, flush=True)
        except OSError:      # nobody reads stderr any more (the launcher and its ssh are gone): exit all the same
            pass
        os._exit(code)

    def _watch(self) -> None:
        import select

        while True:
            heartbeat = self.heartbeat
            waiting = [self._signals] + ([heartbeat.socket] if heartbeat is not None else [])
            ready, _, _ = select.select(waiting, [], [], BEAT_EVERY)   # also how often the rest is checked
            if self._signals in ready:
                os.read(self._signals, 64)
                self._stop(f"stopped while {self.phase}: another rank failed or the run was interrupted",
                           EXIT_STOPPED)
            if os.getppid() != self.parent or not alive(self.launcher_pid):
                self._stop(f"the launcher is gone; stopping (was {self.phase})", EXIT_STOPPED)
            with self._lock:
                phase, limit, quiet = self.phase, self.limit, time.monotonic() - self.last_beat
                if heartbeat is not None and heartbeat is not self.heartbeat:
                    heartbeat.close()            # closed here: this thread may be selecting on it
                    heartbeat = None
            silent = heartbeat.exchange() if heartbeat is not None else None
            if silent is not None:
                rank, host, seconds = silent
                self._stop(f"no heartbeat from rank {rank} ({host}) for {seconds:.0f} s while {phase}: that host "
                           "died, froze or lost the network; stopping this rank", EXIT_SILENT_PEER)
            if limit is not None and quiet > limit:
                self._stop(
                    f"no progress for {quiet:.0f} s while {phase}: another host died, froze or lost the "
                    f"network (limit --rank-timeout {limit:g} s); stopping this rank", EXIT_WATCHDOG)


class Heartbeat:
    """A datagram to every other rank every BEAT_EVERY seconds, over UDP at each rank's ring address
    (the ring itself uses TCP there). A rank silent for SILENT_AFTER seconds since it was last heard,
    or since the ring came up (which proves every rank alive), is dead, frozen or cut off: a
    collective waiting on it would wait until TCP gives up, many minutes later. Before the ring is
    up, a rank never heard (still starting) is left to the step limit."""

    def __init__(self, rank: int, addresses: list[tuple[str, int]], hosts: list[str]):
        self.rank = rank
        self.peers = {r: address for r, address in enumerate(addresses) if r != rank}
        self.hosts = hosts
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(addresses[rank])
        self.socket.setblocking(False)
        self.heard: dict[int, float | None] = dict.fromkeys(self.peers)
        self.joined: float | None = None    # when the ring came up: every peer was alive then
        self.sent = 0.0

    @classmethod
    def from_ring(cls, rank: int, hosts: list[str]) -> "Heartbeat | None":
        """From mlx.launch's ring hostfile (MLX_HOSTFILE: each rank's "ip:port" list); None without one."""
        try:
            ring = json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())
            addresses = [(ip, int(port)) for ip, _, port in (node[0].rpartition(":") for node in ring)]
            return cls(rank, addresses, hosts) if len(addresses) > 1 else None
        except (KeyError, OSError, ValueError, IndexError, TypeError):
            return None          # no ring file, or the port is taken: the step limit still applies

    def exchange(self) -> tuple[int, str, float] | None:
        """Read what came, send when due; (rank, host, seconds) of a peer silent too long, else None."""
        now = time.monotonic()
        while True:
            try:
                data, _ = self.socket.recvfrom(64)
            except OSError:      # nothing more (or a refused port: a peer not listening yet)
                break
            kind, _, rank = data.decode(errors="replace").partition(" ")
            if kind == "runner-beat" and rank.isdigit() and int(rank) in self.heard:
                self.heard[int(rank)] = now
        if now - self.sent >= BEAT_EVERY:
            self.sent = now
            for address in self.peers.values():
                try:
                    self.socket.sendto(f"runner-beat {self.rank}".encode(), address)
                except OSError:  # no route (our own link is down): the silence says it
                    pass
        heard = [(last or self.joined, rank) for rank, last in self.heard.items() if (last or self.joined)]
        if heard and now - min(heard)[0] > SILENT_AFTER:
            last, rank = min(heard)
            return rank, host_name(self.hosts, rank), now - last
        return None

    def close(self) -> None:
        self.socket.close()


def alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def launcher_pid(launcher: str) -> int | None:
    """The pid of runner launch when it runs on this host ("HOST:PID"), else None."""
    import socket

    host, _, pid = launcher.rpartition(":")
    return int(pid) if host and host == socket.gethostname() and pid.isdigit() else None


# ---- talking to the other ranks -------------------------------------------------------------


def broadcast_ints(values: list[int] | None, length: int, group) -> list[int]:
    """Rank 0's `values` on every rank (the others pass None); `length` must agree."""
    import mlx.core as mx

    mine = mx.array(values if values is not None else [0] * length, dtype=mx.int32)
    return mx.distributed.all_sum(mine, group=group, stream=mx.cpu).tolist()


# what rank 0 broadcasts before each step of the conversation
CLOSE, GENERATE, IDLE = 0, 1, 2     # no more requests / a reply to generate / "still here" (a heartbeat)
# While the chat is idle, rank 0 broadcasts IDLE this often and the others sleep as long in between:
# a rank waiting inside a collective spins a CPU core, so nobody waits there long.
IDLE_TICK = 0.1


def broadcast_request(group, request: tuple | None):
    """Rank 0 sends (kind, prompt, sampling); the others pass None. Every rank returns it."""
    header = None
    if group.rank() == 0:
        kind, prompt, sampling = request
        if kind == GENERATE:
            seed = sampling.seed if sampling.seed is not None else random.randrange(2**31)
            header = [kind, len(prompt), sampling.max_tokens, seed,
                      int(round(sampling.temperature * 1e6)), int(round(sampling.top_p * 1e6))]
        else:
            header = [kind, 0, 0, 0, 0, 0]
    kind, length, max_tokens, seed, temperature, top_p = broadcast_ints(header, 6, group)
    if kind != GENERATE:
        return kind, None, None
    tokens = broadcast_ints(list(request[1]) if request is not None else None, length, group)
    return kind, tokens, Sampling(temperature=temperature / 1e6, top_p=top_p / 1e6, max_tokens=max_tokens,
                                  seed=seed)


def agree_to_stop(group, stop: bool) -> bool:
    """After each token: does rank 0 want the reply stopped? Every rank gets the same answer at the
    same step, so all stop together. It runs on mlx-lm's generation stream, behind the step that
    stream_generate already queued, so the ring never carries two collectives at once."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    flag = mx.distributed.all_sum(mx.array([1 if stop else 0], dtype=mx.int32), group=group,
                                  stream=generation_stream)
    return bool(flag.item())


def check_same_model(group, fingerprint: str, hosts: list[str]) -> None:
    """Every rank holds the same model, or every rank stops with the same clear error."""
    import mlx.core as mx

    mine = mx.array([int(fingerprint[i:i + 6], 16) for i in range(0, 48, 6)], dtype=mx.int32)
    everyone = mx.distributed.all_gather(mine[None], group=group, stream=mx.cpu).tolist()
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            raise UserInputError(
                f"rank {rank} ({host_name(hosts, rank)}) has a different model than rank 0 "
                f"({host_name(hosts, 0)}): config.json or the weight files differ; copy the same model "
                "folder to every host")


def host_name(hosts: list[str], rank: int) -> str:
    return hosts[rank] if rank < len(hosts) else f"host {rank}"


# ---- where rank 0's requests come from ------------------------------------------------------


class CommandLineRequest:
    """One-shot: the request given with --request-json; the reply goes to stdout."""

    def __init__(self, request_json: str, session, show_tokens: bool, size: int):
        self.requests = []
        if request_json:
            request = json.loads(request_json)
            messages = [Message(m["role"], m["content"]) for m in request["messages"]]
            prompt = checked_prompt(session.tokenize(messages), session.context, session.model.max_context)
            self.requests.append((GENERATE, prompt, Sampling(**request["sampling"])))
        self.show_tokens = show_tokens
        self.size = size
        self.tokens: list[int] = []

    def next_request(self, wait: float) -> tuple:
        self.tokens = []
        return self.requests.pop(0) if self.requests else (CLOSE, None, None)

    def stop_wanted(self) -> bool:
        return False

    def send_chunk(self, chunk) -> None:
        if chunk.token is not None:
            self.tokens.append(chunk.token)
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.finish_reason is None:
            return
        print(file=sys.stdout, flush=True)
        if self.show_tokens:
            print(f"runner: tokens: {' '.join(map(str, self.tokens))}", file=sys.stderr, flush=True)
        print(f"runner: {counted(chunk.generation_tokens, 'token')}, "
              f"{chunk.generation_tps:.1f} tokens/s over "
              f"{self.size} hosts ({chunk.finish_reason}); prompt {chunk.prompt_tokens} tokens at "
              f"{chunk.prompt_tps:.1f} tokens/s", file=sys.stderr, flush=True)


def checked_ids(ids, vocab_size: int) -> list[int]:
    """A prompt's token ids as the front end sent them, each a token of this model's vocabulary."""
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                                            for t in ids):
        raise UserInputError(f"the prompt must be token ids from 0 to {vocab_size - 1}")
    return ids


class ChatServer:
    """Rank 0 serving runner launch's chat app over the link (`runner_mlx.link`).

    A thread reads the link: a cancel is noted at once (the generation loop asks `stop_wanted()`
    after each token); everything else is queued for `next_request`. A lost link counts as "close",
    and stops a reply being generated: the ranks then finish together."""

    def __init__(self, link):
        import queue

        self.link = link
        self.session = None
        self.inbox: queue.Queue = queue.Queue()
        self.reply_id = None
        self.cancelled: set = set()
        self.closed = False
        threading.Thread(target=self._read, name="runner-chat-link", daemon=True).start()

    def _read(self) -> None:
        from runner_mlx.link import LinkClosed

        try:
            while True:
                message = self.link.receive(None)
                if "cancel" in message:
                    self.cancelled.add(message["cancel"])
                else:
                    self.inbox.put(message)
        except (LinkClosed, ValueError):
            self.closed = True
            self.inbox.put({"close": True})

    def send(self, message: dict) -> None:
        from runner_mlx.link import LinkClosed

        try:
            self.link.send(message)
        except LinkClosed:
            self.closed = True

    def next_request(self, wait: float) -> tuple:
        """The next reply to generate, CLOSE, or IDLE when nothing came within `wait` seconds."""
        import queue

        deadline = time.monotonic() + wait
        while True:
            try:
                message = self.inbox.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return IDLE, None, None
            if message.get("close"):
                return CLOSE, None, None
            try:
                if "encode" in message:
                    self.send({"tokens": self.session.encode(str(message["encode"]))})
                    continue
                if "tokenize" in message:
                    messages = [Message(m["role"], m["content"]) for m in message["messages"]]
                    self.send({"tokens": self.session.tokenize(messages)})
                    continue
                prompt = checked_ids(message["tokens"], self.session.model.vocab_size)
                checked_prompt(prompt, self.session.context, self.session.model.max_context)   # before every rank starts
                sampling = Sampling(**message["sampling"])
            except RunnerError as error:
                self.send({"error": str(error)})
                continue
            self.reply_id = message["generate"]
            return GENERATE, prompt, sampling

    def stop_wanted(self) -> bool:
        return self.closed or self.reply_id in self.cancelled

    def send_chunk(self, chunk) -> None:
        from dataclasses import asdict

        self.send({"chunk": self.reply_id, **asdict(chunk)})


# ---- loading this rank's share --------------------------------------------------------------


def load_share(folder: Path, split: str, layers: tuple[int, int], group, on_progress):
    """(model, tokenizer) of this rank's share."""
    import contextlib
    import io

    import mlx.core as mx

    if split == "tensor":
        from mlx_lm.utils import sharded_load

        with contextlib.redirect_stdout(io.StringIO()):
            model, tokenizer = sharded_load(str(folder), tensor_group=group,
                                            tokenizer_config={"trust_remote_code": False})
        return model, tokenizer

    from runner_mlx.pipeline import PipelineStage
    from runner_mlx.session import load_model_folder

    model, tokenizer = load_model_folder(folder, on_progress, layers=layers)   # a share's conversion holds no more
    stage = PipelineStage(model, group, *layers)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))  # everyone loaded
    return stage, tokenizer


# ---- the rank's main -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runner_mlx.rank")
    parser.add_argument("--model", required=True, help="model folder (the same path on every host)")
    parser.add_argument("--quant", default="q4")
    parser.add_argument("--split", choices=("pipeline", "tensor"), required=True)
    parser.add_argument("--layers", default="", help="pipeline: start:stop per rank, comma separated")
    parser.add_argument("--share-bytes", default="", help="planned bytes per rank, comma separated")
    parser.add_argument("--hosts", default="", help="host names by rank, for messages")
    parser.add_argument("--request-json", default="", help="rank 0's request: {messages, sampling}")
    parser.add_argument("--rank-timeout", type=float, default=120.0)
    parser.add_argument("--load-timeout", type=float, default=1800.0)
    parser.add_argument("--launcher", default="", help="HOST:PID of runner launch; ranks on HOST stop when it is gone")
    parser.add_argument("--show-tokens", action="store_true", help="rank 0 prints the generated token ids")
    parser.add_argument("--kv-bits", type=int, choices=(8, 4), default=None, help="the KV cache quantized to these bits")
    parser.add_argument("--context", type=int, required=True, help="prompt + reply tokens each rank holds, as planned")
    parser.add_argument("--serve", default="",
                        help="HOST:PORT of runner launch's chat app: rank 0 takes its requests from there")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hosts = [h for h in args.hosts.split(",") if h]
    rank_env = int(os.environ.get("MLX_RANK", "0"))
    watchdog = Watchdog(f"rank {rank_env} ({host_name(hosts, rank_env)})", launcher_pid(args.launcher))
    try:
        return run_rank(args, hosts, watchdog)
    except (RunnerError, RuntimeError) as error:
        if "[ring]" in str(error):     # mlx's ring backend lost a peer
            print(f"runner: error: {watchdog.name}: lost the connection to another host while "
                  f"{watchdog.phase} (it died or the network dropped)", file=sys.stderr, flush=True)
            return EXIT_LOST_PEER
        if not isinstance(error, RunnerError):
            raise
        print(f"runner: error: {watchdog.name}: {error}", file=sys.stderr, flush=True)
        return error.exit_code


def run_rank(args, hosts: list[str], watchdog: Watchdog) -> int:
    from runner_mlx.convert import launch_fingerprint
    from runner_mlx.link import JsonLink
    from runner_mlx.session import check_wired_limit

    is_root = int(os.environ.get("MLX_RANK", "0")) == 0
    chat = None
    if args.serve and is_root:
        chat = ChatServer(JsonLink.connect(args.serve))   # first, so the app sees every stage
    progress = progress_reporter(watchdog, chat, is_root)
    group = join_ring(hosts, watchdog, progress, args.rank_timeout)
    spec, layers, folder = prepare_model(args, hosts, group, watchdog, progress)
    watchdog.enter("comparing the model with the other hosts", args.load_timeout)
    progress(LoadProgress("comparing the model with the other hosts", 0, 0))
    check_same_model(group, launch_fingerprint(Path(spec.path)), hosts)
    if args.share_bytes:   # on a Mac: warn when this host's share will not sit in wired memory
        check_wired_limit(int(args.share_bytes.split(",")[group.rank()]))
    session, share = share_session(args, spec, layers, folder, group, watchdog, progress)
    memory = report_memory(group, hosts, share)

    if chat is not None:
        chat.session = session
        chat.send(ready_message(args, group.size(), memory))
        requests = chat
    else:
        requests = CommandLineRequest(args.request_json, session, args.show_tokens, group.size()) if is_root else None
    follow_rank_0(group, session, requests, watchdog, args.rank_timeout, is_root)
    finish(group, watchdog, args.rank_timeout)
    return 0


def progress_reporter(watchdog: Watchdog, chat: ChatServer | None, is_root: bool) -> Callable[[LoadProgress], None]:
    """What each load stage does: it counts as progress for the watchdog, and rank 0 shows it (to
    the chat app, or a line per stage on stderr)."""

    def progress(event: LoadProgress) -> None:
        watchdog.beat()
        if chat is not None:
            chat.send({"progress": {"stage": event.stage, "done": event.done, "total": event.total,
                                    "unit": event.unit}})
        elif is_root and (not event.total or event.done == event.total):   # a line per stage: stderr is a pipe
            count = f" {event.done}/{event.total} {event.unit}" if event.total else ""
            print(f"runner: {event.stage}{count}", file=sys.stderr, flush=True)

    return progress


def join_ring(hosts: list[str], watchdog: Watchdog, progress, rank_timeout: float):
    """The group of every rank, once mlx's ring is up, with heartbeats exchanged from the start."""
    import mlx.core as mx

    progress(LoadProgress("joining the other hosts", 0, 0))
    watchdog.enter("joining the ring", rank_timeout)
    watchdog.listen(Heartbeat.from_ring(int(os.environ.get("MLX_RANK", "0")), hosts))
    group = mx.distributed.init(backend="ring", strict=True)
    watchdog.joined()
    return group


def prepare_model(args, hosts: list[str], group, watchdog: Watchdog, progress) -> tuple:
    """(the model's spec, this rank's layers, the mlx folder holding them), converted here if need be."""
    from runner.model import load_spec
    from runner_mlx.convert import mlx_folder

    watchdog.enter("preparing the model", None)          # a conversion takes as long as it takes
    spec = load_spec(args.model)
    layers = rank_layers(args, spec.num_layers, group.rank(), group.size())
    # a host holding only its share converts that share; one holding too little says so here
    folder = mlx_folder(Path(spec.path), args.quant, progress, layers, holder=host_name(hosts, group.rank()))
    return spec, layers, folder


def rank_layers(args, num_layers: int, rank: int, size: int) -> tuple[int, int]:
    """The layers this rank holds: its --layers range in a pipeline split, all of them (in part) in a tensor split."""
    if args.split != "pipeline":
        return 0, num_layers
    ranges = [tuple(int(x) for x in part.split(":")) for part in args.layers.split(",")]
    if len(ranges) != size:
        raise UserInputError(f"--layers gives {len(ranges)} ranges for {size} ranks")
    return ranges[rank]


def share_session(args, spec, layers: tuple[int, int], folder: Path, group, watchdog: Watchdog, progress) -> tuple:
    """(the session over this rank's share of the model, that share in words)."""
    from runner_mlx.session import MlxSession, describe_quant, where_it_runs

    size = group.size()
    watchdog.enter("loading this host's share of the model", args.load_timeout)
    model, tokenizer = load_share(folder, args.split, layers, group, progress)
    share = (f"layers {layers[0]}-{layers[1] - 1}" if args.split == "pipeline"
             else f"1/{size} of every layer")
    summary = f"mlx {args.split} split over {size} hosts on {where_it_runs()}, {describe_quant(args.quant)}, {share}"
    if args.kv_bits is not None:
        summary += f", KV cache {args.kv_bits}-bit"
    session = MlxSession(model, tokenizer, spec, args.quant, folder, summary, args.context, kv_bits=args.kv_bits)
    return session, share


def report_memory(group, hosts: list[str], share: str) -> list[list[int]]:
    """This rank's memory in use on stderr; every rank's [active, peak] memory in KiB."""
    import mlx.core as mx

    rank = group.rank()
    active = mx.get_active_memory()
    print(f"runner: rank {rank} ({host_name(hosts, rank)}): {share}, {active / 2**30:.2f} GB in use",
          file=sys.stderr, flush=True)
    # every rank's memory, in KiB (int32 holds 2 TiB), for the chat app's plan panel
    return mx.distributed.all_gather(mx.array([[active // 1024, mx.get_peak_memory() // 1024]], dtype=mx.int32),
                                     group=group, stream=mx.cpu).tolist()


def ready_message(args, size: int, memory: list[list[int]]) -> dict:
    """What the chat app learns once every rank is loaded: the run in words, each rank's memory in bytes."""
    from runner_mlx.session import describe_quant, where_it_runs

    return {"ready": {"summary": f"{args.split} split over {size} hosts on {where_it_runs()}, "
                                 f"{describe_quant(args.quant)}"
                                 + (f", KV cache {args.kv_bits}-bit" if args.kv_bits is not None else ""),
                      "memory": [a * 1024 for a, _ in memory], "peak": [p * 1024 for _, p in memory]}}


def follow_rank_0(group, session, requests, watchdog: Watchdog, rank_timeout: float, is_root: bool) -> None:
    """Every request rank 0 broadcasts, generated by every rank in step, until rank 0 closes;
    rank 0 (`requests`: where its requests come from) sends the reply on and says when to stop."""
    while True:
        watchdog.enter("waiting for rank 0's request", rank_timeout)
        kind, prompt, sampling = broadcast_request(group, requests.next_request(IDLE_TICK) if is_root else None)
        if kind == CLOSE:
            return
        if kind == IDLE:
            if not is_root:   # rank 0 waits as long for a request: both reach the next broadcast together
                time.sleep(IDLE_TICK)
            continue
        watchdog.enter("generating", rank_timeout)
        cancel = threading.Event()
        for chunk in session.stream_tokens(prompt, sampling, cancel):
            watchdog.beat()
            if is_root:
                requests.send_chunk(chunk)
            if chunk.finish_reason is None and agree_to_stop(group, is_root and requests.stop_wanted()):
                cancel.set()


def finish(group, watchdog: Watchdog, rank_timeout: float) -> None:
    """A last collective, so that no rank leaves the ring while another still needs it."""
    import mlx.core as mx

    watchdog.enter("finishing", rank_timeout)
    watchdog.listen(None)       # the others may end first from here on
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


if __name__ == "__main__":
    sys.exit(main())

"""`runner serve [MODEL]`: an OpenAI-compatible HTTP API over one model (runner.server).

The plan line and the load's progress go to stderr as with `runner generate`; the server listens
at once and answers 503 while the model loads in the background, then one request at a time from
a bounded queue. It binds 127.0.0.1 unless told otherwise, and any other address needs an API key
(--api-key or RUNNER_API_KEY). The HTTP stack (starlette, uvicorn) is imported here only.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Callable

from runner.commands.options import add_model_arguments, choose, load_options
from runner.errors import UserInputError
from runner.server.addresses import is_loopback
from runner.words import counted

if TYPE_CHECKING:
    from runner.backend import LoadProgress, Session

MIN_KEY_LENGTH = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_server_arguments(parser)


def add_server_arguments(parser: argparse.ArgumentParser, host_flag: str = "--host") -> None:
    """Where and how to serve; `runner launch --serve` names the address --listen (beside its --hosts)."""
    parser.add_argument(host_flag, dest="listen", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; any other needs --api-key)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0: any free port)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer <key>' on every request; 8 or more ASCII letters, digits or "
                             "punctuation (default: $RUNNER_API_KEY, "
                             "better: a command line is visible to other users of the machine)")
    parser.add_argument("--queue", type=int, default=16, metavar="N",
                        help="requests that may wait while one is answered; more get 429 (default 16)")


def run(args: argparse.Namespace) -> int:
    from runner.choice import choice_line, open_session

    check_server_arguments(args)
    choice = choose(args)
    print(f"runner: {choice_line(choice)}", file=sys.stderr)
    aliases = {choice.spec.name.rsplit("/", 1)[-1]} | ({args.model} if args.model else set())
    return serve(args, model=choice.spec.name, aliases=aliases, context=choice.context,
                 open_model=lambda report: open_session(choice, load_options(args), report))


def check_server_arguments(args: argparse.Namespace) -> None:
    """Before anything loads: the address, the key, the queue, and the HTTP stack installed."""
    args.api_key = api_key(args.api_key)
    check_address(args.listen, args.port, args.api_key)
    if args.queue < 1:
        raise UserInputError(f"--queue must be at least 1, not {args.queue}")
    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserInputError(f"runner serve needs the HTTP stack ({' and '.join(missing)} missing): "
                             "pip install 'runner[serve]'")


def serve(args: argparse.Namespace, *, model: str, aliases: set[str], context: int,
          open_model: Callable[[Callable[[LoadProgress], None]], Session]) -> int:
    """Listen at once, load the model in the background (503 until it is ready), answer until
    Ctrl+C; a model that fails to load stops the server and is raised as its one line."""
    import asyncio

    import uvicorn

    from runner.commands.generate import ProgressLine
    from runner.server.app import build_app
    from runner.server.worker import ModelHost

    listener = listen(args.listen, args.port)
    url = address_url(listener)
    progress = ProgressLine()
    started = time.perf_counter()

    def ready(session) -> None:
        progress.finish()
        log(f"loaded in {time.perf_counter() - started:.1f} s: {session.device_summary}")
        for warning in session.warnings:
            log(f"warning: {warning}")
        log(f"ready: {model} at {url}/v1")

    def failed(error: Exception) -> None:
        progress.finish()
        server.should_exit = True   # the error is raised once the server has stopped

    host = ModelHost(open_model, context=context, queue_size=args.queue, log=log, on_progress=progress,
                     on_ready=ready, on_failed=failed)
    stopping = asyncio.Event()
    app = build_app(host, model=model, aliases=aliases, api_key=args.api_key, loopback=is_loopback(args.listen),
                    stopping=stopping, log=log)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            """Ctrl+C, or the model failed: the replies under way and the request bodies still arriving
            end now, not when uvicorn's grace period runs out (then it cancels them: tracebacks)."""
            host.stop()
            stopping.set()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=3)
    server = Server(config)
    log(f"serving on {url} (the model loads in the background: requests get 503 until it is ready)"
        + ("; every request needs the API key" if args.api_key else ""))
    host.start()
    try:
        server.run(sockets=[listener])
    finally:
        host.close()
        listener.close()
    if host.failure is not None:
        raise host.failure
    return 0


def log(line: str) -> None:
    print(f"runner: {line}", file=sys.stderr, flush=True)


def api_key(given: str | None) -> str | None:
    """--api-key, else $RUNNER_API_KEY, else None. A key is at least 8 visible ASCII characters: hard
    to guess, and sent as it is in an HTTP header by every client (no spaces, no control or non-ASCII
    characters). The key itself is never printed."""
    name = "--api-key"
    if given is None:
        given, name = os.environ.get("RUNNER_API_KEY"), "RUNNER_API_KEY"
        if given is None:
            return None
    if len(given) < MIN_KEY_LENGTH:
        length = "empty" if not given else f"only {counted(len(given), 'character')} long"
        raise UserInputError(f"{name} is {length}: a key needs at least {MIN_KEY_LENGTH} characters (a random one: "
                             "openssl rand -hex 16)")
    for place, char in enumerate(given, 1):
        if not "!" <= char <= "~":
            raise UserInputError(f"{name} holds {ascii(char)} at character {place}: a key is ASCII letters, digits "
                                 "and punctuation, without spaces")
    return given


def check_address(host: str, port: int, api_key: str | None) -> None:
    """127.0.0.1 by default; anything reachable from another machine needs a key."""
    if not 0 <= port <= 65535:
        raise UserInputError(f"--port must be between 0 and 65535, not {port}")
    if api_key is None and not is_loopback(host):
        raise UserInputError(f"--host {host} lets other machines reach the model: pass --api-key KEY (or set "
                             "RUNNER_API_KEY), or leave --host at 127.0.0.1")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port or a wrong address is one clear line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, proto)
    except OSError as error:
        raise UserInputError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as error:
        listener.close()
        raise UserInputError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listener


def address_url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

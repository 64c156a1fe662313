"""The `runner` command: argument parsing and dispatch, nothing else.

Each sub-command lives in `runner/commands/<name>.py` with two functions:
`add_arguments(parser)` and `run(args) -> int`. Those modules import only light things at the
top; torch and mlx are imported inside the backends, when a model is loaded.

`runner [MODEL] [--backend …]` with no sub-command opens the chat (`runner chat`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from runner import __version__
from runner.commands.options import Parser
from runner.errors import RunnerError

# name -> (module, one-line help). Order is the order of `runner --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("runner.commands.chat", "chat with a model in the terminal (the default command)"),
    "generate": ("runner.commands.generate", "generate one reply and print it as it streams"),
    "plan": ("runner.commands.plan", "will this model fit this machine, and how? (no download, no weights)"),
    "rehearse": ("runner.commands.rehearse", "load the real architecture with random weights: real memory, real speed"),
    "parity": ("runner.commands.parity", "do two backends or quantizations give the same answers?"),
    "serve": ("runner.commands.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "pull": ("runner.commands.pull", "plan, then download a model from the Hugging Face Hub (resumable, verified)"),
    "list": ("runner.commands.list_models", "the models on this machine: size on disk, the plan's verdict, runner's caches"),
    "ls": ("runner.commands.list_models", "the same as runner list"),
    "rm": ("runner.commands.rm", "remove a downloaded model or runner's caches of it (asks first)"),
}
DEFAULT_COMMAND = "chat"
# Errors of the machine's file system, not of runner: one line naming the path, exit code 1.
FILE_SYSTEM_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)


def all_commands() -> dict[str, tuple[str, str]]:
    """The core's commands, then those each installed backend registers (`commands` on its class,
    e.g. mlx's `launch`); a backend that is not installed adds none."""
    from runner.backend import backend_class, backend_names

    commands = dict(COMMANDS)
    for name in backend_names():
        try:
            commands.update(getattr(backend_class(name), "commands", {}))
        except RunnerError:
            continue
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="runner",
        description="Run language models that are too big for the machine in front of you: "
        "plan before you download, load the way that fits, chat.",
    )
    parser.add_argument("--version", action="version", version=f"runner {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in all_commands().items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:  # command not written yet
                continue
            raise
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def mistyped_command(word: str, commands) -> str | None:
    """The command `word` looks like a typo of (`runner genrate`), unless a folder or file is
    called that: `runner WORD` opens the chat on model WORD."""
    import difflib

    close = difflib.get_close_matches(word, commands, n=1, cutoff=0.75)
    return close[0] if close and not os.path.exists(word) else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in all_commands() and argv[0] not in ("-h", "--help", "--version")):
        if argv and (command := mistyped_command(argv[0], all_commands())):
            print(f"runner: error: unknown command '{argv[0]}' (did you mean runner {command}?)", file=sys.stderr)
            return 2
        argv.insert(0, DEFAULT_COMMAND)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)   # inside: a value's own check (e.g. --context 8k) is one line too
        if not hasattr(args, "run"):
            parser.print_help()
            return 2
        return int(args.run(args) or 0)
    except RunnerError as error:   # one line, whatever a library put in the message
        print(f"runner: error: {' '.join(str(error).split())}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("runner: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # `runner plan ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:   # a full disk under the output (`> file`) or the caches, an unwritable RUNNER_HOME
        if error.errno not in FILE_SYSTEM_REFUSALS:
            raise
        print(f"runner: error: {error.strerror}" + (f": {error.filename}" if error.filename else ""), file=sys.stderr)
        try:
            sys.stdout.flush()
        except OSError:   # what stdout still holds cannot be written either: not again at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

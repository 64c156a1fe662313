"""`runner chat [MODEL]`: the chat app in the terminal (also what `runner` alone runs)."""

from __future__ import annotations

import argparse
import sys

from runner.budget import QUANTS
from runner.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=None,
        help="a model id (Hugging Face cache or catalog) or a folder; default: the built-in SmolLM2-135M-Instruct",
    )
    parser.add_argument("--backend", choices=["cuda", "mlx"], default=None, help="default: what the plan recommends")
    parser.add_argument("--quant", choices=QUANTS, default=None, help="default: what the plan recommends")
    parser.add_argument("--context", type=int, default=None, metavar="N",
                        help="tokens of prompt + reply to plan for (default: 4096, or less if the model holds less)")
    parser.add_argument("--allow-offload", action="store_true",
                        help="load even if part of the model must sit in CPU RAM or on disk (slow)")
    parser.add_argument("--pick", action="store_true", help="start with the model picker")


def run(args: argparse.Namespace) -> int:
    if args.context is not None and args.context < 16:
        raise UserInputError(f"--context {args.context} is too small to chat (at least 16 tokens)")
    if args.pick and args.model:
        raise UserInputError("give a model or --pick, not both")
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserInputError(
            "runner chat needs a terminal (stdin and stdout are not one); "
            "for scripts use `runner generate MODEL -p PROMPT`"
        )
    from runner.tui.app import RunnerApp  # Textual is imported only when the chat really opens
    from runner.tui.loading import ModelChoice

    choice = ModelChoice(args.model, args.backend, args.quant, args.context, args.allow_offload)
    RunnerApp(choice, pick=args.pick).run()
    return 0

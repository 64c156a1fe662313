"""`runner chat [MODEL]`: the chat app in the terminal (also what `runner` alone runs)."""

from __future__ import annotations

import argparse
import sys

from runner.commands.options import add_model_arguments, refuse_a_share
from runner.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--pick", action="store_true", help="start with the model picker")


def run(args: argparse.Namespace) -> int:
    if args.context is not None and args.context < 16:
        raise UserInputError(f"--context {args.context} is too small to chat (at least 16 tokens)")
    if args.pick and args.model:
        raise UserInputError("give a model or --pick, not both")
    refuse_a_share(args.model)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserInputError(
            "runner chat needs a terminal (stdin and stdout are not one); "
            "for scripts use `runner generate MODEL -p PROMPT`"
        )
    from runner.tui.app import RunnerApp  # Textual is imported only when the chat really opens
    from runner.tui.loading import ModelChoice

    if args.trust_remote_code:
        raise UserInputError("the chat does not run a repository's own code; use `runner generate --trust-remote-code`")
    choice = ModelChoice(args.model, args.backend, args.quant, args.context, args.allow_offload,
                         kv_bits=args.kv_bits, fast_decode=args.fast_decode, kernel=args.kernel)
    RunnerApp(choice, pick=args.pick).run()
    return 0

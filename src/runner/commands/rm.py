"""`runner rm MODEL`: remove a model runner keeps (an HF cache download, the built-in model's
import) and the caches it derived from it (MLX conversions, NF4 reload caches), after asking.

    runner rm meta-llama/Llama-3.1-8B-Instruct
    runner rm HuggingFaceTB/SmolLM2-135M-Instruct --caches     # only its MLX / NF4 caches
    runner rm ~/.cache/runner/models/mlx/SmolLM2-135M-Instruct-q4 --yes

A folder of your own (`model_dirs`, a path you typed) is never removed, only runner's caches of it.
"""

from __future__ import annotations

import argparse
import sys

from runner.download import human_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model id or folder as `runner list` shows it, or a cache folder")
    parser.add_argument("--caches", action="store_true", help="remove only runner's caches derived from MODEL; keep the model")
    parser.add_argument("-y", "--yes", action="store_true", help="remove without asking")


def run(args: argparse.Namespace) -> int:
    from runner.store import remove, removals

    plan = removals(args.model, caches_only=args.caches)
    total = sum(r.size_bytes for r in plan)
    for removal in plan:
        print(f"  {human_size(removal.size_bytes):>9}  {removal.what}  {removal.path}")
    if not args.yes and not _confirmed(f"Remove {'this' if len(plan) == 1 else f'these {len(plan)}'} "
                                       f"({human_size(total)})? [y/N] "):
        print("nothing removed", file=sys.stderr)
        return 1
    freed = remove(plan)
    print(f"removed {len(plan)} folder{'s' if len(plan) > 1 else ''}: {human_size(freed)} freed")
    return 0


def _confirmed(question: str) -> bool:
    try:
        answer = input(question)
    except EOFError:   # no terminal to ask on: the answer is no (use --yes)
        print(file=sys.stderr)
        return False
    return answer.strip().lower() in ("y", "yes")

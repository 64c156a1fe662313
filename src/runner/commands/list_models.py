"""`runner list` (or `runner ls`): the models runner can load here, their size on disk, the plan's
verdict for this machine, and the caches runner derived from each.

    runner list
    runner list --json
"""

from __future__ import annotations

import argparse
import json
import sys

from runner.download import human_size
from runner.words import counted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the list as JSON, for scripts")


def run(args: argparse.Namespace) -> int:
    from runner.hardware import detect_machine
    from runner.store import local_models

    models, orphans, problems = local_models()
    machine = detect_machine()
    rows = [(model, _verdict(model, machine)) for model in models]
    if args.json:
        print(json.dumps({"models": [_as_json(model, verdict) for model, verdict in rows],
                          "caches_without_model": [_cache_json(c) for c in orphans]}, indent=2))
    else:
        _print_table(rows, orphans)
    for problem in problems:
        print(f"runner: note: {problem}", file=sys.stderr)
    return 0


def _verdict(model, machine) -> str:
    """The plan's verdict and choice for this machine, in words."""
    from runner.choice import resolve
    from runner.errors import RunnerError
    from runner.model import load_spec

    if model.state == "partial":
        return f"partial: runner pull {model.name} resumes it"
    if model.state == "share":
        start, stop = model.layers
        return f"share (layers {start}-{stop - 1}): runner launch starts from it; runner pull {model.name} fetches the rest"
    try:
        choice = resolve(load_spec(model.name), machine)
    except RunnerError as error:
        return f"cannot plan: {error}"
    return f"{choice.plan.verdict.replace('-', ' ')} · {choice.backend} {choice.quant}"


def _print_table(rows, orphans) -> None:
    lines = []
    for model, verdict in rows:
        size = human_size(model.size_bytes) if model.state != "not imported" else "-"
        where = model.where + (" (imported on first use)" if model.state == "not imported" else "")
        lines.append((model.name, where, size, verdict))
        for cache in model.caches:
            lines.append((f"  └ {cache.label}", "runner", human_size(cache.size_bytes), ""))
    header = ("MODEL", "WHERE", "SIZE", "PLAN ON THIS MACHINE")
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(3)]
    for line in [header, *lines]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[3])
    total = sum(m.size_bytes for m, _ in rows) + sum(c.size_bytes for m, _ in rows for c in m.caches)
    total += sum(c.size_bytes for c in orphans)
    if orphans:
        print("runner's caches of models that are gone (runner rm FOLDER removes one):")
        for cache in orphans:
            print(f"  {human_size(cache.size_bytes):>9}  {cache.label} of {cache.source}  {cache.path}")
    print(f"{counted(len(rows), 'model')}, {human_size(total)} on disk; "
          "runner rm MODEL removes one (--caches: only runner's caches of it)")


def _cache_json(cache) -> dict:
    return {"path": str(cache.path), "kind": cache.kind, "quant": cache.quant,
            "source": str(cache.source) if cache.source else None, "size_bytes": cache.size_bytes}


def _as_json(model, verdict: str) -> dict:
    return {"name": model.name, "where": model.where, "state": model.state,
            "path": str(model.path) if model.path else None, "size_bytes": model.size_bytes,
            "here": verdict, "caches": [_cache_json(c) for c in model.caches]}

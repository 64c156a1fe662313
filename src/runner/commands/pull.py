"""`runner pull MODEL`: plan first, then download from the Hugging Face Hub only what runner loads.

    runner pull HuggingFaceTB/SmolLM2-360M-Instruct
    runner pull meta-llama/Llama-3.1-8B-Instruct --quant nf4 --context 8k
    runner pull meta-llama/Llama-3.1-70B-Instruct --force      # even though the plan says it does not fit
    runner pull meta-llama/Llama-3.1-405B-Instruct --layers 0:63   # one host's share of a pipeline split

The plan for this machine comes first (from the repository's config.json, read into memory), then
the free disk is checked against the sizes of the Hub's listing; only then is a byte written. A
cut pull resumes where it stopped; the model is offered to `runner chat` once every file is verified.
"""

from __future__ import annotations

import argparse
import sys

from runner.commands.options import add_model_arguments
from runner.download import human_size
from runner.errors import UserInputError
from runner.model import PARTIAL_PULL_MARKER
from runner.words import counted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, load=False, backend_help="plan the download for this backend (default: the plan's choice)",
                        quant_help="plan the download for this scheme (default: the plan's recommendation)",
                        model_help="a Hugging Face model id, e.g. HuggingFaceTB/SmolLM2-360M-Instruct")
    parser.add_argument("--revision", default=None, metavar="REV", help="a branch, tag or commit of the repository (default: main)")
    parser.add_argument("--force", action="store_true", help="download even when the plan says the model does not fit this machine")
    parser.add_argument("--layers", type=layer_range, default=None, metavar="START:STOP",
                        help="only the safetensors shards holding layers START..STOP-1 (and the embeddings and head): "
                             "this host's share of a pipeline split (runner launch --pull plans it)")


def layer_range(text: str) -> tuple[int, int]:
    start, _, stop = text.partition(":")
    try:
        layers = (int(start), int(stop))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not START:STOP (e.g. 0:40)") from None
    if not 0 <= layers[0] < layers[1]:
        raise argparse.ArgumentTypeError(f"'{text}': START must be at least 0 and below STOP")
    return layers


def run(args: argparse.Namespace) -> int:
    from runner import download

    repo_id = download.check_repo_id(args.model)
    pull = download.prepare(repo_id, args.revision, args.layers)
    err = sys.stderr
    if args.layers is not None:
        print(share_line(pull), file=err)     # a share of a split: the whole model's plan here does not apply
    else:
        plan_here(args, pull)
    download.check_disk(pull)
    print(f"{len(pull.files)} files, {human_size(pull.total_bytes)}; {human_size(pull.missing_bytes)} to download into "
          f"{pull.snapshot} ({human_size(pull.free_bytes)} free)", file=err)
    bars = Bars(pull.missing_bytes)
    try:
        with bars:
            folder = download.fetch(pull, bars.update)
    except KeyboardInterrupt:
        print(f"runner: interrupted; what arrived is kept: runner pull {pull.repo_id} resumes", file=err)
        return 130
    size = sum((folder / f.name).stat().st_size for f in pull.files)
    if (folder / PARTIAL_PULL_MARKER).exists():     # a --layers pull, other layers' files not here
        print(f"ready: {pull.repo_id} layers {args.layers[0]}-{args.layers[1] - 1}, {human_size(size)} on disk in "
              f"{folder}; this host's share only (runner chat does not offer it alone)")
        return 0
    print(f"ready: {pull.repo_id}, {human_size(size)} on disk in {folder}; next: {_next_command(args, pull.repo_id)}")
    return 0


def plan_here(args: argparse.Namespace, pull) -> None:
    """The plan for this machine on stderr; DoesNotFit unless --force."""
    from runner import download
    from runner.choice import choice_line
    from runner.errors import DoesNotFit
    from runner.hardware import detect_machine

    planned = download.plan_pull(pull, detect_machine(), args.backend, args.quant, args.context, args.kv_bits)
    print(choice_line(planned.choice), file=sys.stderr)
    print(f"  {planned.choice.reason}", file=sys.stderr)
    if planned.refusal is not None:
        if not args.force:
            raise DoesNotFit(f"{planned.refusal}; `runner pull {pull.repo_id} --force` downloads it anyway")
        print(f"  ! {planned.refusal}; downloading anyway (--force)", file=sys.stderr)


def share_line(pull) -> str:
    """What a --layers pull fetches, checked against the model's layers."""
    from runner.model import spec_from_config

    layers = spec_from_config(pull.config, pull.repo_id, "hub").num_layers
    start, stop = pull.layers
    if stop > layers:
        raise UserInputError(f"--layers {start}:{stop}: {pull.repo_id} has {counted(layers, 'layer')} (0 to {layers - 1})")
    shards = len([f for f in pull.files if f.name.endswith(".safetensors")])
    return (f"{pull.repo_id} · layers {start}-{stop - 1} of {layers}: {shards} of {shards + len(pull.left_out)} "
            f"safetensors files (the embeddings and the head too; the other layers' files stay on the Hub)")


def _next_command(args: argparse.Namespace, repo_id: str) -> str:
    words = ["runner", "chat", repo_id]
    for flag, value in (("--backend", args.backend), ("--quant", args.quant), ("--context", args.context),
                        ("--kv-bits", args.kv_bits)):
        if value is not None:
            words += [flag, str(value)]
    return " ".join(words)


class Bars:
    """A bar per file and one in total on stderr (bytes, speed, time left), with rich."""

    def __init__(self, to_download: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
        )

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description:<26}"), BarColumn(bar_width=16), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=self.console)
        # nothing to download (a pull of a model already here): the files are only checked
        self.total = self.progress.add_task("total", total=to_download) if to_download else None
        self.tasks: dict[str, int] = {}
        self.started: dict[str, int] = {}    # where each file's download began (resumed bytes)
        self.received: dict[str, int] = {}   # bytes each file received in this run

    def __enter__(self) -> "Bars":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, event) -> None:
        name = event.file if len(event.file) <= 15 else "…" + event.file[-14:]
        if event.stage == "verified":
            task = self.tasks.pop(event.file, None)
            if task is not None:
                self.progress.remove_task(task)
            self.progress.console.print(f"✔ {event.file} ({human_size(event.total)}, verified)")
            return
        label = f"{'checking' if event.stage == 'checking' else '↓'} {name}"
        task = self.tasks.get(event.file)
        if task is None:
            task = self.tasks[event.file] = self.progress.add_task(label, total=event.total)
        self.progress.update(task, description=label, completed=event.done, total=event.total)
        if event.stage == "downloading" and self.total is not None:
            start = min(self.started.setdefault(event.file, event.done), event.done)
            self.started[event.file] = start
            self.received[event.file] = event.done - start
            self.progress.update(self.total, completed=sum(self.received.values()))

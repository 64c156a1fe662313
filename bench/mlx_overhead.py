"""What runner's MLX session costs over raw mlx-lm: the same model, the same settings, one run.

    .venv/bin/python bench/mlx_overhead.py [MODEL] [--quant bf16] [--tokens 128] [--rounds 5]

Loads MODEL (default: the default model, SmolLM2-135M-Instruct, imported if needed) once through
runner's MLX backend, then alternates, round after round on the same loaded model and tokenizer:
- raw:    `mlx_lm.stream_generate(model, tokenizer, prompt_ids, max_tokens=N)`, greedy
- runner: `session.stream(messages, Sampling(max_tokens=N))` (template, sampler, chunks, cancel check)
End-of-sequence ids are switched off for both so each run makes exactly N tokens. Both are warmed
up first. Decode speed is measured by this script, from the consumer's side, for both the same way:
(tokens - 1) / (time of the last token - time of the first token). Reports the median of each, the
ratio of the medians, and the median of the per-round ratios (the two runs of a round are back to
back, so that ratio is the least disturbed by other load on the machine). 1.00 = no cost; above 1
is noise in runner's favour. A tiny model is the hard case: its steps are short, so any per-token
Python work in runner shows most there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "backends")]

PROMPT = "Write a long story about a dragon who learns to bake bread."


def decode_rate(stream) -> tuple[float, list[int]]:
    """tokens/s between the first and the last token of `stream`, and the tokens."""
    tokens, first, last = [], 0.0, 0.0
    for item in stream:
        now = time.perf_counter()
        if item.token is None:
            continue
        if not tokens:
            first = now
        last = now
        tokens.append(item.token)
    return (len(tokens) - 1) / (last - first), tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--quant", default="bf16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm.generate import stream_generate

    from runner.backend import LoadRequest, Message, Sampling, get_backend
    from runner.default_model import import_default_model
    from runner.model import load_spec

    if args.model is None:
        import_default_model()
    spec = load_spec(args.model)
    print(f"loading {spec.name} ({args.quant}) through runner's mlx backend...", flush=True)
    session = get_backend("mlx").load(LoadRequest(spec, quant=args.quant, context=2048))
    model, tokenizer = session._model, session._tokenizer
    tokenizer.eos_token_ids = set()          # exactly --tokens tokens in every run, for both
    messages = [Message("user", PROMPT)]
    prompt_ids = session.tokenize(messages)
    sampling = Sampling(max_tokens=args.tokens)

    def raw():
        return decode_rate(stream_generate(model, tokenizer, prompt_ids, max_tokens=args.tokens))

    def runner():
        return decode_rate(session.stream(messages, sampling))

    print("warming up both...", flush=True)
    raw(), runner()
    rates = {"raw": [], "runner": []}
    for round_number in range(1, args.rounds + 1):
        for name, run in (("raw", raw), ("runner", runner)) if round_number % 2 else (("runner", runner), ("raw", raw)):
            rate, tokens = run()
            rates[name].append(rate)
            assert len(tokens) == args.tokens, (name, len(tokens))
            print(f"  round {round_number}/{args.rounds} {name:6s} {rate:7.2f} tokens/s", flush=True)
    same = raw()[1] == runner()[1]
    raw_median, runner_median = statistics.median(rates["raw"]), statistics.median(rates["runner"])
    # each round runs the two back to back, so a round's ratio is the least disturbed by other load
    pair_ratios = sorted(r / w for r, w in zip(rates["runner"], rates["raw"]))
    print()
    print(f"{spec.name} · mlx {args.quant} · {'Metal' if mx.metal.is_available() else 'CPU'} · "
          f"{args.tokens} tokens, greedy, {args.rounds} rounds each, interleaved, median")
    print(f"  raw mlx_lm.stream_generate   {raw_median:7.2f} tokens/s  ({min(rates['raw']):.2f}-{max(rates['raw']):.2f})")
    print(f"  runner MlxSession.stream     {runner_median:7.2f} tokens/s  "
          f"({min(rates['runner']):.2f}-{max(rates['runner']):.2f})")
    print(f"  ratio of the medians         {runner_median / raw_median:7.3f}   same tokens: {same}")
    print(f"  ratio per round, median      {statistics.median(pair_ratios):7.3f}   "
          f"({pair_ratios[0]:.3f}-{pair_ratios[-1]:.3f})")
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

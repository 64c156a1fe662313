"""The CUDA backend's decode loop on the CPU against transformers' own `generate`, same model,
same process, same greedy settings: the default model (SmolLM2-135M-Instruct, fp32).

    .venv/bin/python bench/cuda_cpu_decode.py [--tokens 64] [--repeats 3]

Each side runs `repeats` times, alternating; the median tokens/s is printed with the range.
runner's figure is its own `generation_tps` (after the first token); generate's is new tokens over
the wall time of the call minus one prefill (timed separately), so both exclude the prompt.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from runner.backend import LoadRequest, Message, Sampling, get_backend
    from runner.default_model import import_default_model
    from runner.model import load_spec

    import_default_model()
    session = get_backend("cuda").load(LoadRequest(load_spec(None), "fp32", 1024))
    print(f"{session.device_summary}; torch {torch.__version__}")
    messages = [Message("user", "Write a long story about a lighthouse keeper.")]
    prompt = session.tokenize(messages)
    ids = torch.tensor([prompt])
    model = session.hf_model

    def runner_rate() -> float:
        return list(session.stream(messages, Sampling(max_tokens=args.tokens)))[-1].generation_tps

    def generate_rate() -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            model(ids)  # one prefill, to subtract
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                    min_new_tokens=args.tokens, do_sample=False, pad_token_id=2)
            elapsed = time.perf_counter() - started - prefill
        return (output.shape[1] - ids.shape[1] - 1) / elapsed

    runner_rate(), generate_rate()  # warm-up
    rates = {"runner decode loop": [], "transformers generate": []}
    for _ in range(args.repeats):
        rates["runner decode loop"].append(runner_rate())
        rates["transformers generate"].append(generate_rate())
    for name, values in rates.items():
        print(f"{name:24s} {statistics.median(values):6.2f} tok/s  ({min(values):.2f}-{max(values):.2f}, {args.repeats} runs of {args.tokens} tokens)")
    ratio = statistics.median(rates["runner decode loop"]) / statistics.median(rates["transformers generate"])
    print(f"ratio runner / generate: {ratio:.2f}")
    session.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

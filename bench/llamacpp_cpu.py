"""Decode tokens/s and time to first token of the default model on this CPU, in one run:
runner's llamacpp backend, fp16 (runner's F16 copy of the package's GGUF: the default without a
GPU) and gguf (the Q4_1 file as stored), against runner's torch CPU path (the cuda backend, fp32:
the same weights dequantized, the default before llama.cpp) and against raw llama-cpp-python on
each of the two files (its own `Llama.generate`, greedy).

    .venv/bin/python bench/llamacpp_cpu.py [--max-tokens 128] [--repeats 3]

All five sides are loaded first and warmed with one short reply, then answer the same kind of prompt
greedily in turn (`--repeats` rounds; each round's prompt differs, so no side replays a cached
prompt; every side keeps the shared system prefix of the chat template in its KV cache alike).
Decode tokens/s: (tokens - 1) / (time of the last token - time of the first), the same per
CPU-second of this process (comparable where every side computes on 1 thread, as on the
busy VM), time to first token: from the call to the first token. Medians over the rounds; the load average is printed because
the VM is shared and llama.cpp's OpenMP threads suffer most from other work on the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

PROMPT = "Count from {start} to 1000, one number per line."   # greedy SmolLM2 does not stop early


def rates(started: float, times: list[tuple[float, float]]) -> tuple[float, float, float, int]:
    """Time to first token, decode tokens per wall second and per CPU second (the process's: on
    a shared VM the wall clock also counts other jobs' turns on the core), tokens."""
    (wall0, cpu0), (wall1, cpu1) = times[0], times[-1]
    return wall0 - started, (len(times) - 1) / (wall1 - wall0), (len(times) - 1) / (cpu1 - cpu0), len(times)


def runner_side(session, prompt: str, max_tokens: int) -> tuple[float, float, float, int]:
    from runner.backend import Message, Sampling

    started = time.perf_counter()
    times = []
    for chunk in session.stream([Message("user", prompt)], Sampling(max_tokens=max_tokens)):
        if chunk.token is not None:
            times.append((time.perf_counter(), time.process_time()))
    return rates(started, times)


def raw_side(llm, prompt_ids: list[int], max_tokens: int, eos: int) -> tuple[float, float, float, int]:
    started = time.perf_counter()
    times = []
    for token in llm.generate(prompt_ids, temp=0, top_k=1):
        if token == eos:
            break
        times.append((time.perf_counter(), time.process_time()))
        if len(times) == max_tokens:
            break
    return rates(started, times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import llama_cpp
    import torch

    from runner.backend import Message
    from runner.choice import open_session, resolve
    from runner.default_model import gguf_file
    from runner.hardware import detect_machine
    from runner.model import load_spec
    from runner_llamacpp.f16 import copy_path

    machine = detect_machine()
    spec = load_spec(None)
    sides = {}
    sides["runner llamacpp fp16"] = open_session(resolve(spec, machine, "llamacpp", "fp16", 2048))
    sides["runner llamacpp gguf"] = open_session(resolve(spec, machine, "llamacpp", "gguf", 2048))
    sides["runner torch fp32"] = open_session(resolve(load_spec(None), machine, "cuda", "fp32", 2048))
    template_session = sides["runner llamacpp gguf"]
    threads = template_session.threads     # the same threads as runner's side (the cores not busy at its load)
    raws = {name: llama_cpp.Llama(str(path), n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads,
                                  n_threads_batch=threads, flash_attn=True, verbose=False)
            for name, path in (("raw llama-cpp-python F16", copy_path(gguf_file())),
                               ("raw llama-cpp-python Q4_1", gguf_file()))}
    eos = template_session.llm.token_eos()
    print(f"llama-cpp-python {llama_cpp.__version__} ({threads} threads) · torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) · {os.cpu_count()} cores · load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for name, session in list(sides.items()):
        print(f"  {name}: {session.device_summary}")

    def run(name: str, prompt: str, max_tokens: int):
        if name in raws:
            return raw_side(raws[name], template_session.tokenize([Message("user", prompt)]), max_tokens, eos)
        return runner_side(sides[name], prompt, max_tokens)

    names = [*sides, *raws]
    for name in names:                     # warm: one short reply each
        run(name, PROMPT.format(start=0), 16)
    results: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in names}
    for round_ in range(args.repeats):
        for name in names:
            results[name].append(run(name, PROMPT.format(start=round_ + 1), args.max_tokens))

    print(f"\ngreedy, {args.max_tokens} new tokens, {args.repeats} rounds, medians (min-max):")
    speed, cpu_speed = {}, {}
    for name in names:
        ttft = [r[0] for r in results[name]]
        tps = [r[1] for r in results[name]]
        per_cpu = [r[2] for r in results[name]]
        speed[name], cpu_speed[name] = statistics.median(tps), statistics.median(per_cpu)
        print(f"  {name:<26} decode {speed[name]:6.1f} tok/s ({min(tps):.1f}-{max(tps):.1f})   "
              f"per CPU-second {cpu_speed[name]:6.1f}   first token {statistics.median(ttft) * 1000:5.0f} ms   "
              f"tokens {results[name][0][3]}")
    print()
    for label, table in (("per wall second", speed), ("per CPU-second", cpu_speed)):
        fp16, gguf, torch_speed, raw_fp16, raw_gguf = (table[n] for n in names)
        print(f"{label}: llamacpp fp16 / torch fp32 {fp16 / torch_speed:.2f}x · llamacpp fp16 / raw F16 "
              f"{fp16 / raw_fp16:.3f} · llamacpp gguf / raw Q4_1 {gguf / raw_gguf:.3f} · fp16 / gguf {fp16 / gguf:.2f}")
    print(f"load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for raw in raws.values():
        raw.close()
    for session in sides.values():
        session.close()


if __name__ == "__main__":
    main()

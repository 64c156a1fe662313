"""Load a Llama-3.1-8B-shaped checkpoint through runner's CUDA backend in NF4 and BF16, and
print placement, measured vs planned memory, load time and decode tokens/s.

Run on a GPU machine (it writes a 16 GB random-weight checkpoint first, on local disk):

    PYTHONPATH=$PWD/src:$PWD/backends python3 bench/cuda_load.py --tokenizer .bench-tokenizer

The weights are random (N(0, 0.02), norms 1) in bf16, written as safetensors shards with an
index, with the real Llama-3.1-8B config.json (from runner's catalog, three EOS ids). The
tokenizer is SmolLM2's (49152 ids, all valid for a 128256-id model); ids it does not know
decode to nothing, so the text is meaningless: this measures memory and speed only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SHARD_BYTES = 5 * 10**9


def write_checkpoint(folder: Path, tokenizer: Path, layers: int | None) -> float:
    """The 8B-shaped checkpoint, built on the GPU tensor by tensor; returns seconds taken."""
    import torch
    from safetensors.torch import save_file

    from runner.model import catalog_config, spec_from_config

    started = time.perf_counter()
    config = catalog_config("meta-llama/Llama-3.1-8B-Instruct")
    if layers:  # a shrunk copy, for a dry run of this script on a small machine
        config = dict(config, num_hidden_layers=layers)
    spec = spec_from_config(config, "llama-8b-random", "folder")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}, indent=2)
    )
    for file in tokenizer.iterdir():
        shutil.copy(file, folder / file.name)

    generator = torch.Generator(device=device).manual_seed(0)

    def matrix(rows: int, cols: int) -> "torch.Tensor":
        weight = torch.empty(rows, cols, dtype=torch.bfloat16, device=device)
        weight.normal_(0.0, 0.02, generator=generator)
        return weight.cpu()

    def ones(n: int) -> "torch.Tensor":
        return torch.ones(n, dtype=torch.bfloat16)

    tensors = [("model.embed_tokens.weight", lambda: matrix(spec.vocab_size, spec.hidden_size))]
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        tensors.append((prefix + "input_layernorm.weight", lambda: ones(spec.hidden_size)))
        tensors.append((prefix + "post_attention_layernorm.weight", lambda: ones(spec.hidden_size)))
        for linear in spec.layer_linears():
            tensors.append((prefix + linear.name + ".weight", lambda l=linear: matrix(l.out_features, l.in_features)))
    tensors.append(("model.norm.weight", lambda: ones(spec.hidden_size)))
    tensors.append(("lm_head.weight", lambda: matrix(spec.vocab_size, spec.hidden_size)))

    shards: list[dict] = [{}]
    sizes = [0]
    for name, make in tensors:
        tensor = make()
        if sizes[-1] + tensor.nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += tensor.nbytes
    weight_map = {}
    for index, shard in enumerate(shards):
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({tensor_name: name for tensor_name in shard})
        print(f"  wrote {name} ({sizes[index] / 1e9:.2f} GB)", flush=True)
    total = sum(sizes)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return time.perf_counter() - started


def hf_generate_tokens_per_s(session, prompt: list[int], tokens: int) -> list[float]:
    """The baseline in the same run: transformers' own `generate` (greedy, dynamic cache) on the
    very model the session holds, timed twice (the first is the cold one)."""
    import torch

    ids = torch.tensor([prompt], device=session.input_device)
    rates = []
    for _ in range(2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        output = session.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                           min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        rates.append(round((output.shape[1] - ids.shape[1]) / (time.perf_counter() - started), 1))
    return rates


def oom_check(folder: Path, context: int) -> None:
    """An out-of-memory during the load: caught, the model freed, one line with the plan."""
    import torch

    from runner.backend import LoadRequest, get_backend
    from runner.budget import make_plan
    from runner.hardware import detect_machine
    from runner.errors import RunnerError
    from runner.model import load_spec

    spec = load_spec(str(folder))
    plan = make_plan(spec, detect_machine(), "bf16", context, backend="cuda")
    before = torch.cuda.memory_allocated(0)
    torch.cuda.set_per_process_memory_fraction(0.12, 0)  # ~9.8 GB: bf16 weights (16 GB) cannot fit
    try:
        get_backend("cuda").load(LoadRequest(spec, "bf16", context, plan=plan))
        print("\n== OOM check: the load did NOT fail (unexpected)", flush=True)
    except RunnerError as error:
        print(f"\n== OOM check ({type(error).__name__}): {error}", flush=True)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    print(f"  allocated after the failed load: {(torch.cuda.memory_allocated(0) - before) / 1e6:.1f} MB", flush=True)


def measure(folder: Path, quant: str, context: int, tokens: int) -> dict:
    import torch

    from runner.backend import LoadRequest, Message, Sampling, get_backend
    from runner.budget import make_plan
    from runner.hardware import detect_machine
    from runner.model import load_spec

    spec = load_spec(str(folder))
    plan = make_plan(spec, detect_machine(), quant, context, backend="cuda")
    print(f"\n== {quant}: plan {plan.verdict}, weights {plan.weights_bytes / 1e9:.2f} GB, total {plan.total_bytes / 1e9:.2f} GB, "
          f"roofline {plan.roofline_tokens_per_s:.0f} tok/s", flush=True)
    marks = set()

    def progress(p):
        if p.total and p.stage == "loading weights":
            step = 4 * p.done // p.total
            if step not in marks:
                marks.add(step)
                print(f"  {p.stage}: {p.done / 1e9:.1f}/{p.total / 1e9:.1f} GB", flush=True)

    gpu = torch.cuda.is_available()
    before = torch.cuda.memory_allocated(0) if gpu else 0
    started = time.perf_counter()
    session = get_backend("cuda").load(LoadRequest(spec, quant, context, plan=plan, on_progress=progress))
    load_s = time.perf_counter() - started
    memory = session.memory()
    print(f"  loaded in {load_s:.1f} s: {session.device_summary}", flush=True)
    messages = [Message("user", "Write a long story about a lighthouse keeper.")]
    list(session.stream(messages, Sampling(max_tokens=16)))  # warm-up: first CUDA/bitsandbytes calls
    first_long = list(session.stream(messages, Sampling(max_tokens=tokens)))[-1]
    last = list(session.stream(messages, Sampling(max_tokens=tokens)))[-1]  # warm
    sampled = list(session.stream(messages, Sampling(max_tokens=tokens, temperature=0.8, top_p=0.95, seed=1)))[-1]
    prompt = session.tokenize(messages)
    logits = session.logits(prompt)
    generate_tps = hf_generate_tokens_per_s(session, prompt, tokens) if gpu else []
    session.close()
    after_close = torch.cuda.memory_allocated(0) - before if gpu else 0
    result = {
        "quant": quant,
        "context": context,
        "device": session.device_summary,
        "load_s": round(load_s, 1),
        "measured_bytes": memory.measured,
        "planned_weights_bytes": memory.planned,
        "plan_total_bytes": plan.total_bytes,
        "peak_bytes_during_generation": last.peak_memory,
        "prompt_tokens": last.prompt_tokens,
        "greedy_tokens": last.generation_tokens,
        "greedy_finish": last.finish_reason,
        "greedy_first_long_tokens_per_s": round(first_long.generation_tps, 1),
        "greedy_tokens_per_s": round(last.generation_tps, 1),
        "hf_generate_greedy_tokens_per_s": generate_tps,
        "sampled_tokens_per_s": round(sampled.generation_tps, 1),
        "time_to_first_token_s": round(last.time_to_first_token, 3),
        "roofline_tokens_per_s": round(plan.roofline_tokens_per_s, 1),
        "logits_shape": list(logits.shape),
        "bytes_left_after_close": after_close,
    }
    for device, size in memory.measured.items():
        planned = memory.planned.get(device, 0)
        print(f"  {device}: measured {size / 1e9:.3f} GB, planned weights {planned / 1e9:.3f} GB "
              f"({100 * (size - planned) / planned:+.1f} %)" if planned else f"  {device}: measured {size / 1e9:.3f} GB", flush=True)
    print(f"  greedy {last.generation_tokens} tokens ({last.finish_reason}): first long run {first_long.generation_tps:.1f} "
          f"tok/s, warm {last.generation_tps:.1f} tok/s; HF generate on the same model, same run: {generate_tps} tok/s", flush=True)
    print(f"  "
          f"sampled {sampled.generation_tps:.1f} tok/s, first token {last.time_to_first_token * 1000:.0f} ms, "
          f"peak {last.peak_memory / 1e9:.2f} GB; after close {after_close / 1e6:.1f} MB left", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with a tokenizer and chat template")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/llama-3.1-8b-random"))
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--quants", default="nf4,bf16")
    parser.add_argument("--layers", type=int, default=None, help="only this many decoder layers (dry runs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import bitsandbytes
    import torch
    import transformers

    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {gpu_name}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}", flush=True)
    if not (args.folder / "model.safetensors.index.json").is_file():
        seconds = write_checkpoint(args.folder, args.tokenizer, args.layers)
        print(f"checkpoint written in {seconds:.1f} s", flush=True)
    results = []
    for quant in args.quants.split(","):
        try:
            results.append(measure(args.folder, quant, args.context, args.tokens))
        except Exception as error:  # report and go on to the next scheme: device time is scarce
            print(f"  {quant} FAILED: {type(error).__name__}: {error}", flush=True)
            results.append({"quant": quant, "error": f"{type(error).__name__}: {error}"})
    if torch.cuda.is_available():
        oom_check(args.folder, args.context)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

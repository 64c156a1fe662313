"""Decode tokens/s of the CUDA fast path with a quantized KV cache (`--kv-bits 8|4`) against the
bf16 cache, at 1k and 32k positions, on the Llama-3.1-8B shape, in one run on one GPU (issue 17).

    PYTHONPATH=src:backends python3 bench/kv_decode_gpu.py [--quant bf16|nf4] [--positions 1024,32768]
                                                           [--tokens 128] [--out DIR] [--sweep]

Run on an H200 (bench/RESULTS.md, "KV-cache quantization on the fast path"): before the attention
read the codes, kv8/kv4 decoded at 0.54x/0.49x the bf16 cache's speed at 1k and 0.21x/0.17x at
32k, each step dequantizing its whole graph bucket into a bf16 copy (24-418 MB of scratch); with
the split-KV attention dequantizing the codes in registers (fast/attention.py), 1.02x/1.00x and
0.95x/0.97x, and a step's scratch that of a bf16 cache's step.

The model is the 8B shape with random weights built on the GPU (runner_cuda.rehearse.random_model,
as `runner rehearse` builds it: no checkpoint). For each KV setting (bf16, 8-bit, 4-bit) in turn, a
FastDecoder (static cache for max(positions) + tokens, CUDA graphs, split-KV attention) is warmed up
(compile, first graph); at each position a prompt of that length is prefilled, 8 greedy steps warm
the bucket's graph, then `tokens` greedy steps are timed with the token read back each step, as a
session does. Reported per setting and position: tok/s; its ratio to the bf16 cache at the same
position; and the fraction of the roofline, copy bandwidth (measured here, read + written) over the
bytes a step must read: the weights (cuda_speed.bytes_read_per_token) plus the KV cache up to that
position in its stored format (budget.kv_cache_bytes, what the plan counts). Also the resident
memory of each decoder; the scratch peak of one ungraphed step; the prefill's peak above the
resident memory, against the bf16 cache's and the plan's count of the dequantized copy a prefill
chunk attends over (CudaPlanRules.kv_read_bytes); one layer's attention alone (triton's do_bench,
median) at the position, with the bytes of cache it reads per second; with --sweep, first, the
same for each launch shape of SWEEP (positions per block, warps, pipeline stages, parts) over a
synthetic cache, the fastest then used for the run (and recorded); and, as a sanity check in the same run, the kv8/kv4 fast path's logits teacher-forced against the ordinary loop with the
same quantized cache (runner_cuda.kv_cache) at the first position.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "backends"), str(ROOT / "bench")]

import cuda_speed  # noqa: E402

MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"
SETTINGS = (None, 8, 4)        # kv_bits: the compute dtype's cache, then 8- and 4-bit
WARM_STEPS = 8
# --sweep: attention.LAUNCH's (positions per inner step, warps, stages, most parts) tried for a quantized cache
SWEEP = ((128, 4, 3, 64), (128, 4, 4, 64), (128, 4, 3, 128), (64, 4, 3, 128))
RESULTS: dict = {}


def record(section: str, **values) -> None:
    RESULTS.setdefault(section, {}).update(values)
    print(f"[{section}]", json.dumps(values, default=str), flush=True)


def timed_steps(decoder, position: int, tokens: int) -> tuple[float, int]:
    """tok/s of `tokens` greedy steps after a `position`-token prompt (the bucket's graph warm), and
    the prefill's peak bytes above what was resident."""
    import torch

    decoder.reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    logits = decoder.prefill(cuda_speed.prompt(position, seed=position))
    torch.cuda.synchronize()
    prefill_peak = torch.cuda.max_memory_allocated() - resident
    for _ in range(WARM_STEPS):
        logits = decoder.step(int(logits.argmax()))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(tokens):
        logits = decoder.step(int(logits.argmax()))
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start), prefill_peak


def sweep(spec, positions: int) -> None:
    """Before the decoders: per quantized cache, one 8B layer's attention over `positions` with
    each launch of SWEEP, checked against the first (relative difference under 1e-2); the fastest
    becomes attention.LAUNCH for the run."""
    import torch
    from triton.testing import do_bench

    from runner_cuda.fast import attention
    from runner_cuda.fast.static_cache import QuantizedLayer

    kv_heads, head_dim, rep = spec.num_kv_heads, spec.head_dim, spec.num_heads // spec.num_kv_heads
    q = torch.randn(kv_heads, rep, head_dim, device="cuda").to(torch.bfloat16)
    at = torch.tensor([positions - 1], device="cuda")
    for bits in (8, 4):
        layer = QuantizedLayer(kv_heads, positions, head_dim, torch.bfloat16, "cuda", bits, kernels=True)
        layer.write(0, *(torch.randn(kv_heads, positions, head_dim, device="cuda").to(torch.bfloat16) for _ in range(2)))
        read = sum(t.numel() * t.element_size() for t in layer.tensors)
        timed, expected = {}, None
        for launch in SWEEP:
            attention.LAUNCH[bits] = launch
            out = layer.attend(q, at, positions, head_dim**-0.5).double()
            expected = out if expected is None else expected
            difference = ((out - expected).norm() / expected.norm()).item()
            seconds = do_bench(lambda: layer.attend(q, at, positions, head_dim**-0.5), warmup=25, rep=200,
                               return_mode="median") / 1e3
            if difference < 1e-2:
                timed[launch] = seconds
            record(f"sweep kv{bits}", **{"_".join(map(str, launch)): {
                "attention_us": seconds * 1e6, "read_gb_s": read / seconds / 1e9, "relative_difference": difference}})
        attention.LAUNCH[bits] = min(timed, key=timed.get)
        record(f"sweep kv{bits}", chosen=attention.LAUNCH[bits])
        del layer


def attention_alone(decoder) -> tuple[float, int]:
    """Median seconds of one layer's decode attention at the decoder's position (its bucket's
    span), and the bytes of that layer's cache it reads."""
    import torch
    from triton.testing import do_bench

    layer, position = decoder.cache[0], decoder.length - 1
    span = decoder._bucket(decoder.length)
    q = torch.randn(decoder.kv_heads, decoder.heads // decoder.kv_heads, decoder.head_dim, device="cuda").to(decoder.dtype)
    at = torch.tensor([position], device="cuda")
    seconds = do_bench(lambda: layer.attend(q, at, span, decoder.scaling), warmup=25, rep=200, return_mode="median") / 1e3
    read = sum(t[:, :position + 1].numel() * t.element_size() for t in layer.tensors)
    return seconds, read


def step_scratch(decoder) -> int:
    """Bytes one ungraphed step allocates above what is resident (at the decoder's current length)."""
    import torch

    graphs, decoder.use_graphs = decoder.use_graphs, False
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    decoder.step(5)
    torch.cuda.synchronize()
    decoder.use_graphs = graphs
    return torch.cuda.max_memory_allocated() - resident


def against_the_ordinary_loop(model, decoder, kv_bits: int, position: int, steps: int = 32) -> dict:
    """The fast path's logits fed the ordinary loop's greedy tokens (same quantized cache)."""
    import torch

    from runner_cuda.kv_cache import quantized_cache
    from runner_cuda.session import cache_argument, forward_in_chunks

    ids = [token % model.config.vocab_size for token in cuda_speed.prompt(position, seed=position)]
    device = model.lm_head.weight.device
    cache, name = quantized_cache(model.config, kv_bits), cache_argument(model)
    plain = [forward_in_chunks(model, torch.tensor([ids], device=device), cache, 2048, name)[0, -1].float()]
    tokens = []
    for _ in range(steps):
        tokens.append(int(plain[-1].argmax()))
        plain.append(forward_in_chunks(model, torch.tensor([[tokens[-1]]], device=device), cache, 2048, name)[0, -1].float())
    del cache
    decoder.reset()
    fast = [decoder.prefill(ids).clone()] + [decoder.step(token).clone() for token in tokens[:-1]]
    plain, fast = torch.stack(plain[:-1]), torch.stack(fast)
    return {"max_abs_logit_diff": (fast - plain).abs().max().item(), "logit_scale": plain.abs().max().item(),
            "relative_diff": ((fast - plain).norm() / plain.norm()).item(),
            "argmax_equal": (fast.argmax(-1) == plain.argmax(-1)).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", choices=("bf16", "nf4"), default="bf16")
    parser.add_argument("--positions", default="1024,32768")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--sweep", action="store_true",
                        help="first time one layer's attention per launch of SWEEP and run with the fastest")
    args = parser.parse_args()
    positions = [int(p) for p in args.positions.split(",")]

    import torch
    import transformers
    import triton

    from runner import budget
    from runner.model import load_spec
    from runner_cuda.fast.decoder import FastDecoder
    from runner_cuda.fast import attention
    from runner_cuda.plan_rules import CudaPlanRules
    from runner_cuda.rehearse import random_model

    bandwidth = cuda_speed.copy_bandwidth()
    record("machine", gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
           triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           copy_bandwidth_gb_s=bandwidth / 1e9, quant=args.quant, positions=positions, tokens=args.tokens)
    spec = load_spec(MODEL_ID)
    if args.sweep:
        sweep(spec, max(positions))
    record("launch", **{f"kv{bits}" if bits else "bf16 KV": list(attention.LAUNCH[bits]) for bits in SETTINGS})
    model = random_model(spec, args.quant).eval()
    weights = cuda_speed.bytes_read_per_token(model)
    record("model", weights_read_per_token_gb=weights / 1e9)
    max_len = max(positions) + WARM_STEPS + args.tokens + 2
    rates: dict = {}
    peaks: dict = {}
    rules = CudaPlanRules()
    for kv_bits in SETTINGS:
        label = "bf16 KV" if kv_bits is None else f"kv{kv_bits}"
        before = torch.cuda.memory_allocated()
        decoder = FastDecoder(model, max_len=max_len, kv_bits=kv_bits)
        cache_bytes = sum(t.numel() * t.element_size() for t in decoder.keys + decoder.values)
        planned = budget.kv_cache_bytes(spec, max_len, 1, args.quant, "cuda", kv_bits)
        started = time.perf_counter()
        decoder.warm_up()
        record(label, cache_gb=cache_bytes / 1e9, planned_kv_gb=planned / 1e9, cache_equals_plan=cache_bytes == planned,
               resident_gb=(torch.cuda.memory_allocated() - before) / 1e9, warm_up_s=time.perf_counter() - started)
        if kv_bits is not None:
            record(label, vs_ordinary_loop=against_the_ordinary_loop(model, decoder, kv_bits, positions[0]))
        for position in positions:
            rate, prefill_peak = timed_steps(decoder, position, args.tokens)
            kv_read = budget.kv_cache_bytes(spec, position + WARM_STEPS + args.tokens // 2, 1, args.quant, "cuda", kv_bits)
            roofline = bandwidth / (weights + kv_read)
            rates[(kv_bits, position)] = rate
            peaks[(kv_bits, position)] = prefill_peak
            seconds, layer_read = attention_alone(decoder)
            record(label, **{f"at_{position}": {
                "tok_s": rate, "roofline_tok_s": roofline, "roofline_fraction": rate / roofline,
                "ratio_to_bf16_kv": rate / rates[(None, position)],
                "step_scratch_mb": step_scratch(decoder) / 2**20,
                "prefill_peak_mb": prefill_peak / 2**20,
                "prefill_peak_over_bf16_kv_mb": (prefill_peak - peaks[(None, position)]) / 2**20,
                "planned_kv_read_mb": rules.kv_read_bytes(spec, position, 1, args.quant, kv_bits) / 2**20,
                "attention_us": seconds * 1e6, "attention_read_gb_s": layer_read / seconds / 1e9}})
        del decoder
        gc.collect()
        torch.cuda.empty_cache()
        Path(args.out, "kv_decode_gpu.json").write_text(json.dumps(RESULTS, indent=2, default=str))

    print(f"\n{args.quant} weights, 8B shape, {torch.cuda.get_device_name()}, {args.tokens} greedy steps timed")
    print(f"{'KV cache':<10}" + "".join(f"{f'at {p}':>34}" for p in positions))
    for kv_bits in SETTINGS:
        label = "bf16 KV" if kv_bits is None else f"kv{kv_bits}"
        cells = []
        for position in positions:
            entry = RESULTS[label][f"at_{position}"]
            cells.append(f"{entry['tok_s']:7.1f} tok/s {entry['ratio_to_bf16_kv']:5.2f}x {100 * entry['roofline_fraction']:4.0f} % roof")
        print(f"{label:<10}" + "".join(f"{cell:>34}" for cell in cells))
    for kv_bits in SETTINGS:
        label = "bf16 KV" if kv_bits is None else f"kv{kv_bits}"
        print(f"{label:<10}" + "".join(
            f"  at {p}: attention {e['attention_us']:6.1f} us/layer ({e['attention_read_gb_s']:5.0f} GB/s), step scratch "
            f"{e['step_scratch_mb']:5.1f} MiB, prefill +{e['prefill_peak_over_bf16_kv_mb']:6.1f} MiB "
            f"(plan {e['planned_kv_read_mb']:6.1f})" for p in positions for e in [RESULTS[label][f"at_{p}"]]))
    Path(args.out, "kv_decode_gpu.json").write_text(json.dumps(RESULTS, indent=2, default=str))


if __name__ == "__main__":
    main()

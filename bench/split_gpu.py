"""The fast decode path over a layer split on two GPUs (issues 19 and 23), for one call on a lent
`nvidia-h200-x2` machine.

    python3 bench/split_gpu.py rehearse8k     # runner rehearse --json: 405B NF4 at 8k; 70B NF4 and BF16 at 8k
    python3 bench/split_gpu.py positions      # 405B and 70B NF4 over both GPUs: decode tok/s at positions 100 ... 8000
    python3 bench/split_gpu.py longest        # 405B NF4 at the longest context the plan allows here, rehearsed
    python3 bench/split_gpu.py --longest-context   # just that context (then rehearse_gpu.py --one ... by hand,
                                                   # with no other process holding a CUDA context)
    python3 bench/split_gpu.py baseline       # 70B NF4 rehearsed through transformers' loop (--no-fast-decode)
    python3 bench/split_gpu.py kernels        # runner's NF4 kernel per 70B / 405B layer launch, its shapes swept
    python3 bench/split_gpu.py attention      # one layer's decode attention: split-KV kernel vs SDPA, by span

First the copy bandwidth of each GPU (a device-to-device copy, bytes read + written) and of a copy
between them, so decode tokens/s is held against a roofline measured in the same run. Each
rehearsal runs in its own process through rehearse_gpu.py (the same `run()` as `runner rehearse`);
the position sweep builds the model as a rehearsal does (random weights on the plan's devices) and
times greedy steps as a session takes them (argmax read back each token). Everything goes into
$OUT/split.json and $OUT/split.txt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import rehearse_gpu  # noqa: E402

OUT = Path(os.environ.get("OUT") or "bench-out")
LLAMA_405B = "meta-llama/Llama-3.1-405B-Instruct"
LLAMA_70B = "meta-llama/Llama-3.1-70B-Instruct"
REHEARSALS = {
    "rehearse8k": [
        ("405b-nf4-8k", [LLAMA_405B, "--quant", "nf4", "--context", "8192", "--decode-tokens", "64"]),
        ("70b-nf4-8k", [LLAMA_70B, "--quant", "nf4", "--context", "8192", "--decode-tokens", "64"]),
        ("70b-bf16-8k", [LLAMA_70B, "--quant", "bf16", "--context", "8192", "--decode-tokens", "64"]),
    ],
    "baseline": [
        ("70b-nf4-8k-transformers", [LLAMA_70B, "--quant", "nf4", "--context", "8192", "--decode-tokens", "16",
                                     "--no-fast-decode"]),
    ],
}


def bandwidths() -> dict:
    """Copy bandwidth of each GPU (read + write) and of a copy from cuda:0 to cuda:1."""
    import torch

    found = {}
    for index in range(torch.cuda.device_count()):
        with torch.cuda.device(index):
            found[f"cuda:{index}"] = rehearse_gpu.copy_bandwidth()
    if torch.cuda.device_count() > 1:
        n = 1024**3
        src = torch.empty(n, dtype=torch.uint8, device="cuda:0").random_()
        dst = torch.empty(n, dtype=torch.uint8, device="cuda:1")
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        start = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        found["cuda:0->cuda:1"] = 10 * n / (time.perf_counter() - start)
        del src, dst
        torch.cuda.empty_cache()
    return found


def longest_context(model: str, quant: str) -> int:
    """The longest context the plan allows for `model` in `quant` on this machine."""
    from runner.budget import max_context_that_fits
    from runner.hardware import detect_machine
    from runner.model import load_spec

    return max_context_that_fits(load_spec(model), detect_machine(), quant, "cuda")


def positions(model_id: str, quant: str, context: int = 8192, at=(100, 1000, 3000, 8000), tokens: int = 32) -> dict:
    """Build `model_id` with random weights on the plan's devices (as a rehearsal does), attach the
    fast path, and time `tokens` greedy steps after prompts reaching each position in `at`."""
    from runner_cuda.loading import use_expandable_segments

    use_expandable_segments()
    import torch

    from runner.budget import make_plan
    from runner.hardware import detect_machine
    from runner.model import load_spec
    from runner_cuda import fast
    from runner_cuda.loading import attention_for, gpu_capabilities, scheme_for
    from runner_cuda.rehearse import (Generators, build_meta_model, device_of, finish_model, materialize_buffers,
                                      materialize_parameter, resolve_device_map)

    spec = load_spec(model_id)
    plan = make_plan(spec, detect_machine(), quant, context, backend="cuda")
    gpus = gpu_capabilities()
    scheme = scheme_for(quant, gpus, allow_offload=False)
    model, quantizer = build_meta_model(spec, scheme, attention_for(scheme.dtype, gpus))
    device_map = resolve_device_map(model, plan, quantizer)
    materialize_buffers(model, device_map)
    generators = Generators()
    with torch.no_grad():
        for name, _ in list(model.named_parameters()):
            materialize_parameter(model, name, device_of(name, device_map), scheme.dtype, quantizer, generators)
    finish_model(model, quantizer, device_map)
    started = time.perf_counter()
    decoder = fast.decoder_for(model, context)
    decoder.warm_up()
    devices = [str(d) for d in decoder.devices]

    def sync():
        for device in devices:
            torch.cuda.synchronize(device)

    sync()
    record = {"model": model_id, "quant": quant, "context": context, "path": fast.describe(decoder),
              "warm_up_seconds": time.perf_counter() - started, "plan_roofline_tokens_per_s": plan.roofline_tokens_per_s,
              "rates": {}}
    ids = torch.randint(0, spec.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    decoder.reset()
    for position in at:
        logits = decoder.prefill(ids[decoder.length:position])
        token = int(logits.argmax())
        logits = decoder.step(token)            # captures this bucket's graphs
        sync()
        start = time.perf_counter()
        for _ in range(tokens):
            logits = decoder.step(int(logits.argmax()))
        sync()
        record["rates"][position] = tokens / (time.perf_counter() - start)
        print(f"position {position}: {record['rates'][position]:.2f} tok/s", file=sys.stderr, flush=True)
    record["peak"] = {d: torch.cuda.max_memory_allocated(d) for d in devices}
    record["planned_total"] = {share.device: share.total_bytes for share in plan.placement}
    return record


SHAPES = {   # per layer launch: (name, [(out, in)], NF4Mma mode) of the 70B and 405B
    "70b": [("qkv", [(8192, 8192), (1024, 8192), (1024, 8192)], "norm"), ("o", [(8192, 8192)], "residual"),
            ("gate_up", [(28672, 8192), (28672, 8192)], "glu"), ("down", [(8192, 28672)], "residual")],
    "405b": [("qkv", [(16384, 16384), (1024, 16384), (1024, 16384)], "norm"), ("o", [(16384, 16384)], "residual"),
             ("gate_up", [(53248, 16384), (53248, 16384)], "glu"), ("down", [(16384, 53248)], "residual")],
}
CHOICES = [(8, 8), (8, 4), (8, 2), (8, 1), (16, 16), (16, 8), (16, 4), (16, 1), (4, 4), (4, 1)]


def kernels(bandwidth: float) -> dict:
    """NF4Mma per launch of the 70B and 405B layers (timed in CUDA graphs, each weight larger than
    L2): the default (warps, split) and the others, as fractions of the copy bandwidth."""
    import bitsandbytes as bnb
    import torch
    from cuda_speed import graph_time_us

    from runner_cuda.fast.nf4 import nf4_weight_of
    from runner_cuda.fast.nf4_cuda import NF4Mma, mma_shape

    found = {}
    for model, launches in SHAPES.items():
        for name, shapes, mode in launches:
            # enough copies of the weights that L2 (60 MB) holds none of them between calls
            copies = max(1, -(-150_000_000 // sum(n * k // 2 for n, k in shapes)))
            groups = []
            for _ in range(copies):
                layers = []
                for n, k in shapes:
                    dense = torch.empty(n, k, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
                    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                              quant_type="nf4", device="meta")
                    layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=True)
                    layers.append(layer.cuda())
                    del dense
                groups.append([nf4_weight_of(layer) for layer in layers])
            k = shapes[0][1]
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            norm = (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)
            residual = torch.zeros(shapes[0][0], device="cuda", dtype=torch.bfloat16)
            options = {"norm": dict(norm=norm, eps=1e-5), "residual": dict(residual=True),
                       "glu": dict(glu=True, norm=norm, eps=1e-5)}[mode]
            nf4_bytes = sum(w.packed.numel() + w.absmax.numel() for w in groups[0])
            row = {"default": mma_shape(groups[0], mode == "glu"), "nf4_mb": nf4_bytes / 1e6, "copies": copies}
            for warps, split in [(None, None)] + CHOICES:
                try:
                    shape = {} if warps is None else {"warps": warps, "split": split}
                    calls = [NF4Mma(weights, **options, **shape) for weights in groups]
                    if mode == "residual":
                        def run(i, calls=calls):
                            return calls[i](x, out=residual)
                    else:
                        def run(i, calls=calls):
                            return calls[i](x)
                    us = graph_time_us(run, copies)
                except Exception as error:  # a shape that does not launch: say so, keep the others
                    row[f"w{warps}s{split}"] = repr(error)[:120]
                    continue
                row["default_us" if warps is None else f"w{warps}s{split}_us"] = round(us, 1)
            timed = {key: value for key, value in row.items() if key.endswith("_us") and key != "default_us"}
            best = min(timed, key=timed.get)
            row.update(best=best, best_us=timed[best], default_fraction=nf4_bytes / (row["default_us"] / 1e6) / bandwidth,
                       best_fraction=nf4_bytes / (timed[best] / 1e6) / bandwidth)
            found[f"{model} {name}"] = row
            print(f"{model} {name}: default {row['default']} {row['default_us']} us ({row['default_fraction']:.0%} of copy bw), "
                  f"best {best} {row['best_us']} us ({row['best_fraction']:.0%})", flush=True)
            del groups, layers
            torch.cuda.empty_cache()
    return found


def attention(bandwidth: float) -> dict:
    """One layer's decode attention at the 405B's shape on one GPU (8 KV heads of 16 queries, head
    dim 128), timed in CUDA graphs over enough caches that L2 holds none: runner's split-KV kernel
    against torch's SDPA with the bucket's mask (what the decoder ran before)."""
    import torch
    from cuda_speed import graph_time_us

    from runner_cuda.fast.attention import decode_attention

    found = {}
    kv, rep, dim = 8, 16, 128
    for span in (1024, 8192, 32768, 131072):
        cache_bytes = 2 * kv * span * dim * 2
        copies = max(1, -(-200_000_000 // cache_bytes))
        caches = [(torch.randn(kv, span, dim, device="cuda", dtype=torch.bfloat16),
                   torch.randn(kv, span, dim, device="cuda", dtype=torch.bfloat16)) for _ in range(copies)]
        q = torch.randn(kv, rep, dim, device="cuda", dtype=torch.bfloat16)
        position = torch.tensor([span - 1], device="cuda")
        visible = (torch.arange(span, device="cuda") <= position).view(1, 1, 1, span)
        split = graph_time_us(lambda i, caches=caches: decode_attention(q, *caches[i], position, span, dim**-0.5), copies)
        sdpa = graph_time_us(lambda i, caches=caches: torch.nn.functional.scaled_dot_product_attention(
            q[None], caches[i][0][None], caches[i][1][None], attn_mask=visible, scale=dim**-0.5), copies)
        found[span] = {"split_kv_us": split, "sdpa_us": sdpa, "split_kv_fraction": cache_bytes / (split / 1e6) / bandwidth,
                       "sdpa_fraction": cache_bytes / (sdpa / 1e6) / bandwidth}
        print(f"attention span {span}: split-KV {split:.1f} us ({found[span]['split_kv_fraction']:.0%} of copy bw), "
              f"SDPA {sdpa:.1f} us ({found[span]['sdpa_fraction']:.0%})", flush=True)
        del caches
        torch.cuda.empty_cache()
    return found


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--positions":
        print(json.dumps(positions(sys.argv[2], sys.argv[3])))
        return 0
    if sys.argv[1:] == ["--longest-context"]:    # before any process here holds a CUDA context
        print(longest_context(LLAMA_405B, "nf4"))
        return 0
    import torch

    OUT.mkdir(parents=True, exist_ok=True)
    results = {"bandwidth": bandwidths(), "cases": []}
    lines = ["copy bandwidth (read + write): " + ", ".join(f"{k} {v / 1e12:.3f} TB/s" for k, v in results["bandwidth"].items())
             + f" on {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"]
    print(lines[0], flush=True)
    bandwidth = min(v for k, v in results["bandwidth"].items() if "->" not in k)
    cases_dir = Path(tempfile.mkdtemp())
    rehearse_gpu.OUT = cases_dir
    for step in sys.argv[1:]:
        if step == "attention":
            results["attention"] = attention(bandwidth)
            lines += [f"attention span {span}: split-KV {row['split_kv_us']:.1f} us ({row['split_kv_fraction']:.0%}), "
                      f"SDPA {row['sdpa_us']:.1f} us ({row['sdpa_fraction']:.0%})" for span, row in results["attention"].items()]
            (OUT / "split.json").write_text(json.dumps(results, indent=1))
            continue
        if step == "kernels":
            results["kernels"] = kernels(bandwidth)
            lines += [f"{name}: default {row['default']} {row['default_us']} us ({row['default_fraction']:.0%} of copy bw), "
                      f"best {row['best']} {row['best_us']} us ({row['best_fraction']:.0%})" for name, row in results["kernels"].items()]
            (OUT / "split.json").write_text(json.dumps(results, indent=1))
            continue
        if step == "positions":
            for model, label in ((LLAMA_405B, "405b"), (LLAMA_70B, "70b")):
                started = time.perf_counter()
                process = subprocess.run([sys.executable, __file__, "--positions", model, "nf4"], capture_output=True,
                                         text=True)
                record = {"case": f"{label}-nf4-positions", "exit_code": process.returncode, "log": process.stderr[-20000:],
                          "wall_seconds": time.perf_counter() - started}
                try:
                    record.update(json.loads(process.stdout))
                except json.JSONDecodeError:
                    record["stdout"] = process.stdout[-3000:]
                results["cases"].append(record)
                rates = record.get("rates", {})
                lines.append(f"{label}-nf4 positions (exit {record['exit_code']}, wall {record['wall_seconds']:.0f} s): "
                             + ", ".join(f"{p}: {r:.2f} tok/s" for p, r in rates.items())
                             + (f"; peak {', '.join(f'{d} {b / 1e9:.2f} GB' for d, b in record['peak'].items())}"
                                if "peak" in record else record["log"][-800:]))
                (OUT / "split.json").write_text(json.dumps(results, indent=1))
            continue
        cases = REHEARSALS.get(step)
        if step == "longest":
            context = longest_context(LLAMA_405B, "nf4")
            lines.append(f"the plan's longest context for 405B nf4 here: {context}")
            cases = [(f"405b-nf4-{context}", [LLAMA_405B, "--quant", "nf4", "--context", str(context),
                                              "--decode-tokens", "16"])]
        for name, arguments in cases:
            record = rehearse_gpu.run_case(name, arguments)
            results["cases"].append(record)
            lines += rehearse_gpu.summary(record, bandwidth)
        (OUT / "split.json").write_text(json.dumps(results, indent=1))
    (OUT / "split.json").write_text(json.dumps(results, indent=1))
    text = "\n".join(lines)
    (OUT / "split.txt").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CUDA speed: the article's recipe and runner's fast path, side by side, in one run on one GPU.

    PYTHONPATH=src:backends python3 bench/cuda_speed.py [--out DIR] [--work /tmp/cuda-speed]
                                                         [--sections kernels,nf4,reload,bf16]

Writes a Llama-3.1-8B-shaped checkpoint with random BF16 weights (config from runner's catalog),
then measures, each warm and with the same settings (batch 1, greedy, 256 new tokens, EOS off):
- the article's recipe: NF4 + double quant, BF16 compute, device_map="auto", HF `generate`;
- runner's fast path on the same loaded model (static KV cache, CUDA graphs, fused NF4 GEMV),
  and its parts alone (graphs with bitsandbytes' own kernel; the fused kernel without graphs);
- decode tokens/s, time to first token for a 1k-token prompt, load time, peak and resident memory;
- reload: quantize-on-load vs the NF4 cache, load + first token of the 1k prompt;
- BF16: HF generate vs the fast path, against the roofline;
- the copy bandwidth, measured here, for the rooflines: bandwidth / bytes read per token.
Correctness on the same run: greedy tokens of the fast path vs HF generate on the same model, and
next-token logits teacher-forced on HF's tokens. Prints a table last; JSON under --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "backends")]

NEW_TOKENS = 256
LONG_PROMPT = 1024
SHORT_PROMPT = 16
RESULTS: dict = {}
QUICK = False          # --quick: runner's default fast path only, no ablation variants


def log(*parts) -> None:
    print(*parts, flush=True)


def record(section: str, **values) -> None:
    RESULTS.setdefault(section, {}).update(values)
    log(f"[{section}]", json.dumps(values, default=str))


# ---- measuring ------------------------------------------------------------------------------

def sync():
    import torch

    torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    import torch

    src = torch.randn(1 << 28, device="cuda")         # 1 GiB of float32
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    del src, dst
    return 2 * (1 << 30) / times[len(times) // 2]


def memory() -> dict:
    import torch

    return {"resident_gb": torch.cuda.memory_allocated() / 1e9, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def free():
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def bytes_read_per_token(model) -> int:
    """Bytes a decode step must read: every parameter and buffer except the input embedding
    table (one row of it is read). The NF4 quantization state counts (absmax, nested state)."""
    embed = model.get_input_embeddings().weight
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen or tensor is embed:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * 4
            if state.nested:
                total += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4
    return total


# ---- the checkpoint -------------------------------------------------------------------------

def write_checkpoint(folder: Path) -> None:
    """Llama-3.1-8B's config with random BF16 weights (std 0.02, norms 1), in 4 GB shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    catalog = json.loads((ROOT / "src/runner/catalog/meta-llama--Llama-3.1-8B-Instruct.json").read_text())
    (folder / "config.json").write_text(json.dumps(catalog, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}))
    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    generator = torch.Generator(device="cuda").manual_seed(0)
    shard, shard_bytes, index, number = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, number
        if not shard:
            return
        number += 1
        name = f"model-{number:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        index.update({key: name for key in shard})
        shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator, device="cuda", dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes >= 4e9:
            flush()
    flush()
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    (folder / "done").write_text("ok")
    del skeleton


# ---- loading --------------------------------------------------------------------------------

def nf4_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load(folder: Path, quant: str):
    """The article's recipe (nf4) or plain BF16, device_map="auto". Returns (model, seconds)."""
    import torch
    from transformers import AutoModelForCausalLM

    sync()
    start = time.perf_counter()
    kwargs = {"device_map": "auto", "dtype": torch.bfloat16}
    if quant == "nf4":
        kwargs["quantization_config"] = nf4_config()
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).eval()
    sync()
    return model, time.perf_counter() - start


# ---- generating -----------------------------------------------------------------------------

def prompt(count: int, seed: int = 1) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 120000, (count,), generator=generator).tolist()


def hf_generate(model, ids: list[int], new_tokens: int) -> tuple[list[int], float]:
    """HF generate, greedy, EOS off; (new token ids, seconds)."""
    import torch

    input_ids = torch.tensor([ids], device=model.device)
    sync()
    start = time.perf_counter()
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, eos_token_id=None, pad_token_id=0,
    )
    sync()
    return out[0, len(ids):].tolist(), time.perf_counter() - start


def fast_generate(decoder, ids: list[int], new_tokens: int) -> tuple[list[int], float]:
    """runner's loop: prefill, then one graphed step per token; greedy on the GPU, the token id
    read back each step as a streaming Session must. (new token ids, seconds)."""
    sync()
    start = time.perf_counter()
    decoder.reset()
    logits = decoder.prefill(ids)
    tokens = []
    for _ in range(new_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        if len(tokens) == new_tokens:
            break
        logits = decoder.step(token)
    sync()
    return tokens, time.perf_counter() - start


def decode_rate(run, model_or_decoder) -> dict:
    """Warm decode tokens/s: (256 - 1) / (t(256 tokens) - t(1 token)) from a 16-token prompt,
    after one full warm-up generation; and time to first token of a 1k-token prompt."""
    short, long = prompt(SHORT_PROMPT), prompt(LONG_PROMPT, seed=2)
    run(model_or_decoder, short, NEW_TOKENS)            # warm-up: the first long generation is slow
    run(model_or_decoder, long, 1)
    one = min(run(model_or_decoder, short, 1)[1] for _ in range(3))
    tokens, full = run(model_or_decoder, short, NEW_TOKENS)
    ttft = min(run(model_or_decoder, long, 1)[1] for _ in range(3))
    return {"decode_tok_s": (NEW_TOKENS - 1) / (full - one), "ttft_1k_s": ttft, "tokens": tokens}


def teacher_forced_logits(model, decoder, ids: list[int], reference_tokens: list[int]) -> dict:
    """Fast-path logits at each step, fed HF's tokens, vs HF's own forward over the whole sequence."""
    import torch

    sequence = ids + reference_tokens
    with torch.no_grad():
        hf = model(torch.tensor([sequence], device=model.device)).logits[0, len(ids) - 1 :].float()
    decoder.reset()
    steps = [decoder.prefill(ids).clone()]
    for token in reference_tokens[:-1]:
        steps.append(decoder.step(token).clone())
    fast = torch.stack(steps)
    hf = hf[: len(fast)]
    diff = (fast - hf).abs().max(dim=-1).values
    top2 = hf.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    clear = margin > 2 * diff.max()
    return {
        "max_abs_logit_diff": diff.max().item(),
        "logit_scale": hf.abs().max().item(),
        "argmax_equal": (fast.argmax(-1) == hf.argmax(-1)).float().mean().item(),
        "argmax_equal_where_margin_clear": (fast.argmax(-1) == hf.argmax(-1))[clear].float().mean().item() if clear.any() else None,
    }


def profile_step(decoder, steps: int = 20) -> dict:
    """GPU time of one decode step by kernel, from torch.profiler over eager (ungraphed) steps:
    where the time goes, without launch gaps (a graphed step adds the gaps between kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    graphs, decoder.use_graphs = decoder.use_graphs, False
    decoder.reset()
    decoder.prefill(prompt(SHORT_PROMPT))
    for _ in range(3):
        decoder.step(5)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(steps):
            decoder.step(5)
        sync()
    decoder.use_graphs = graphs
    totals, counts = {}, {}
    for event in trace.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:60]
            totals[name] = totals.get(name, 0.0) + event.device_time_total
            counts[name] = counts.get(name, 0) + 1
    top = sorted(totals.items(), key=lambda item: -item[1])[:10]
    return {"gpu_us_per_token": sum(totals.values()) / steps, "kernels_per_token": sum(counts.values()) / steps,
            "top": [(name, round(us / steps, 1), counts[name] // steps) for name, us in top]}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


# ---- sections -------------------------------------------------------------------------------

def graph_time_us(call, copies: int) -> float:
    """GPU time of one call, from replays of a CUDA graph holding `copies` × 10 calls (no launch
    overhead in the number, as in a graphed decode step), median of 20 replays."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for index in range(copies):
            call(index)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            for index in range(copies):
                call(index)
    graph.replay()
    sync()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (10 * copies))
    times.sort()
    return times[len(times) // 2]


def section_kernels() -> None:
    """runner's NF4 GEMV (nf4_cuda.py) against bitsandbytes' batch-1 kernel and BF16 cuBLAS, per
    Llama-8B shape, timed inside CUDA graphs over enough copies of the weight that L2 (50 MB)
    cannot hold them; then q/k/v and gate/up as one launch against bitsandbytes' three (two)."""
    import bitsandbytes as bnb
    import torch

    from runner_cuda.fast.nf4 import dequantize_reference, nf4_weight_of
    from runner_cuda.fast.nf4_cuda import NF4Gemv, rows_per_warp

    bandwidth = RESULTS["machine"]["copy_bandwidth_gb_s"] * 1e9
    choices = [(rows, threads) for rows in (1, 2, 4) for threads in (64, 128, 256)]

    def nf4_layer(n, k):
        dense = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
        torch.nn.init.normal_(dense.weight, std=0.02)
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        return layer.cuda()

    cases = [(f"{n}x{k}", ((n, k),)) for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))]
    cases += [("one launch qkv", ((4096, 4096), (1024, 4096), (1024, 4096))), ("one launch gate_up", ((14336, 4096), (14336, 4096)))]
    for name, shapes in cases:
        k = shapes[0][1]
        copies = max(1, min(8, int(200e6 // sum(n * k // 2 for n, k in shapes))))
        groups = [[nf4_layer(n, k) for n, k in shapes] for _ in range(copies)]
        weights = [[nf4_weight_of(layer) for layer in group] for group in groups]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        nf4_bytes = sum(w.packed.numel() + w.absmax.numel() for w in weights[0])
        rows = {"copies": copies, "nf4_mb": nf4_bytes / 1e6}
        with torch.no_grad():
            exact = torch.cat([torch.nn.functional.linear(x.double(), dequantize_reference(w).double()) for w in weights[0]], dim=-1)
            theirs = torch.cat([layer(x).float() for layer in groups[0]], dim=-1)
            rows["bnb_rel_err_vs_exact"] = ((theirs - exact).norm() / exact.norm()).item()
            rows["bnb_us"] = graph_time_us(lambda i, groups=groups: [layer(x) for layer in groups[i]], copies)
            rows["bnb_tb_s"] = nf4_bytes / rows["bnb_us"] / 1e6
            if len(shapes) == 1:
                dense = [torch.empty(*shapes[0], dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
                rows["bf16_us"] = graph_time_us(lambda i: torch.nn.functional.linear(x, dense[i]), copies)
                rows["bf16_tb_s"] = shapes[0][0] * k * 2 / rows["bf16_us"] / 1e6
                del dense
            best = None
            for rows_per, threads in choices:
                if any(w.out_features % rows_per for w in weights[0]):
                    continue
                calls = [NF4Gemv(group, rows=rows_per, threads=threads) for group in weights]
                mine = calls[0](x).float()
                error = ((mine - exact).norm() / exact.norm()).item()
                us = graph_time_us(lambda i: calls[i](x), copies)
                rows[f"cuda_r{rows_per}t{threads}_us"] = round(us, 2)
                if error > 2e-2:
                    rows[f"cuda_r{rows_per}t{threads}_BAD_rel_err"] = error
                elif best is None or us < best[0]:
                    best = (us, (rows_per, threads), error)
            default = [NF4Gemv(group) for group in weights]
            mine = default[0](x).float()
            rows.update(cuda_best_us=best[0], cuda_best=best[1], cuda_default=(rows_per_warp(weights[0]), default[0].threads),
                        cuda_default_us=graph_time_us(lambda i: default[i](x), copies),
                        cuda_rel_err_vs_exact=((mine - exact).norm() / exact.norm()).item(),
                        cuda_rel_diff_vs_bnb=((mine - theirs).norm() / theirs.norm()).item())
            rounded = [NF4Gemv(group, rounding="bitsandbytes") for group in weights]
            mine_rounded = rounded[0](x).float()
            rows.update(cuda_bnb_rounding_us=graph_time_us(lambda i: rounded[i](x), copies),
                        cuda_bnb_rounding_rel_diff_vs_bnb=((mine_rounded - theirs).norm() / theirs.norm()).item(),
                        cuda_bnb_rounding_outputs_equal_bnb=(mine_rounded == theirs).float().mean().item())
            rows.update(cuda_tb_s=nf4_bytes / rows["cuda_default_us"] / 1e6,
                        cuda_fraction_of_copy_bw=nf4_bytes / (rows["cuda_default_us"] / 1e6) / bandwidth,
                        cuda_vs_bnb=rows["bnb_us"] / rows["cuda_default_us"])
        record(f"kernel {name}", **rows)
        del groups, weights
        free()


def section_nf4(checkpoint: Path) -> None:
    import torch

    from runner_cuda.fast.decoder import FastDecoder

    free()
    model, seconds = load(checkpoint, "nf4")
    record("nf4 load", load_s=seconds, **memory(), bytes_per_token=bytes_read_per_token(model),
           layer_type=type(model.model.layers[0].mlp.up_proj).__name__, compute_dtype=str(model.model.layers[0].mlp.up_proj.compute_dtype))
    bandwidth = RESULTS["machine"]["copy_bandwidth_gb_s"] * 1e9
    roofline = bandwidth / RESULTS["nf4 load"]["bytes_per_token"]

    torch.cuda.reset_peak_memory_stats()
    article = decode_rate(hf_generate, model)
    record("nf4 article (HF generate)", **{k: v for k, v in article.items() if k != "tokens"}, **memory(), roofline_tok_s=roofline,
           fraction_of_roofline=article["decode_tok_s"] / roofline)

    variants = (
        ("fast (graphs, fused ops, runner's CUDA GEMV)", dict()),
        ("fast, runner's CUDA GEMV rounding as bitsandbytes", dict(nf4_kernel="cuda-bnb-rounding")),
        ("fast, bitsandbytes kernel", dict(nf4_kernel="bitsandbytes")),
        ("graphs only, bitsandbytes kernel", dict(compile_ops=False, nf4_kernel="bitsandbytes")),
    )
    for name, options in variants[:1] if QUICK else variants:
        try:
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            decoder = FastDecoder(model, max_len=LONG_PROMPT + NEW_TOKENS + 16, **options)
            fast_generate(decoder, prompt(SHORT_PROMPT), 300)      # compiles, captures the graphs
            first_use_s = time.perf_counter() - started
            result = decode_rate(fast_generate, decoder)
            result["first_use_s"] = first_use_s
            if not options:
                record("nf4 profile (eager step, GPU time per token)", **profile_step(decoder))
            same = first_difference(result["tokens"], article["tokens"])
            record(f"nf4 {name}", **{k: v for k, v in result.items() if k != "tokens"}, **memory(),
                   vs_article=result["decode_tok_s"] / article["decode_tok_s"], ttft_vs_article=article["ttft_1k_s"] / result["ttft_1k_s"],
                   fraction_of_roofline=result["decode_tok_s"] / roofline,
                   greedy_tokens_equal_hf=same is None, first_difference_at=same,
                   **teacher_forced_logits(model, decoder, prompt(SHORT_PROMPT), article["tokens"][:64]))
            del decoder
            free()
        except Exception as error:  # keep the other variants' numbers
            record(f"nf4 {name}", error=repr(error), trace=traceback.format_exc()[-1500:])
    del model
    free()


def section_reload(checkpoint: Path, work: Path) -> None:
    """Load + first token of the 1k prompt: quantizing on load vs the NF4 cache."""
    import torch

    from runner_cuda.fast import nf4_cache
    from runner_cuda.fast.decoder import FastDecoder

    os.environ["RUNNER_HOME"] = str(work / "runner-home")
    long = prompt(LONG_PROMPT, seed=2)

    def first_token(model) -> float:
        decoder = FastDecoder(model, max_len=LONG_PROMPT + 16)
        return int(decoder.prefill(long).argmax())

    def quantize_on_load() -> tuple:
        free()
        sync()
        start = time.perf_counter()
        model, load_s = load(checkpoint, "nf4")
        token = first_token(model)
        sync()
        return model, load_s, token, time.perf_counter() - start

    # a first round warms CUDA, cuBLAS and the attention kernels up for both paths; measured below
    model, _, _, warm_up_s = quantize_on_load()
    save_start = time.perf_counter()
    folder = nf4_cache.save(model, checkpoint, "nf4")
    save_s = time.perf_counter() - save_start
    with torch.no_grad():
        logits_quantized = model(torch.tensor([long[:64]], device="cuda")).logits.float()
    del model
    free()

    # the cache as runner loads it (one GPU: its own threaded reader, the model assembled from the tensors)
    sync()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cached_folder = nf4_cache.find(checkpoint, "nf4")
    profiler = None
    if os.environ.get("BENCH_PROFILE_RELOAD"):      # where the cache load's time goes
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    model = nf4_cache.load(cached_folder, device_map={"": 0})
    sync()
    cache_load_s = time.perf_counter() - start
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    load_peak = torch.cuda.max_memory_allocated()
    token_cached = first_token(model)
    sync()
    cached_s = time.perf_counter() - start
    with torch.no_grad():
        logits_cached = model(torch.tensor([long[:64]], device="cuda")).logits.float()
    resident = torch.cuda.memory_allocated()
    del model
    free()
    model, load_s, token_quantized, quantized_s = quantize_on_load()     # the measured round
    del model
    free()
    # the same folder through transformers' own reader
    start = time.perf_counter()
    model = nf4_cache.load(cached_folder, device_map="auto")
    sync()
    transformers_load_s = time.perf_counter() - start
    token_transformers = first_token(model)
    sync()
    transformers_first_token_s = time.perf_counter() - start
    del model
    free()
    from safetensors import safe_open

    start = time.perf_counter()
    tensors = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt", device="cuda:0") as handle:
            tensors.extend(handle.get_tensor(name) for name in handle.keys())
    sync()
    raw_read_s = time.perf_counter() - start
    del tensors
    start = time.perf_counter()
    tensors = nf4_cache.read_folder(folder, "cuda:0")
    sync()
    runner_read_s = time.perf_counter() - start
    del tensors
    free()
    size = sum(p.stat().st_size for p in folder.iterdir())
    record("reload parts", transformers_reader_load_s=transformers_load_s, transformers_reader_first_token_s=transformers_first_token_s,
           transformers_reader_same_token=token_transformers == token_quantized,
           safe_open_to_gpu_s=raw_read_s, runner_reader_to_gpu_s=runner_read_s, runner_reader_gb_s=size / runner_read_s / 1e9,
           cache_load_peak_gb=load_peak / 1e9, cache_resident_gb=resident / 1e9)
    record("reload", quantize_on_load_first_token_s=quantized_s, quantize_load_s=load_s, first_round_s=warm_up_s,
           cache_first_token_s=cached_s,
           cache_load_s=cache_load_s, speedup=quantized_s / cached_s, cache_save_s=save_s, cache_gb=size / 1e9,
           same_first_token=token_quantized == token_cached, logits_identical=bool(torch.equal(logits_quantized, logits_cached)),
           note="checkpoint and cache both just written: both read from the page cache", **memory())
    free()


def drop_page_cache() -> bool:
    """Empty this machine's page cache (root on the lent VM) so the next read comes from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def section_reload_cold(checkpoint: Path, work: Path, rounds: int = 2) -> None:
    """The same as `reload`, each load after emptying the page cache: weights read from disk. Beside
    the two paths, where the cache path's time goes: the files alone read to the GPU."""
    from runner_cuda.fast import nf4_cache
    from runner_cuda.fast.decoder import FastDecoder

    os.environ["RUNNER_HOME"] = str(work / "runner-home")
    long = prompt(LONG_PROMPT, seed=2)
    folder = nf4_cache.find(checkpoint, "nf4")
    if folder is None or not drop_page_cache():
        record("reload cold", skipped="no cache folder or cannot drop the page cache")
        return
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    cases = {
        "quantize_on_load": lambda: load(checkpoint, "nf4")[0],
        "cache": lambda: nf4_cache.load(folder, device_map={"": 0}),
        "cache_files_only": lambda: nf4_cache.read_folder(folder, "cuda:0"),
    }
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, make in cases.items():
            free()
            drop_page_cache()
            sync()
            start = time.perf_counter()
            model = make()
            if name != "cache_files_only":
                int(FastDecoder(model, max_len=LONG_PROMPT + 16).prefill(long).argmax())
            sync()
            times[name].append(time.perf_counter() - start)
            del model
    best = {name: min(values) for name, values in times.items()}
    record("reload cold", quantize_on_load_first_token_s=times["quantize_on_load"], cache_first_token_s=times["cache"],
           cache_files_only_s=times["cache_files_only"], cache_files_gb_s=size / best["cache_files_only"] / 1e9,
           speedup_per_round=[q / c for q, c in zip(times["quantize_on_load"], times["cache"])],
           speedup=sum(times["quantize_on_load"]) / sum(times["cache"]), note="page cache dropped before each load")
    free()


def section_bf16(checkpoint: Path) -> None:
    import torch

    from runner_cuda.fast.decoder import FastDecoder

    free()
    model, seconds = load(checkpoint, "bf16")
    bandwidth = RESULTS["machine"]["copy_bandwidth_gb_s"] * 1e9
    per_token = bytes_read_per_token(model)
    roofline = bandwidth / per_token
    record("bf16 load", load_s=seconds, **memory(), bytes_per_token=per_token, roofline_tok_s=roofline)
    torch.cuda.reset_peak_memory_stats()
    baseline = decode_rate(hf_generate, model)
    record("bf16 HF generate", **{k: v for k, v in baseline.items() if k != "tokens"}, **memory(), fraction_of_roofline=baseline["decode_tok_s"] / roofline)
    try:
        if QUICK:
            raise RuntimeError("skipped (--quick)")
        decoder = FastDecoder(model, max_len=LONG_PROMPT + NEW_TOKENS + 16, compile_ops=False, fuse_dense=False)
        result = decode_rate(fast_generate, decoder)
        record("bf16 graphs only", decode_tok_s=result["decode_tok_s"], fraction_of_roofline=result["decode_tok_s"] / roofline,
               vs_hf=result["decode_tok_s"] / baseline["decode_tok_s"])
        del decoder
    except Exception as error:
        record("bf16 graphs only", error=repr(error), trace=traceback.format_exc()[-1500:])
    try:
        torch.cuda.reset_peak_memory_stats()
        decoder = FastDecoder(model, max_len=LONG_PROMPT + NEW_TOKENS + 16)
        result = decode_rate(fast_generate, decoder)
        same = first_difference(result["tokens"], baseline["tokens"])
        record("bf16 fast (graphs, fused ops, fused q/k/v and gate/up)", **{k: v for k, v in result.items() if k != "tokens"}, **memory(),
               vs_hf=result["decode_tok_s"] / baseline["decode_tok_s"], fraction_of_roofline=result["decode_tok_s"] / roofline,
               greedy_tokens_equal_hf=same is None, first_difference_at=same,
               **teacher_forced_logits(model, decoder, prompt(SHORT_PROMPT), baseline["tokens"][:64]))
        record("bf16 profile (eager step, GPU time per token)", **profile_step(decoder))
    except Exception as error:
        record("bf16 fast", error=repr(error), trace=traceback.format_exc()[-1500:])
    del model
    free()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--work", default="/tmp/cuda-speed")
    parser.add_argument("--sections", default="kernels,nf4,reload,bf16,cold")
    parser.add_argument("--quick", action="store_true", help="runner's default fast path only, no ablation variants")
    args = parser.parse_args()
    global QUICK
    QUICK = args.quick
    import bitsandbytes
    import torch
    import transformers
    import triton

    work = Path(args.work)
    checkpoint = work / "llama-3.1-8b-random"
    record("machine", gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
           bitsandbytes=bitsandbytes.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           copy_bandwidth_gb_s=copy_bandwidth() / 1e9)
    sections = args.sections.split(",")
    started = time.perf_counter()
    if "kernels" in sections:
        try:
            section_kernels()
        except Exception as error:
            record("kernels", error=repr(error), trace=traceback.format_exc()[-2000:])
    if {"nf4", "reload", "bf16", "cold"} & set(sections):
        write_checkpoint(checkpoint)
        record("checkpoint", folder=str(checkpoint), seconds=time.perf_counter() - started)
    for name, run in (("nf4", lambda: section_nf4(checkpoint)), ("reload", lambda: section_reload(checkpoint, work)),
                      ("bf16", lambda: section_bf16(checkpoint)), ("cold", lambda: section_reload_cold(checkpoint, work))):
        if name in sections:
            try:
                run()
            except Exception as error:
                record(name, error=repr(error), trace=traceback.format_exc()[-2000:])
            Path(args.out, "cuda_speed.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    Path(args.out, "cuda_speed.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    summary()


def summary() -> None:
    log("\n==== summary ====")
    for section, values in RESULTS.items():
        keep = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items() if k not in ("trace",)}
        log(f"{section:40s} {json.dumps(keep, default=str)}")


if __name__ == "__main__":
    main()

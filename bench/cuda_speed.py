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


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


# ---- sections -------------------------------------------------------------------------------

def section_kernels() -> None:
    """The fused NF4 GEMV against bitsandbytes' kernel and BF16 cuBLAS, per Llama-8B shape."""
    import bitsandbytes as bnb
    import torch
    import triton.testing

    from runner_cuda.fast.nf4 import linear_reference, nf4_gemv, nf4_weight_of

    bandwidth = RESULTS["machine"]["copy_bandwidth_gb_s"] * 1e9
    for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)):
        dense = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
        torch.nn.init.normal_(dense.weight, std=0.02)
        layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        layer = layer.cuda()
        w = nf4_weight_of(layer)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            reference = linear_reference(x, w).float()
            theirs = layer(x).float()
            rows = {"shape": f"{n}x{k}", "nf4_bytes": w.packed.numel() + w.absmax.numel()}
            rows["bnb_rel_err"] = ((theirs - reference).norm() / reference.norm()).item()
            rows["bnb_us"] = triton.testing.do_bench(lambda: layer(x), warmup=50, rep=200, return_mode="median") * 1000
            rows["bf16_us"] = triton.testing.do_bench(lambda: dense(x), warmup=50, rep=200, return_mode="median") * 1000
            best = None
            for tiles in ((4, 512, 4), (8, 512, 4), (2, 512, 4), (4, 256, 4), (8, 256, 8), (16, 256, 8), (4, 1024, 8), (1, 1024, 4)):
                if k % tiles[1]:
                    continue
                mine = nf4_gemv(x, w, tiles=tiles).float()
                error = ((mine - reference).norm() / reference.norm()).item()
                us = triton.testing.do_bench(lambda: nf4_gemv(x, w, tiles=tiles), warmup=50, rep=200, return_mode="median") * 1000
                rows[f"fused_{tiles[0]}x{tiles[1]}w{tiles[2]}_us"] = round(us, 1)
                if error > 1e-2:
                    rows[f"fused_{tiles[0]}x{tiles[1]}w{tiles[2]}_BAD_rel_err"] = error
                elif best is None or us < best[0]:
                    best = (us, tiles, error)
            if best:
                rows["fused_best_us"], rows["fused_best_tiles"], rows["fused_rel_err"] = best[0], best[1], best[2]
                rows["fused_gb_s"] = rows["nf4_bytes"] / (best[0] / 1e6) / 1e9
                rows["fused_fraction_of_copy_bw"] = rows["nf4_bytes"] / (best[0] / 1e6) / bandwidth
                rows["fused_vs_bnb"] = rows["bnb_us"] / best[0]
            rows["default_tiles_us"] = triton.testing.do_bench(lambda: nf4_gemv(x, w), warmup=50, rep=200, return_mode="median") * 1000
        record(f"kernel {n}x{k}", **rows)
        del dense, layer, w
        free()


def section_nf4(checkpoint: Path) -> None:
    import bitsandbytes as bnb
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

    variants = (("fast (graphs + fused NF4 GEMV)", True, True), ("graphs + bitsandbytes kernel", True, False), ("fused NF4 GEMV, no graphs", False, True))
    for name, graphs, fused in variants:
        try:
            torch.cuda.reset_peak_memory_stats()
            decoder = FastDecoder(model, max_len=LONG_PROMPT + NEW_TOKENS + 16, use_graphs=graphs, fused_nf4=fused)
            result = decode_rate(fast_generate, decoder)
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

    free()
    sync()
    start = time.perf_counter()
    model, load_s = load(checkpoint, "nf4")
    token_quantized = first_token(model)
    sync()
    quantized_s = time.perf_counter() - start
    save_start = time.perf_counter()
    folder = nf4_cache.save(model, checkpoint, "nf4")
    save_s = time.perf_counter() - save_start
    with torch.no_grad():
        logits_quantized = model(torch.tensor([long[:64]], device="cuda")).logits.float()
    del model
    free()

    sync()
    start = time.perf_counter()
    cached_folder = nf4_cache.find(checkpoint, "nf4")
    model = nf4_cache.load(cached_folder, device_map="auto")
    sync()
    cache_load_s = time.perf_counter() - start
    token_cached = first_token(model)
    sync()
    cached_s = time.perf_counter() - start
    with torch.no_grad():
        logits_cached = model(torch.tensor([long[:64]], device="cuda")).logits.float()
    size = sum(p.stat().st_size for p in folder.iterdir())
    record("reload", quantize_on_load_first_token_s=quantized_s, quantize_load_s=load_s, cache_first_token_s=cached_s,
           cache_load_s=cache_load_s, speedup=quantized_s / cached_s, cache_save_s=save_s, cache_gb=size / 1e9,
           same_first_token=token_quantized == token_cached, logits_identical=bool(torch.equal(logits_quantized, logits_cached)),
           note="checkpoint and cache both just written: both read from the page cache", **memory())
    del model
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
        torch.cuda.reset_peak_memory_stats()
        decoder = FastDecoder(model, max_len=LONG_PROMPT + NEW_TOKENS + 16)
        result = decode_rate(fast_generate, decoder)
        same = first_difference(result["tokens"], baseline["tokens"])
        record("bf16 fast (graphs)", **{k: v for k, v in result.items() if k != "tokens"}, **memory(),
               vs_hf=result["decode_tok_s"] / baseline["decode_tok_s"], fraction_of_roofline=result["decode_tok_s"] / roofline,
               greedy_tokens_equal_hf=same is None, first_difference_at=same,
               **teacher_forced_logits(model, decoder, prompt(SHORT_PROMPT), baseline["tokens"][:64]))
    except Exception as error:
        record("bf16 fast (graphs)", error=repr(error), trace=traceback.format_exc()[-1500:])
    del model
    free()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--work", default="/tmp/cuda-speed")
    parser.add_argument("--sections", default="kernels,nf4,reload,bf16")
    args = parser.parse_args()
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
    if {"nf4", "reload", "bf16"} & set(sections):
        write_checkpoint(checkpoint)
        record("checkpoint", folder=str(checkpoint), seconds=time.perf_counter() - started)
    for name, run in (("nf4", lambda: section_nf4(checkpoint)), ("reload", lambda: section_reload(checkpoint, work)),
                      ("bf16", lambda: section_bf16(checkpoint))):
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

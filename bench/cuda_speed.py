"""CUDA speed: the article's recipe and runner's fast path, side by side, in one run on one GPU.

    PYTHONPATH=src:backends python3 bench/cuda_speed.py [--out DIR] [--work /tmp/cuda-speed] [--quick]
                                 [--source checkpoint|memory]
                                 [--sections kernels,nf4,reload,bf16,cold,rehearse,prefill,decode,position,ahead,fp8,gemv,rope]

Writes a Llama-3.1-8B-shaped checkpoint with random BF16 weights (config from runner's catalog),
then measures, each warm and with the same settings (batch 1, greedy, 256 new tokens, EOS off):
- the article's recipe: NF4 + double quant, BF16 compute, device_map="auto", HF `generate`;
- runner's fast path on the same loaded model (static KV cache, CUDA graphs, fused NF4 GEMV),
  and its parts alone (graphs with bitsandbytes' own kernel; the fused kernel without graphs);
- decode tokens/s, time to first token for a 1k-token prompt, load time, peak and resident memory;
- reload: quantize-on-load vs the NF4 cache, load + first token of the 1k prompt;
- BF16: HF generate vs the fast path, against the roofline;
- the copy bandwidth, measured here, for the rooflines: bandwidth / bytes read per token;
- `prefill`, `decode`, `position` (NF4, then BF16; one model and one session-sized fast decoder
  each): a 4k prompt through runner's session path against transformers' forward, with a profile
  by kernel kind; decode at position 1,024 against the roofline with a profile of a graphed step;
  decode tok/s at positions 100 to 8,000, every bucket's graph captured before the timed window;
- `ahead` (NF4, then BF16, as above): 128 greedy tokens at position 1,024 through runner's session
  (CudaSession.stream_tokens on the fast path), decoding a step ahead (the token picked on the GPU
  and fed to the next step before the host reads it) against the loop before it (each token read
  first), alternately in one process, against the roofline and a graph replayed back to back;
- `fp8`: torchao FP8 through the fast path against BF16's decode of the same run, and why (cuda_fp8.py);
- `gemv`: BF16 decode at position 1,024 with runner's Triton GEMV against cuBLAS, same model and run,
  and per projection shape µs of each.
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
SOURCE = "checkpoint"  # --source memory: random weights built on the GPU, no checkpoint on disk
MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"
OUT_FILE: Path | None = None
PREFILL_TOKENS = 4096  # the prefill section's prompt
SESSION_CONTEXT = 8192  # the decoder's cache in the prefill/decode/position sections (a session's --context)
POSITIONS = (100, 1000, 3000, 8000)
AHEAD_TOKENS = 128     # the ahead section's timed tokens, after the first


def log(*parts) -> None:
    print(*parts, flush=True)


def record(section: str, **values) -> None:
    RESULTS.setdefault(section, {}).update(values)
    log(f"[{section}]", json.dumps(values, default=str))
    if OUT_FILE is not None:     # after every record: a run stopped by its time limit keeps what it measured
        OUT_FILE.write_text(json.dumps(RESULTS, indent=2, default=str))


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

def write_checkpoint(folder: Path, vocab_size: int | None = None) -> None:
    """Llama-3.1-8B's config with random BF16 weights (std 0.02, norms 1), in 4 GB shards; with
    `vocab_size`, that many embedding and head rows instead of 128,256."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    catalog = json.loads((ROOT / "src/runner/catalog/meta-llama--Llama-3.1-8B-Instruct.json").read_text())
    catalog["vocab_size"] = vocab_size or catalog["vocab_size"]
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
    """The article's recipe (nf4) or plain BF16, device_map="auto". Returns (model, seconds).
    With --source memory: the same architecture with random weights built on the GPU and quantized
    by transformers' own quantize operation, as `runner rehearse` does (no checkpoint written or read)."""
    import torch
    from transformers import AutoModelForCausalLM

    sync()
    start = time.perf_counter()
    if SOURCE == "memory":
        from runner.model import load_spec
        from runner_cuda.rehearse import random_model

        model = random_model(load_spec(MODEL_ID), quant).eval()
        sync()
        return model, time.perf_counter() - start
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


# kernel names -> what they do, for the per-kind breakdowns (first match wins: flash attention's
# names contain "cutlass", torch's casts to e4m3 name "Float8")
KERNEL_KINDS = (
    ("dequantize (bitsandbytes)", ("dequantize",)),
    ("nf4 GEMV (runner)", ("nf4_gemv", "nf4_mma")),
    ("bf16 GEMV (runner, Triton)", ("dense_gemv",)),
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("fp8 GEMM", ("qqtst", "e4m3e4m3", "f8f8")),
    ("GEMM/GEMV (cuBLAS)", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas")),
    ("KV-cache write", ("index_copy", "index_put", "scatter")),
    ("fused elementwise (torch.compile)", ("triton_",)),
)


def kernel_kind(name: str) -> str:
    if name in ("part", "combine"):          # fast/attention.py's split-KV kernels (Triton)
        return "attention"
    lower = name.lower()
    for kind, marks in KERNEL_KINDS:
        if any(mark in lower for mark in marks):
            return kind
    return "other"


def by_kind(kernels, divide: float = 1.0) -> dict:
    """µs and launches per kernel kind (divided by `divide`: steps per profile)."""
    kinds: dict = {}
    for event in kernels:
        kind = kinds.setdefault(kernel_kind(event.name), [0.0, 0])
        kind[0] += (event.time_range.end - event.time_range.start) / divide
        kind[1] += 1 / divide
    return {name: {"us": round(us, 1), "launches": round(count, 1)} for name, (us, count) in sorted(kinds.items(), key=lambda item: -item[1][0])}


def profile_call(call) -> dict:
    """One call of `call` under torch.profiler: wall time, GPU kernels by kind, busy and span on the
    GPU (wall far above the span: the host is what holds it), the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        start = time.perf_counter()
        call()
        sync()
        wall = time.perf_counter() - start
    kernels = sorted((e for e in trace.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    busy = sum(e.time_range.end - e.time_range.start for e in kernels)
    span = kernels[-1].time_range.end - kernels[0].time_range.start if kernels else 0
    totals: dict = {}
    for event in kernels:
        name = event.name[:70]
        totals[name] = totals.get(name, 0.0) + event.time_range.end - event.time_range.start
    top = sorted(totals.items(), key=lambda item: -item[1])[:12]
    return {"wall_ms_profiled": wall * 1e3, "kernels": len(kernels), "kernel_busy_ms": busy / 1e3, "gpu_span_ms": span / 1e3,
            "by_kind_us": by_kind(kernels), "top_us": [(name, round(us, 1)) for name, us in top]}


def profile_graph(decoder, steps: int = 20, position: int = SHORT_PROMPT) -> dict:
    """Where a graphed decode step's time goes, `position` tokens into the cache: the kernels inside
    the graph (torch.profiler sees them), by kind, the step's span on the GPU (first kernel start to
    last kernel end), the gaps between kernels, and the host's time per token around it (argmax,
    reading the token back, the replay)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    decoder.reset()
    logits = decoder.prefill(prompt(position, seed=position))
    for _ in range(3):
        logits = decoder.step(int(logits.argmax()))
    sync()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as trace:
        for _ in range(steps):
            logits = decoder.step(int(logits.argmax()))
        sync()
    kernels = sorted((e for e in trace.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    busy = sum(e.time_range.end - e.time_range.start for e in kernels)
    span = kernels[-1].time_range.end - kernels[0].time_range.start if kernels else 0
    totals, counts = {}, {}
    for event in kernels:
        name = event.name[:60]
        totals[name] = totals.get(name, 0.0) + event.time_range.end - event.time_range.start
        counts[name] = counts.get(name, 0) + 1
    top = sorted(totals.items(), key=lambda item: -item[1])[:12]
    decoder.reset()
    logits = decoder.prefill(prompt(position, seed=position))
    sync()
    start = time.perf_counter()
    for _ in range(100):
        logits = decoder.step(int(logits.argmax()))
    sync()
    host_us = (time.perf_counter() - start) / 100 * 1e6
    replay_us = graph_replay_us(decoder)
    return {"kernels_per_token": len(kernels) / steps, "kernel_busy_us_per_token": busy / steps,
            "gpu_span_us_per_token": span / steps, "gaps_us_per_token": (span - busy) / steps,
            "graph_replay_back_to_back_us": replay_us, "host_loop_us_per_token": host_us,
            "host_overhead_us_per_token": host_us - replay_us, "by_kind_us_per_token": by_kind(kernels, steps),
            "top": [(name, round(us / steps, 1), counts[name] // steps) for name, us in top]}


def graph_replay_us(decoder, replays: int = 100) -> float:
    """µs a step of the graph for the decoder's next position, replayed back to back: the GPU's
    time for a token with no host in between (each replay at the position after the one before)."""
    import torch

    if decoder.length + replays >= decoder.max_len:
        raise ValueError(f"{replays} replays from position {decoder.length} pass the cache's {decoder.max_len}")
    graph = decoder._graph(decoder.segments[0], decoder._bucket(decoder.length + 1))
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    # each replay's pick moved the position on: the next step refills it (revisions before have none)
    getattr(decoder, "_positions_at", {}).clear()
    return begin.elapsed_time(end) * 1e3 / replays


def rate_by_position(decoder, positions=POSITIONS, tokens: int = 64) -> dict:
    """Decode tok/s at several positions: prefill a prompt of that length, one step, then `tokens`
    timed steps (the token read back each step, as a session does). Each window runs twice and the
    second is timed, so the graph of every bucket it crosses is captured before the timed window."""
    rates = {}
    for position in positions:
        decode_at(decoder, position, tokens, warm=1)
        rates[f"tok_s_at_{position}"] = decode_at(decoder, position, tokens, warm=1)
    first = positions[0]
    for position in positions[1:]:
        rates[f"at_{position}_vs_{first}"] = rates[f"tok_s_at_{position}"] / rates[f"tok_s_at_{first}"]
    rates["graphs_captured"] = sorted(decoder.segments[0].graphs)
    return rates


def decode_at(decoder, position: int, tokens: int = 128, warm: int = 8) -> float:
    """tok/s of `tokens` greedy steps after a `position`-token prompt, the token read back each
    step; `warm` steps first (they capture the bucket's graph)."""
    decoder.reset()
    logits = decoder.prefill(prompt(position, seed=position))
    for _ in range(warm):
        logits = decoder.step(int(logits.argmax()))
    sync()
    start = time.perf_counter()
    for _ in range(tokens):
        logits = decoder.step(int(logits.argmax()))
    sync()
    return tokens / (time.perf_counter() - start)


def session_over(model, decoder, quant: str, spec):
    """A CudaSession on `model` with `decoder`'s fast steps, as the backend attaches them: SmolLM2's
    tokenizer (RUNNER_TEST_TOKENIZER, else .devtok) for the detokenizing every reply does, and no
    end-of-sequence id, so each reply runs to its max_tokens."""
    import torch
    from transformers import AutoTokenizer

    from runner_cuda.fast import FastSteps
    from runner_cuda.session import CudaSession

    tokenizer = AutoTokenizer.from_pretrained(os.environ.get("RUNNER_TEST_TOKENIZER") or str(ROOT / ".devtok"))
    on_cuda = decoder.device.type == "cuda"
    session = CudaSession(model, tokenizer, spec, quant, decoder.max_len, None, quant, "sdpa",
                          {str(decoder.device): 0} if on_cuda else {},
                          [torch.cuda.get_device_name(decoder.device)] if on_cuda else [])
    session.use_steps(FastSteps(decoder))
    session.eos_ids = set()
    return session


def decode_ahead(session, position: int = 1024, repeats: int = 3) -> dict:
    """AHEAD_TOKENS greedy tokens after a `position`-token prompt through `session.stream_tokens`
    (as `runner generate` streams), a step ahead and in turn, alternately, each after one untimed
    reply: tok/s by the session's own clock (the last chunk's generation_tps, from the first token
    to the last), and µs a token against the step's graph replayed back to back."""
    from runner.backend import Sampling

    ids = prompt(position, seed=position)
    sampling = Sampling(max_tokens=AHEAD_TOKENS + 1)
    rates: dict = {"in_turn": [], "ahead": []}
    tokens: dict = {}
    for round_ in range(repeats + 1):
        for mode in rates:
            session.step_ahead = mode == "ahead"
            chunks = list(session.stream_tokens(ids, sampling))
            tokens[mode] = [c.token for c in chunks]
            if round_:
                rates[mode].append(chunks[-1].generation_tps)
    session.step_ahead = True
    out = {"tok_s_" + mode: r for mode, r in rates.items()}
    best = {mode: max(r) for mode, r in rates.items()}
    out.update(ahead_vs_in_turn=best["ahead"] / best["in_turn"], same_tokens=tokens["ahead"] == tokens["in_turn"],
               us_per_token_in_turn=1e6 / best["in_turn"], us_per_token_ahead=1e6 / best["ahead"])
    decoder = session.forward_step.__self__.decoder
    if decoder.use_graphs:       # the GPU's floor: the same bucket's graph, replayed back to back
        out["graph_replay_back_to_back_us"] = graph_replay_us(decoder)
        for mode in rates:
            out[f"host_us_per_token_{mode}"] = out[f"us_per_token_{mode}"] - out["graph_replay_back_to_back_us"]
    return out


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


# a Llama-8B layer's NF4Mma launches: name -> (weights' (out, in) shapes, how it is fused: "norm" q/k/v with
# the RMSNorm inside, "residual" adding into the residual stream, "glu" gate/up with RMSNorm and SiLU x up)
LAUNCHES_8B = {"qkv": (((4096, 4096), (1024, 4096), (1024, 4096)), "norm"), "o": (((4096, 4096),), "residual"),
               "gate_up": (((14336, 4096), (14336, 4096)), "glu"), "down": (((4096, 14336),), "residual")}


def fused_options(mode: str, k: int) -> dict:
    """NF4Mma's keyword arguments for a launch fused as `mode` (LAUNCHES_8B), with a random norm weight."""
    import torch

    norm = (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)
    return {"norm": dict(norm=norm, eps=1e-5), "residual": dict(residual=True),
            "glu": dict(glu=True, norm=norm, eps=1e-5)}[mode]


def nf4_layer(n: int, k: int):
    """A bitsandbytes NF4 (double quant) Linear of random N(0, 0.02) weights, on the GPU."""
    import bitsandbytes as bnb
    import torch

    dense = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
    torch.nn.init.normal_(dense.weight, std=0.02)
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.cuda()


def copies_beyond_l2(shapes) -> int:
    """How many copies of a launch's NF4 weights (shapes: (out, in) pairs) a timing graph cycles
    through so that L2 (50-60 MB) cannot hold them: ~200 MB, two at least (never the same copy twice
    in a row), eight at most."""
    return max(2, min(8, int(200e6 // sum(n * k // 2 for n, k in shapes))))


def section_kernels() -> None:
    """runner's NF4 kernels against bitsandbytes' batch-1 kernel, per Llama-8B layer launch, timed
    inside CUDA graphs over enough copies of the weights that L2 (50-60 MB) cannot hold them: the
    tensor-core kernel (NF4Mma) as the decoder launches it (q/k/v with the RMSNorm inside, o and down
    adding into the residual, gate/up with the RMSNorm and SiLU x up inside), over its warps x split
    choices, and at its default shape launched one after another (not overlapping the launch before);
    the SIMT kernel (NF4Gemv) and bitsandbytes on the bare projections."""
    import torch

    from runner_cuda.fast.nf4 import dequantize_reference, nf4_weight_of
    from runner_cuda.fast.nf4_cuda import NF4Gemv, NF4Mma, mma_shape

    bandwidth = RESULTS["machine"]["copy_bandwidth_gb_s"] * 1e9
    choices = ((8, 8), (8, 4), (8, 2), (8, 1), (7, 1), (14, 1), (4, 4), (4, 1), (16, 16), (16, 8), (16, 4))

    layer_us = {"bnb": 0.0, "simt": 0.0, "mma": 0.0, "mma_best": 0.0}
    for name, (shapes, mode) in LAUNCHES_8B.items():
        k = shapes[0][1]
        copies = copies_beyond_l2(shapes)
        groups = [[nf4_layer(n, k) for n, k in shapes] for _ in range(copies)]
        weights = [[nf4_weight_of(layer) for layer in group] for group in groups]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        residual = torch.zeros(shapes[0][0], device="cuda", dtype=torch.bfloat16)
        nf4_bytes = sum(w.packed.numel() + w.absmax.numel() for w in weights[0])
        rows = {"copies": copies, "nf4_mb": nf4_bytes / 1e6, "mma_fused": mode}
        options = fused_options(mode, k)

        def mma_calls(weights=weights, options=options, **shape):
            return [NF4Mma(group, **options, **shape) for group in weights]

        def run_mma(calls, x=x, residual=residual, mode=mode):
            return (lambda i: calls[i](x, out=residual)) if mode == "residual" else (lambda i: calls[i](x))

        with torch.no_grad():
            exact = torch.cat([torch.nn.functional.linear(x.double(), dequantize_reference(w).double()) for w in weights[0]], dim=-1)
            theirs = torch.cat([layer(x).float() for layer in groups[0]], dim=-1)
            rows["bnb_rel_err_vs_exact"] = ((theirs - exact).norm() / exact.norm()).item()
            rows["bnb_us"] = graph_time_us(lambda i, groups=groups: [layer(x) for layer in groups[i]], copies)
            simt = [NF4Gemv(group) for group in weights]
            mine = simt[0](x).float()
            rows["simt_us"] = graph_time_us(lambda i: simt[i](x), copies)
            rows["simt_rel_err_vs_exact"] = ((mine - exact).norm() / exact.norm()).item()
            plain = NF4Mma(weights[0])(x).float()
            rows["mma_rel_err_vs_exact"] = ((plain - exact).norm() / exact.norm()).item()
            rows["mma_rel_diff_vs_simt"] = ((plain - mine).norm() / mine.norm()).item()
            rows["mma_bare_us"] = graph_time_us(lambda i, calls=[NF4Mma(group) for group in weights]: calls[i](x), copies)
            best = None
            for warps, split in choices:
                label = f"mma_w{warps}s{split}"
                try:
                    us = graph_time_us(run_mma(mma_calls(warps=warps, split=split)), copies)
                except Exception as error:  # a shape that does not launch: say so, keep the others
                    rows[f"{label}_error"] = repr(error)[:200]
                    continue
                rows[f"{label}_us"] = round(us, 2)
                if best is None or us < best[0]:
                    best = (us, (warps, split))
            default = mma_shape(weights[0], mode == "glu")
            rows.update(mma_default=default, mma_default_us=graph_time_us(run_mma(mma_calls()), copies),
                        mma_best=best[1], mma_best_us=best[0])
            # the launches overlapping the one before (Hopper's default) against one after another
            rows["mma_default_not_overlapping_us"] = graph_time_us(run_mma(mma_calls(overlap=False)), copies)
            rows.update(mma_tb_s=nf4_bytes / rows["mma_default_us"] / 1e6,
                        mma_fraction_of_copy_bw=nf4_bytes / (rows["mma_default_us"] / 1e6) / bandwidth,
                        simt_fraction_of_copy_bw=nf4_bytes / (rows["simt_us"] / 1e6) / bandwidth,
                        mma_vs_bnb=rows["bnb_us"] / rows["mma_default_us"], mma_vs_simt=rows["simt_us"] / rows["mma_default_us"])
        for key, column in (("bnb", "bnb_us"), ("simt", "simt_us"), ("mma", "mma_default_us"), ("mma_best", "mma_best_us")):
            layer_us[key] += rows[column]
        record(f"kernel {name}", **rows)
        del groups, weights
        free()
    record("kernel one layer (us)", **layer_us, mma_vs_simt=layer_us["simt"] / layer_us["mma"],
           mma_vs_bnb=layer_us["bnb"] / layer_us["mma"])


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
        ("fast (graphs, runner's tensor-core NF4 kernel with the norms inside)", dict()),
        ("fast, runner's SIMT NF4 kernel (the previous default)", dict(nf4_kernel="cuda-simt")),
        ("fast, runner's SIMT kernel rounding as bitsandbytes", dict(nf4_kernel="cuda-bnb-rounding")),
        ("fast, bitsandbytes kernel", dict(nf4_kernel="bitsandbytes")),
        ("graphs only, bitsandbytes kernel", dict(compile_ops=False, nf4_kernel="bitsandbytes")),
    )
    for name, options in variants[:2] if QUICK else variants:
        try:
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            decoder = FastDecoder(model, max_len=LONG_PROMPT + NEW_TOKENS + 16, **options)
            fast_generate(decoder, prompt(SHORT_PROMPT), 300)      # compiles, captures the graphs
            first_use_s = time.perf_counter() - started
            result = decode_rate(fast_generate, decoder)
            result["first_use_s"] = first_use_s
            if len(options) < 2 and options.get("nf4_kernel", "cuda") in ("cuda", "cuda-simt"):
                label = "tensor-core kernel" if not options else "SIMT kernel"
                record(f"nf4 profile, {label} (eager step, GPU time per token)", **profile_step(decoder))
                record(f"nf4 profile, {label} (graphed step)", **profile_graph(decoder))
                if not options:
                    by_position = FastDecoder(model, max_len=max(POSITIONS) + 80)
                    record("nf4 decode against position (tensor-core kernel)", **rate_by_position(by_position))
                    del by_position
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


def section_rehearse() -> None:
    """`runner rehearse` of the 8B in NF4 at 4k context on this GPU: decoding through the fast path
    (what a session here does) and through transformers' loop (what it timed before), same run."""
    from runner.budget import make_plan
    from runner.hardware import resolve_machine
    from runner.model import load_spec
    from runner_cuda.rehearse import rehearse

    plan = make_plan(load_spec(MODEL_ID), resolve_machine(None), "nf4", 4096, backend="cuda")
    for fast_decode in (True, False):
        free()
        result = rehearse(plan, decode_tokens=64, fast_decode=fast_decode)
        (device,) = result.devices
        record(f"rehearse 8B nf4 4k, {result.decode_path} decode", decode_tok_s=result.decode_tokens_per_s,
               roofline_tok_s=result.roofline_tokens_per_s, fraction_of_plan_roofline=result.decode_tokens_per_s / result.roofline_tokens_per_s,
               prefill_tok_s=result.prefill_tokens_per_s, warm_up_s=result.warm_up_seconds, load_s=result.load_seconds,
               weights_gb=device.weights / 1e9, planned_weights_gb=device.planned_weights / 1e9, kv_gb=device.kv_cache / 1e9,
               planned_kv_gb=device.planned_kv_cache / 1e9, peak_gb=device.peak / 1e9, planned_total_gb=device.planned_total / 1e9,
               reason=result.decode_path_reason)
    free()


def timed(call, repeats: int = 3) -> list[float]:
    """Seconds of `call`, synchronized, after one untimed warm-up call; sorted (median in the middle)."""
    call()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)


def dequantize_all(model) -> dict:
    """bitsandbytes' dequantize of every NF4 weight once, as the prefill's linears do per chunk:
    time and bytes/s (packed weights and absmax read, bf16 written)."""
    import math

    import bitsandbytes.functional as F

    weights = [m.weight for m in model.modules() if type(m).__name__ == "Linear4bit"]

    def run():
        for weight in weights:
            F.dequantize_4bit(weight, weight.quant_state)

    times = timed(run)
    moved = sum(math.prod(w.quant_state.shape) * 2 + w.numel() + w.quant_state.absmax.numel() for w in weights)
    return {"dequantize_every_weight_once_ms": times[1] * 1e3, "dequantize_gb_s": moved / times[1] / 1e9,
            "dequantize_bytes_gb": moved / 1e9, "dequantize_calls": len(weights)}


def prefill_rates(model, decoder, quant: str) -> dict:
    """A PREFILL_TOKENS-token prompt: runner's session path (the fast decoder's prefill, chunks of
    budget.PREFILL_CHUNK, as `runner generate` and the chat run it), transformers' own forward over
    the whole prompt, and the ordinary session loop (transformers' forward in chunks with a
    DynamicCache); the median of 3 after a warm-up each. Logits of the last position against
    transformers' forward, and a torch.profiler breakdown of one prefill on runner's path."""
    import torch
    from transformers import DynamicCache

    from runner.budget import PREFILL_CHUNK
    from runner_cuda.session import cache_argument, forward_in_chunks

    ids = prompt(PREFILL_TOKENS, seed=4)
    tensor = torch.tensor([ids], device=decoder.device)
    name = cache_argument(model)

    def runner_prefill():
        decoder.reset()
        return decoder.prefill(ids)

    def hf_forward():
        with torch.no_grad():
            return model(input_ids=tensor, use_cache=False, logits_to_keep=1).logits[0, -1].float()

    def hf_chunked():
        return forward_in_chunks(model, tensor, DynamicCache(config=model.config), PREFILL_CHUNK, name)[0, -1].float()

    out = {"prompt_tokens": PREFILL_TOKENS, "chunk": PREFILL_CHUNK}
    for label, call in (("runner", runner_prefill), ("hf_forward", hf_forward), ("hf_chunked", hf_chunked)):
        times = timed(call)
        out[f"{label}_tok_s"] = PREFILL_TOKENS / times[1]
        out[f"{label}_s"] = [round(t, 4) for t in times]
    out["runner_vs_hf_forward"] = out["runner_tok_s"] / out["hf_forward_tok_s"]
    out["runner_vs_hf_chunked"] = out["runner_tok_s"] / out["hf_chunked_tok_s"]
    mine, theirs = runner_prefill().clone(), hf_forward()
    out.update(max_abs_logit_diff=(mine - theirs).abs().max().item(), logit_scale=theirs.abs().max().item(),
               same_argmax=bool(mine.argmax() == theirs.argmax()))
    out["profile_runner"] = profile_call(runner_prefill)
    if quant == "nf4":
        out.update(dequantize_all(model))
    return out


def section_session(checkpoint: Path, quant: str, parts: set) -> None:
    """The 8B shape in `quant` through runner's session path (FastDecoder with a SESSION_CONTEXT
    cache, as the CUDA backend attaches it): `prefill` (4k prompt against transformers' forward),
    `decode` (tok/s at position 1,024 against the roofline of weights + KV read, two runs, and a
    profile of one graphed step there), `position` (tok/s at POSITIONS), `ahead` (the session's
    decode a step ahead against in turn at position 1,024, against the same roofline)."""
    from runner import budget
    from runner.model import load_spec
    from runner_cuda.fast.decoder import FastDecoder

    free()
    model, seconds = load(checkpoint, quant)
    bandwidth = RESULTS["machine"]["copy_bandwidth_gb_s"] * 1e9
    per_token = bytes_read_per_token(model)
    record(f"{quant} model", load_s=seconds, bytes_per_token=per_token, weights_roofline_tok_s=bandwidth / per_token, **memory())
    started = time.perf_counter()
    decoder = FastDecoder(model, max_len=SESSION_CONTEXT)
    decoder.warm_up()
    record(f"{quant} model", fast_path_warm_up_s=time.perf_counter() - started, nf4_kernel=decoder.nf4_kernel,
           nf4_fused=decoder.nf4_fused, split_kv=decoder.split_kv)
    if "prefill" in parts:
        try:
            record(f"{quant} prefill, {PREFILL_TOKENS} tokens", **prefill_rates(model, decoder, quant))
        except Exception as error:
            record(f"{quant} prefill, {PREFILL_TOKENS} tokens", error=repr(error), trace=traceback.format_exc()[-1500:])
    if "decode" in parts:
        position = 1024
        try:
            rates = [decode_at(decoder, position) for _ in range(2)]
            kv = budget.kv_cache_bytes(load_spec(MODEL_ID), position + 8 + 64, 1, quant, "cuda")
            roofline = bandwidth / (per_token + kv)
            record(f"{quant} decode at {position}", tok_s=rates, roofline_tok_s=roofline, fraction_of_roofline=max(rates) / roofline,
                   kv_read_gb=kv / 1e9)
            record(f"{quant} profile, graphed step at {position}", **profile_graph(decoder, position=position))
        except Exception as error:
            record(f"{quant} decode at {position}", error=repr(error), trace=traceback.format_exc()[-1500:])
    if "position" in parts:
        try:
            record(f"{quant} decode against position", **rate_by_position(decoder))
        except Exception as error:
            record(f"{quant} decode against position", error=repr(error), trace=traceback.format_exc()[-1500:])
    if "ahead" in parts:
        position = 1024
        try:
            rates = decode_ahead(session_over(model, decoder, quant, load_spec(MODEL_ID)), position)
            kv = budget.kv_cache_bytes(load_spec(MODEL_ID), position + AHEAD_TOKENS, 1, quant, "cuda")
            roofline = bandwidth / (per_token + kv)
            record(f"{quant} session decode ahead at {position}", **rates, roofline_tok_s=roofline, kv_read_gb=kv / 1e9,
                   fraction_of_roofline_in_turn=max(rates["tok_s_in_turn"]) / roofline,
                   fraction_of_roofline_ahead=max(rates["tok_s_ahead"]) / roofline,
                   projections=getattr(decoder, "gemv_choice", None))
        except Exception as error:
            record(f"{quant} session decode ahead at {position}", error=repr(error), trace=traceback.format_exc()[-1500:])
    del decoder, model
    free()


def section_fp8() -> None:
    """`--quant fp8` (torchao, per-row e4m3) on the full 8B shape through the fast path: decode at
    position 1,024 against BF16's in the same run and against its own roofline, a profile of one
    graphed step, and per-projection GEMV timings (cuBLAS BF16, torchao FP8 at batch 1, a weight-only
    FP8 GEMV prototype) with the decode speed that prototype would give (bench/cuda_fp8.py)."""
    import cuda_fp8

    from runner.model import load_spec
    from runner_cuda.fast.decoder import FastDecoder

    position = 1024
    bandwidth = RESULTS["machine"]["copy_bandwidth_gb_s"] * 1e9
    free()
    sync()
    started = time.perf_counter()
    model = cuda_fp8.fp8_model(load_spec(MODEL_ID))
    sync()
    per_token = cuda_fp8.bytes_read_per_token(model)
    record("fp8 model", load_s=time.perf_counter() - started, bytes_per_token=per_token, **memory(),
           projection=type(model.model.layers[0].mlp.up_proj.weight).__name__)
    try:
        decoder = FastDecoder(model, max_len=2048)
        decoder.warm_up()
        rates = [decode_at(decoder, position) for _ in range(2)]
        bf16 = RESULTS.get(f"bf16 decode at {position}", {}).get("tok_s")
        roofline = bandwidth / per_token
        record(f"fp8 decode at {position}", tok_s=rates, weights_roofline_tok_s=roofline, fraction_of_roofline=max(rates) / roofline,
               vs_bf16=max(rates) / max(bf16) if bf16 else None)
        record(f"fp8 profile, graphed step at {position}", **profile_graph(decoder, position=position))
        del decoder
    except Exception as error:
        record(f"fp8 decode at {position}", error=repr(error), trace=traceback.format_exc()[-1500:])
    del model
    free()
    probe = cuda_fp8.gemv_probe(graph_time_us)
    bf16 = RESULTS.get(f"bf16 decode at {position}", {}).get("tok_s")
    if bf16:       # BF16's step with its layers' GEMVs swapped for the prototype's
        layers = 32
        step = 1e6 / max(bf16)
        predicted = step - layers * probe["layer_us"]["cublas_bf16"] + layers * probe["layer_us"]["triton_fp8"]
        probe.update(bf16_step_us=step, predicted_fp8_step_us=predicted, predicted_fp8_vs_bf16=step / predicted,
                     torchao_layer_vs_cublas_bf16=probe["layer_us"]["cublas_bf16"] / probe["layer_us"]["torchao_fp8"])
    record("fp8 GEMV probe", **probe)
    free()


def section_gemv(checkpoint: Path) -> None:
    """BF16 decode through runner's Triton GEMV (fast/gemv.py: per shape the fastest of its
    configurations and cuBLAS, timed at load) against the same decoder on cuBLAS throughout
    (FastDecoder(gemv=False)): one model, both decoders alive, runs alternated; tok/s at position
    1,024 against the roofline of the weights and KV read per token; greedy tokens and logits of the
    two; a profile of a graphed step of each; the load sweep's µs per candidate; and per shape, µs of
    cuBLAS and of each configuration in CUDA graphs over all layers' own weights (32 x the bytes of
    one: from memory, not L2)."""
    import torch

    from runner import budget
    from runner.model import load_spec
    from runner_cuda.fast import gemv
    from runner_cuda.fast.decoder import FastDecoder

    position = 1024
    free()
    model, seconds = load(checkpoint, "bf16")
    bandwidth = RESULTS["machine"]["copy_bandwidth_gb_s"] * 1e9
    per_token = bytes_read_per_token(model)
    kv = budget.kv_cache_bytes(load_spec(MODEL_ID), position + 8 + 64, 1, "bf16", "cuda")
    roofline = bandwidth / (per_token + kv)
    decoders = {}
    for label, option in (("gemv", None), ("cublas", False)):
        started = time.perf_counter()
        decoders[label] = FastDecoder(model, max_len=SESSION_CONTEXT, gemv=option)
        built = time.perf_counter() - started
        decoders[label].warm_up()
        record("gemv decoders", **{f"{label}_build_s": built, f"{label}_build_and_warm_up_s": time.perf_counter() - started})
    record("gemv decoders", choice=decoders["gemv"].gemv_choice, bytes_per_token=per_token, kv_read_gb=kv / 1e9,
           sweep_us={"x".join(map(str, key[1])): times for key, times in gemv.SWEEPS.items()})
    rates: dict = {"gemv": [], "cublas": []}
    for _ in range(2):
        for label, decoder in decoders.items():
            rates[label].append(decode_at(decoder, position))
    best = {label: max(values) for label, values in rates.items()}
    record(f"gemv decode at {position}", gemv_tok_s=rates["gemv"], cublas_tok_s=rates["cublas"], roofline_tok_s=roofline,
           gemv_vs_cublas=best["gemv"] / best["cublas"], gemv_fraction_of_roofline=best["gemv"] / roofline,
           cublas_fraction_of_roofline=best["cublas"] / roofline,
           step_us={label: 1e6 / value for label, value in best.items()})
    logits, tokens = {}, {}
    for label, decoder in decoders.items():
        decoder.reset()
        steps = [decoder.prefill(prompt(position, seed=position)).clone()]
        tokens[label] = []
        for _ in range(64):
            tokens[label].append(int(steps[-1].argmax()))
            steps.append(decoder.step(tokens[label][-1]).clone())
        logits[label] = torch.stack(steps).double()
    agree = first_difference(tokens["gemv"], tokens["cublas"])
    end = 65 if agree is None else agree + 1
    top2 = logits["cublas"][end - 1].topk(2).values      # where the two picked apart (both from the same tokens)
    # both decoders teacher-forced on cuBLAS's tokens, each against transformers' own forward over
    # the whole sequence (bf16, cuBLAS GEMMs): the GEMV's distance beside the fast path's own
    sequence = prompt(position, seed=position) + tokens["cublas"]
    with torch.no_grad():
        hf = model(torch.tensor([sequence], device="cuda"), logits_to_keep=65).logits[0].double()
    forced = {}
    for label, decoder in decoders.items():
        decoder.reset()
        steps = [decoder.prefill(prompt(position, seed=position)).clone()]
        steps += [decoder.step(token).clone() for token in tokens["cublas"]]
        forced[label] = torch.stack(steps).double()
    record("gemv against cublas, 64 greedy tokens at 1,024", first_difference=agree,
           relative_logits_difference=((logits["gemv"][:end] - logits["cublas"][:end]).norm() / logits["cublas"][:end].norm()).item(),
           cublas_top2_margin_at_first_difference=(top2[0] - top2[1]).item() if agree is not None else None,
           teacher_forced_vs_hf_forward={label: ((f - hf).norm() / hf.norm()).item() for label, f in forced.items()},
           teacher_forced_gemv_vs_cublas=((forced["gemv"] - forced["cublas"]).norm() / forced["cublas"].norm()).item(),
           teacher_forced_argmax_vs_hf={label: (f.argmax(-1) == hf.argmax(-1)).float().mean().item() for label, f in forced.items()})
    for label, decoder in decoders.items():
        record(f"gemv profile {label}, graphed step at {position}", **profile_graph(decoder, position=position))
    mine = decoders["gemv"]
    groups = {"qkv": [weight for weight, _ in mine.qkv], "o": [l.self_attn.o_proj.weight for l in mine.layers],
              "gate_up": [weight for weight, _ in mine.gate_up], "down": [l.mlp.down_proj.weight for l in mine.layers]}
    layer = {"cublas": 0.0, "chosen": 0.0}
    with torch.no_grad():
        for group, weights in groups.items():
            x = torch.randn(1, weights[0].shape[1], device="cuda").to(weights[0].dtype)
            row = {"shape": list(weights[0].shape), "mb": weights[0].numel() * weights[0].element_size() / 1e6}
            row["cublas_us"] = graph_time_us(lambda i: torch.nn.functional.linear(x, weights[i]), len(weights))
            for config in gemv.CONFIGS:
                row[f"{gemv.name_of(config)}_us"] = graph_time_us(lambda i: gemv.gemv(weights[i], x, None, config), len(weights))
            row["chosen"] = mine.gemv_choice[group]
            row["chosen_us"] = row[f"{row['chosen']}_us"]
            row["chosen_vs_cublas"] = row["cublas_us"] / row["chosen_us"]
            for label in ("cublas", "chosen"):
                row[f"{label}_of_copy_bandwidth"] = row["mb"] * 1e6 / (row[f"{label}_us"] * 1e-6) / bandwidth
                layer[label] += row[f"{label}_us"]
            record(f"gemv shape {group}", **row)
    record("gemv layer", cublas_us=layer["cublas"], chosen_us=layer["chosen"], chosen_vs_cublas=layer["cublas"] / layer["chosen"],
           per_token_saving_us=len(mine.layers) * (layer["cublas"] - layer["chosen"]))
    del decoders, mine, model
    free()


def section_rope() -> None:
    """A graphed NF4 and BF16 decode step (8B shape, random weights, position 1,024) with RoPE and
    the cache write in each of the decoder's places for them (ROPE_PLACES: the attention's launch,
    the default; one launch of their own; torch's operations apart), same process, graphs replayed
    back to back."""
    from runner_cuda.fast.decoder import ROPE_PLACES, FastDecoder

    bandwidth = RESULTS["machine"]["copy_bandwidth_gb_s"] * 1e9
    for quant in ("nf4", "bf16"):
        model, _ = load(Path("."), quant)
        per_token = bytes_read_per_token(model)
        row = {}
        for place in ROPE_PLACES:
            decoder = FastDecoder(model, max_len=SESSION_CONTEXT, rope=place)
            decoder.prefill(prompt(1024))
            row[f"{place}_us"] = min(graph_replay_us(decoder) for _ in range(3))
            row[f"{place}_fraction_of_roofline"] = per_token / bandwidth / (row[f"{place}_us"] / 1e6)
            del decoder
            free()
        record(f"rope, {quant}", **row, **{f"{place}_speedup": row[f"{place}_us"] / row[f"{ROPE_PLACES[0]}_us"]
                                           for place in ROPE_PLACES[1:]})
        del model
        free()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--work", default="/tmp/cuda-speed")
    parser.add_argument("--sections", default="kernels,nf4,reload,bf16,cold,rehearse",
                        help="also: prefill, decode, position, ahead (NF4 then BF16, one model each), fp8, gemv (BF16 decode: "
                             "runner's Triton GEMV against cuBLAS)")
    parser.add_argument("--quick", action="store_true", help="runner's default fast path only, no ablation variants")
    parser.add_argument("--source", choices=("checkpoint", "memory"), default="checkpoint",
                        help="nf4/bf16 sections: load the written checkpoint, or build random weights on the GPU")
    args = parser.parse_args()
    global QUICK, SOURCE, OUT_FILE
    QUICK, SOURCE = args.quick, args.source
    OUT_FILE = Path(args.out, "cuda_speed.json")
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
    if {"reload", "cold"} & set(sections) or ({"nf4", "bf16", "prefill", "decode", "position", "ahead", "gemv"} & set(sections) and SOURCE == "checkpoint"):
        write_checkpoint(checkpoint)
        record("checkpoint", folder=str(checkpoint), seconds=time.perf_counter() - started)
    for name, run in (("nf4", lambda: section_nf4(checkpoint)), ("reload", lambda: section_reload(checkpoint, work)),
                      ("bf16", lambda: section_bf16(checkpoint)), ("cold", lambda: section_reload_cold(checkpoint, work)),
                      ("rehearse", section_rehearse)):
        if name in sections:
            try:
                run()
            except Exception as error:
                record(name, error=repr(error), trace=traceback.format_exc()[-2000:])
            Path(args.out, "cuda_speed.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    session_parts = {"prefill", "decode", "position", "ahead"} & set(sections)
    for quant in ("nf4", "bf16") if session_parts else ():
        try:
            section_session(checkpoint, quant, session_parts)
        except Exception as error:
            record(f"{quant} session path", error=repr(error), trace=traceback.format_exc()[-2000:])
    if session_parts:
        seventh_summary()
        ahead_summary()
    if "rope" in sections:
        section_rope()
    if "gemv" in sections:
        try:
            section_gemv(checkpoint)
        except Exception as error:
            record("gemv", error=repr(error), trace=traceback.format_exc()[-2000:])
    if "fp8" in sections:
        try:
            section_fp8()
        except Exception as error:
            record("fp8", error=repr(error), trace=traceback.format_exc()[-2000:])
    Path(args.out, "cuda_speed.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    summary()


def seventh_summary() -> None:
    """The ratios the prefill/decode/position sections are read for, each against its same-run baseline."""
    nf4, bf16 = RESULTS.get(f"nf4 prefill, {PREFILL_TOKENS} tokens", {}), RESULTS.get(f"bf16 prefill, {PREFILL_TOKENS} tokens", {})
    if "runner_tok_s" in nf4 and "runner_tok_s" in bf16:
        record("prefill ratios", nf4_vs_bf16_runner=nf4["runner_tok_s"] / bf16["runner_tok_s"],
               nf4_vs_bf16_hf_forward=nf4["hf_forward_tok_s"] / bf16["hf_forward_tok_s"],
               nf4_runner_vs_hf_forward=nf4["runner_vs_hf_forward"], bf16_runner_vs_hf_forward=bf16["runner_vs_hf_forward"])


def ahead_summary() -> None:
    """The ahead section's ratios, NF4 and BF16, each against the in-turn loop of the same run."""
    values = {}
    for quant in ("nf4", "bf16"):
        ahead = RESULTS.get(f"{quant} session decode ahead at 1024", {})
        if "ahead_vs_in_turn" in ahead:
            values.update({f"{quant}_ahead_vs_in_turn": ahead["ahead_vs_in_turn"],
                           f"{quant}_roofline_in_turn": ahead["fraction_of_roofline_in_turn"],
                           f"{quant}_roofline_ahead": ahead["fraction_of_roofline_ahead"]})
    if values:
        record("ahead ratios", **values)


def summary() -> None:
    log("\n==== summary ====")
    for section, values in RESULTS.items():
        keep = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items() if k not in ("trace",)}
        log(f"{section:40s} {json.dumps(keep, default=str)}")


if __name__ == "__main__":
    main()

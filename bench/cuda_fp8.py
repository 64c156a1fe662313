"""`--quant fp8` (torchao, per-row e4m3) through runner's CUDA backend, against BF16 on the same model.

Run on a GPU of compute capability 8.9+ with torchao installed (the GPU image lacks it: carry the
wheel, e.g. torchao 0.18.0 for torch 2.11, and platformdirs, which `runner.paths` needs):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl-fp8/*.whl
    PYTHONPATH=/tmp/site:$PWD/.whl-fp8/pyextra:$PWD/src:$PWD/backends \\
        python3 bench/cuda_fp8.py --tokenizer .bench-tokenizer --out $OUT

What it does, each part reported even when another fails:
  1. writes a Llama-3.1-8B-shaped checkpoint cut to --layers decoder layers (bench/cuda_load.py's
     writer: random bf16 weights, the real config, SmolLM2's tokenizer), and a tiny Llama (the
     tests' shape: hidden 64, 2 layers);
  2. `runner generate FOLDER -p Hello --quant fp8 --max-tokens 16 --json` in a fresh process;
  3. bench/cuda_load.py's `measure` in fp8 and bf16 (placement, measured vs planned bytes, tok/s);
  4. BF16 vs FP8 on both models: the prompt's logits (cosine, relative error, top-1 agreement
     over positions) and 16 greedy tokens; and FP8's streamed greedy tokens (fast path, if it
     attached) against its own argmax continuation through full forwards.
The weights are random, so the text is meaningless: this measures memory, speed and agreement.

For bench/cuda_speed.py's `fp8` section (the full 32-layer 8B shape, in the same run as BF16):
`fp8_model` (the 8B shape's random weights quantized in place as `--quant fp8` quantizes them),
`bytes_read_per_token`, and `gemv_probe`: per projection of a Llama-8B layer at batch 1, µs inside
CUDA graphs of cuBLAS's BF16 GEMV, torchao's FP8 linear (the activation quantized per token, then
`torch._scaled_mm`) and a weight-only FP8 GEMV prototype in Triton (e4m3 weights and their per-row
scale read once, products in float32): which route reads FP8 bytes at the speed BF16 reads its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def log(line: str) -> None:
    print(line, flush=True)


def write_tiny(folder: Path, tokenizer: Path) -> None:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.2, dtype="float32")
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(str(folder), safe_serialization=True)
    for file in tokenizer.iterdir():
        shutil.copy(file, folder / file.name)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def cli_generate(folder: Path, quant: str, tokens: int) -> dict:
    command = [sys.executable, "-c", "import sys; from runner.cli import main; sys.exit(main())",
               "generate", str(folder), "-p", "Hello", "--quant", quant, "--max-tokens", str(tokens), "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - started
    log(f"\n== runner generate --quant {quant} --max-tokens {tokens} --json: exit {done.returncode} in {seconds:.1f} s")
    log(done.stdout[-3000:])
    if done.returncode:
        log(done.stderr[-3000:])
    return {"quant": quant, "exit": done.returncode, "seconds": round(seconds, 1), "stdout": done.stdout[-3000:],
            "stderr": done.stderr[-2000:] if done.returncode else ""}


def compare(folder: Path, context: int, tokens: int = 16, quants=("bf16", "fp8")) -> dict:
    """BF16 vs FP8 on one model: prompt logits and greedy tokens; FP8's stream vs its own argmax."""
    import numpy as np

    from runner.backend import LoadRequest, Message, Sampling, get_backend
    from runner.budget import make_plan
    from runner.hardware import detect_machine
    from runner.model import load_spec

    spec = load_spec(str(folder))
    messages = [Message("user", "Write a long story about a lighthouse keeper.")]
    runs = {}
    for quant in quants:
        plan = make_plan(spec, detect_machine(), quant, context, backend="cuda")
        session = get_backend("cuda").load(LoadRequest(spec, quant, context, plan=plan))
        try:
            prompt = session.tokenize(messages)
            logits = session.logits(prompt).astype(np.float32)
            streamed = [c.token for c in session.stream(messages, Sampling(max_tokens=tokens))]
            own = []
            if quant == quants[1]:  # the model's own argmax continuation, full forwards, no cache
                ids = list(prompt)
                for _ in range(8):
                    ids.append(int(np.argmax(session.logits(ids)[-1])))
                own = ids[len(prompt):]
            runs["fp8" if quant == quants[1] else "bf16"] = dict(logits=logits, streamed=streamed, own=own, device=session.device_summary)
        finally:
            session.close()
    a, b = runs["bf16"]["logits"], runs["fp8"]["logits"]
    cosine = float(np.mean((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))
    result = {
        "model": str(folder),
        "fp8_device": runs["fp8"]["device"],
        "prompt_positions": int(a.shape[0]),
        "logits_cosine_mean": round(cosine, 5),
        "logits_relative_error": round(float(np.linalg.norm(a - b) / np.linalg.norm(a)), 5),
        "logits_max_abs_diff": round(float(np.abs(a - b).max()), 4),
        "logits_max_abs_bf16": round(float(np.abs(a).max()), 4),
        "top1_agreement": round(float(np.mean(a.argmax(-1) == b.argmax(-1))), 4),
        "bf16_greedy": runs["bf16"]["streamed"],
        "fp8_greedy": runs["fp8"]["streamed"],
        "greedy_same_prefix": next((i for i, (x, y) in enumerate(zip(runs["bf16"]["streamed"], runs["fp8"]["streamed"])) if x != y),
                                   min(len(runs["bf16"]["streamed"]), len(runs["fp8"]["streamed"]))),
        "fp8_stream_equals_own_argmax": runs["fp8"]["streamed"][:8] == runs["fp8"]["own"][:len(runs["fp8"]["streamed"])],
    }
    log(f"\n== bf16 vs fp8 on {folder.name}: " + json.dumps({k: v for k, v in result.items()}))
    return result


# ---- the full 8B shape, for bench/cuda_speed.py's fp8 section ---------------------------------

# a Llama-8B layer's projections as the fast decoder launches them: (name, out, in)
LAYER_SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336))
GEMV_CONFIGS = ((8, 512), (16, 256), (4, 1024))      # the prototype's (rows, columns) per step, tried each
_GEMV: dict = {}


def fp8_model(spec):
    """`spec`'s architecture with random weights on the GPU (runner_cuda.rehearse.random_model, bf16)
    quantized in place as `--quant fp8` loads a checkpoint: torchao's
    Float8DynamicActivationFloat8WeightConfig(PerRow) on every Linear but the lm_head (transformers'
    torchao quantizer keeps the output head in bf16)."""
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from runner_cuda.rehearse import random_model

    model = random_model(spec, "bf16").eval()
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and name != "lm_head")
    return model


def bytes_read_per_token(model) -> int:
    """The model's tensors (torchao's FP8 data and scales counted as stored) less the input embedding
    table, of which a decode step reads one row."""
    from runner_cuda.loading import tensor_bytes_by_device

    embed = model.get_input_embeddings().weight
    return sum(tensor_bytes_by_device(model).values()) - (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()


def gemv_kernel():
    """out[n] = scale[n] * sum_k w[n, k] x[k] for one token: bf16 or e4m3 weights [N, K] read once
    (BLOCK_N rows by BLOCK_K columns a step, products in float32), the per-row scale applied at
    the end (HAS_SCALE), bf16 out. N and K must be multiples of the blocks."""
    if _GEMV:
        return _GEMV["kernel"]
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(w_ptr, scale_ptr, x_ptr, out_ptr, K, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for start in range(0, K, BLOCK_K):
            w = tl.load(w_ptr + rows[:, None] * K + (start + cols)[None, :])
            x = tl.load(x_ptr + start + cols)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        out = tl.sum(acc, axis=1)
        if HAS_SCALE:
            out = out * tl.load(scale_ptr + rows)
        tl.store(out_ptr + rows, out.to(tl.bfloat16))

    _GEMV["kernel"] = gemv
    return gemv


def gemv(weight, scale, x, out, block_n: int, block_k: int):
    n, k = weight.shape
    gemv_kernel()[(n // block_n,)](weight, scale if scale is not None else weight, x, out, k, HAS_SCALE=scale is not None,
                                   BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def gemv_probe(graph_time_us) -> dict:
    """Per projection of a Llama-8B layer, batch 1, µs inside CUDA graphs over copies of the weights
    larger than L2 (`graph_time_us`, bench/cuda_speed.py): cuBLAS BF16 (F.linear, what the fast
    decoder runs for BF16), torchao's FP8 linear as `--quant fp8` runs it, and the Triton prototype on
    bf16 and on e4m3 weights (best of GEMV_CONFIGS); its error against a float64 product; sums per
    layer."""
    rows, layer = {}, {"cublas_bf16": 0.0, "torchao_fp8": 0.0, "triton_bf16": 0.0, "triton_fp8": 0.0}
    for name, n, k in LAYER_SHAPES:
        rows[name] = row = probe_shape(n, k, graph_time_us)
        for key in layer:
            layer[key] += row.get(f"{key}_us", float("nan"))
    return {"shapes": rows, "layer_us": layer}


def probe_shape(n: int, k: int, graph_time_us) -> dict:
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    copies = max(2, min(8, int(200e6 // (n * k * 2))))
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float32).mul_(0.02).to(torch.bfloat16) for _ in range(copies)]
    scales = [w.float().abs().amax(dim=1).div(448.0) for w in dense]
    fp8 = [(w.float() / s[:, None]).to(torch.float8_e4m3fn) for w, s in zip(dense, scales)]
    x = torch.randn(k, device="cuda", dtype=torch.float32).to(torch.bfloat16)
    out = torch.empty(n, device="cuda", dtype=torch.bfloat16)
    row = {"mb_bf16": n * k * 2 / 1e6, "mb_fp8": (n * k + n * 4) / 1e6, "copies": copies}
    with torch.no_grad():
        row["cublas_bf16_us"] = graph_time_us(lambda i: torch.nn.functional.linear(x[None], dense[i]), copies)
        linears = []
        for w in dense:
            linear = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16))
            linear[0].weight.data.copy_(w)
            quantize_(linear, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            linears.append(linear)
        try:
            row["torchao_fp8_us"] = graph_time_us(lambda i: linears[i](x[None]), copies)
        except Exception as error:          # keep the prototype's numbers
            row["torchao_fp8_error"] = repr(error)[:300]
        exact = (fp8[0].double() * scales[0].double()[:, None]) @ x.double()
        mine = gemv(fp8[0], scales[0], x, out, *GEMV_CONFIGS[0]).double()
        row["triton_fp8_rel_err"] = ((mine - exact).norm() / exact.norm()).item()
        for label, weights, scale in (("triton_bf16", dense, None), ("triton_fp8", fp8, scales)):
            best = None
            for block_n, block_k in GEMV_CONFIGS:
                us = graph_time_us(lambda i: gemv(weights[i], scale[i] if scale else None, x, out, block_n, block_k), copies)
                row[f"{label}_{block_n}x{block_k}_us"] = round(us, 2)
                if best is None or us < best[0]:
                    best = (us, f"{block_n}x{block_k}")
            row[f"{label}_us"], row[f"{label}_config"] = best
    row["cublas_bf16_gb_s"] = row["mb_bf16"] * 1e3 / row["cublas_bf16_us"]
    row["triton_fp8_gb_s"] = row["mb_fp8"] * 1e3 / row["triton_fp8_us"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()

    import torch
    import transformers

    try:
        import torchao
        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    capability = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
    header = (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {gpu} (compute capability {capability}); "
              f"torch {torch.__version__}, transformers {transformers.__version__}, torchao {torchao_version}")
    log(header)
    results: dict = {"header": header}
    big = Path(f"/tmp/llama-8b-shaped-{args.layers}-layers")
    tiny = Path("/tmp/tiny-llama")

    def step(name, function, *a):
        try:
            results[name] = function(*a)
        except Exception as error:  # report and go on: device time is scarce
            log(f"  {name} FAILED: {type(error).__name__}: {error}")
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        (args.out / "fp8_results.json").write_text(json.dumps(results, indent=2, default=str))

    from cuda_load import measure, write_checkpoint

    if not (big / "model.safetensors.index.json").is_file():
        step("write_big", write_checkpoint, big, args.tokenizer, args.layers)
    step("write_tiny", write_tiny, tiny, args.tokenizer)
    step("cli_fp8", cli_generate, big, "fp8", 16)
    step("measure_fp8", measure, big, "fp8", args.context, args.tokens)
    step("measure_bf16", measure, big, "bf16", args.context, args.tokens)
    step("compare_big", compare, big, args.context)
    step("compare_tiny", compare, tiny, 256)
    return 0


if __name__ == "__main__":
    sys.exit(main())

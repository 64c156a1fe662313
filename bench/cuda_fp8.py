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

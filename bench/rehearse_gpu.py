"""GPU proof runs for `runner rehearse` (issue 8), made for one call on the device machine.

    python3 bench/rehearse_gpu.py h100     # Llama 3.2 1B smoke, Llama 3.1 70B NF4 at 8k, 70B BF16 --force (OOM)
    python3 bench/rehearse_gpu.py h200     # Llama 3.1 405B-shaped NF4 at 8k, shrunk with --layers to fit:
                                           # as runner does it (2048-token prefill chunks, expandable
                                           # allocator segments), then without expandable segments,
                                           # then with the whole prompt in one forward

First it measures the GPU's copy bandwidth (a device-to-device copy, bytes read + written), so
decode tokens/s can be held against both the plan's roofline (from the GPU's datasheet bandwidth)
and a roofline at the bandwidth measured here. Each rehearsal runs in its own process (a clean
allocator; one failure does not stop the rest) through the same `run()` as `runner rehearse`.
Writes <case>.json (plan + rehearsal + log) under $OUT (or ./bench-out) and prints a summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(os.environ.get("OUT") or "bench-out")
CUDA_CONTEXT = 500 * 1024**2   # budget.CUDA_CONTEXT_BYTES

CASES = {
    "h100": [
        ("smoke-1b-nf4", ["meta-llama/Llama-3.2-1B-Instruct", "--layers", "2", "--context", "1024", "--decode-tokens", "8"]),
        ("llama70b-nf4-8k", ["meta-llama/Llama-3.1-70B-Instruct", "--quant", "nf4", "--context", "8192",
                             "--decode-tokens", "32"]),
        ("llama70b-bf16-force", ["meta-llama/Llama-3.1-70B-Instruct", "--quant", "bf16", "--context", "8192",
                                 "--decode-tokens", "4", "--force"]),
    ],
    "h200": [],   # filled in by largest_405b_layers() on the machine itself
}


def copy_bandwidth() -> float:
    """Device-to-device copy of 4 GiB, median of 10 after warm-up: bytes read + written per second."""
    import torch

    n = 4 * 1024**3
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    times.sort()
    return 2 * n / times[len(times) // 2]


def largest_405b_layers(context: int = 8192) -> int:
    """The most decoder layers of Llama 3.1 405B that the Plan says fit this machine's GPUs."""
    from runner.budget import FITS, make_plan
    from runner.hardware import detect_machine
    from runner.model import load_spec

    spec, machine = load_spec("meta-llama/Llama-3.1-405B-Instruct"), detect_machine()
    best = 0
    for layers in range(1, spec.num_layers + 1):
        if make_plan(spec.with_layers(layers), machine, "nf4", context, backend="cuda").verdict != FITS:
            break
        best = layers
    return best


def one(arguments: list[str]) -> int:
    """One rehearsal, as `runner rehearse ARGS --json` does it (without the CLI's other commands)."""
    import argparse

    from runner.commands import rehearse
    from runner.errors import RunnerError

    parser = argparse.ArgumentParser(prog="runner rehearse")
    rehearse.add_arguments(parser)
    try:
        return rehearse.run(parser.parse_args(arguments + ["--json"]))
    except RunnerError as error:
        print(f"runner: error: {error}", file=sys.stderr)
        return error.exit_code


def run_case(name: str, arguments: list[str], env: dict[str, str] | None = None) -> dict:
    print(f"== {name}: {' '.join(f'{k}={v}' for k, v in (env or {}).items())} runner rehearse {' '.join(arguments)}",
          flush=True)
    started = time.perf_counter()
    process = subprocess.run([sys.executable, __file__, "--one", *arguments], capture_output=True, text=True,
                             env={**os.environ, **(env or {})})
    record = {"case": name, "arguments": arguments, "env": env or {}, "exit_code": process.returncode,
              "wall_seconds": time.perf_counter() - started, "log": process.stderr[-20000:]}
    try:
        record.update(json.loads(process.stdout))
    except json.JSONDecodeError:
        record["stdout"] = process.stdout[-5000:]
    (OUT / f"{name}.json").write_text(json.dumps(record, indent=2))
    tail = [line for line in process.stderr.splitlines() if "kernels" not in line][-6:]
    print("\n".join(tail), flush=True)
    return record


def summary(record: dict, bandwidth: float) -> list[str]:
    if "rehearsal" not in record:
        errors = [line for line in record["log"].splitlines() if line.startswith("runner: error")]
        return [f"{record['case']}: exit {record['exit_code']} after {record['wall_seconds']:.0f} s: "
                f"{errors[-1] if errors else record['log'][-500:]}"]
    plan, result = record["plan"], record["rehearsal"]
    lines = [f"{record['case']}: {plan['model']} {plan['num_layers']} layers {plan['quant']} context {plan['context']}"
             f" ({plan['verdict']}), load {result['load_seconds']:.1f} s, wall {record['wall_seconds']:.0f} s"]
    for d in result["devices"]:
        planned_resident = d["planned_weights"] + d["planned_kv_cache"]
        planned_overhead = d["planned_total"] - planned_resident
        reserved = d.get("reserved_peak", 0)
        lines.append(
            f"  {d['device']}: prefill activations (peak - resident) {(d['peak'] - d['resident']) / 1e9:.3f} GB vs the "
            f"plan's overhead {planned_overhead / 1e9:.3f} GB (incl. {CUDA_CONTEXT / 1e9:.3f} GB CUDA context); "
            f"fragmentation (reserved peak - peak) {(reserved - d['peak']) / 1e9:.3f} GB; allocator "
            f"{result['versions'].get('allocator', '?')}"
        )
        lines.append(
            f"  {d['device']}: weights plan {d['planned_weights'] / 1e9:.3f} GB measured {d['weights'] / 1e9:.3f} GB "
            f"({(d['weights'] / d['planned_weights'] - 1) * 100:+.2f}%); KV plan {d['planned_kv_cache'] / 1e9:.3f} "
            f"measured {d['kv_cache'] / 1e9:.3f} GB; resident plan {planned_resident / 1e9:.3f} measured "
            f"{d['resident'] / 1e9:.3f} GB ({(d['resident'] / planned_resident - 1) * 100:+.2f}%); peak "
            f"{d['peak'] / 1e9:.3f} GB (load peak {d['load_peak'] / 1e9:.3f}, reserved peak "
            f"{d.get('reserved_peak', 0) / 1e9:.3f}) vs plan total {d['planned_total'] / 1e9:.3f} GB"
        )
    layer_plan, layer_measured = result["planned_layer_bytes"], result["measured_layer_bytes"]
    sizes = [b["bytes"] for b in result["blocks"] if b["name"].startswith("layer ")]
    lines.append(f"  one layer: plan {layer_plan / 1e6:.3f} MB measured {layer_measured / 1e6:.3f} MB "
                 f"({(layer_measured / layer_plan - 1) * 100:+.3f}%; min {min(sizes) / 1e6:.3f} max {max(sizes) / 1e6:.3f})")
    if "--layers" in record["arguments"]:   # extrapolate the measured blocks to the full-size model
        from runner.budget import weights_bytes
        from runner.model import load_spec

        full = load_spec(plan["model"])
        blocks = {b["name"]: b["bytes"] for b in result["blocks"]}
        measured_full = blocks.get("embeddings", 0) + blocks.get("head", 0) + layer_measured * full.num_layers
        planned_full = weights_bytes(full, plan["quant"], "cuda")
        lines.append(f"  full size ({full.num_layers} layers): weights plan {planned_full / 1e9:.2f} GB, measured blocks "
                     f"extrapolated {measured_full / 1e9:.2f} GB ({(measured_full / planned_full - 1) * 100:+.2f}%)")
    read_per_token = sum(d["weights"] + d["kv_cache"] for d in result["devices"])
    measured_roofline = bandwidth / read_per_token if bandwidth else 0.0
    steps = sorted(result["decode_step_seconds"])
    lines.append(
        f"  prefill {result['prefill_tokens']} tokens {result['prefill_seconds']:.2f} s ({result['prefill_tokens_per_s']:.0f} tok/s); "
        f"decode {result['decode_tokens_per_s']:.2f} tok/s median (fastest step {1 / steps[0]:.2f}, slowest {1 / steps[-1]:.2f}); "
        f"roofline plan {result['roofline_tokens_per_s']:.1f} tok/s, at measured copy bandwidth {measured_roofline:.1f} tok/s "
        f"({result['decode_tokens_per_s'] / measured_roofline * 100 if measured_roofline else 0:.0f}% of it)"
    )
    lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
                 + "; " + ", ".join(f"{k} {v}" for k, v in result["device_names"].items()))
    return lines


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        return one(sys.argv[2:])
    which = sys.argv[1] if len(sys.argv) > 1 else "h100"
    OUT.mkdir(parents=True, exist_ok=True)
    import torch

    bandwidth = copy_bandwidth() if torch.cuda.is_available() else 0.0
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write) on {torch.cuda.get_device_name(0)}", flush=True)
    cases = [(name, arguments, None) for name, arguments in CASES[which]]
    free, total = torch.cuda.mem_get_info(0) if torch.cuda.is_available() else (0, 0)
    lines = [f"copy bandwidth {bandwidth / 1e12:.3f} TB/s; cuda:0 free {free / 1e9:.2f} of {total / 1e9:.2f} GB "
             f"(after this process's own CUDA context)"]
    if which == "h200":
        layers = largest_405b_layers()
        print(f"the plan says {layers} of 126 layers of Llama 3.1 405B fit in NF4 at 8k", flush=True)
        lines.append(f"the plan says {layers} of 126 layers fit")
        arguments = ["meta-llama/Llama-3.1-405B-Instruct", "--layers", str(layers), "--quant", "nf4",
                     "--context", "8192", "--decode-tokens", "16"]
        name = f"llama405b-{layers}layers-nf4-8k"
        cases = [(name, arguments, None),
                 (name + "-no-expandable", arguments, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}),
                 (name + "-one-forward", arguments + ["--prefill-chunk", str(8192 - 16)], None)]
    for name, arguments, env in cases:
        record = run_case(name, arguments, env)
        lines += summary(record, bandwidth)
    text = "\n".join(lines)
    (OUT / "summary.txt").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

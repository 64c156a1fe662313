"""`runner rehearse`: the real architecture with random weights, on this machine, before any download.

    runner rehearse meta-llama/Llama-3.1-70B-Instruct --quant nf4 --context 8192
    runner rehearse meta-llama/Llama-3.1-405B-Instruct --layers 60 --context 8192 --json
    runner rehearse --backend mlx meta-llama/Llama-3.1-8B-Instruct --quant q4 --layers 2 --context 1024

It plans first (the same Plan as `runner plan`), refuses a plan that does not fit unless
`--force`, then builds the model layer by layer with random weights in the target quantization on
the plan's devices, prefills `context - decode_tokens` tokens, decodes `decode_tokens` more, and
prints measured memory per device next to the plan's, and tokens/s next to the roofline.
`--backend mlx` does the same with mlx-lm's own model class and quantization (runner_mlx.rehearse).
"""

from __future__ import annotations

import argparse
import json
import sys

from runner.errors import BackendUnavailable, DoesNotFit, UserInputError

QUANT_CHOICES = ("nf4", "bf16", "int8", "q4", "q8")
BACKEND_QUANTS = {"cuda": ("nf4", "bf16", "int8"), "mlx": ("q4", "q8", "bf16")}   # the first is the default
DEFAULT_CONTEXT = 4096
DEFAULT_DECODE_TOKENS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from runner.budget import PREFILL_CHUNK

    parser.add_argument("model", nargs="?", default=None,
                        help="model id (catalog or Hugging Face cache) or folder with config.json; "
                             "only config.json is read")
    parser.add_argument("--backend", choices=tuple(BACKEND_QUANTS), default="cuda",
                        help="rehearse the CUDA load (transformers + bitsandbytes, default) or the MLX one (mlx-lm)")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default=None,
                        help="weights as the backend would load them: cuda nf4 (default; double quant, bf16 "
                             "compute), bf16, int8; mlx q4 (default; 4-bit, group 64), q8, bf16")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                        help=f"tokens the KV cache must hold: prefill + decode (default: {DEFAULT_CONTEXT})")
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only the first N decoder layers (same widths), to rehearse a big "
                             "architecture on a small machine")
    parser.add_argument("--decode-tokens", type=int, default=DEFAULT_DECODE_TOKENS,
                        help=f"tokens decoded one at a time after the prefill (default: {DEFAULT_DECODE_TOKENS})")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help=f"prefill this many tokens per forward (default: {PREFILL_CHUNK}, as runner's CUDA session "
                             "and mlx-lm's prefill_step_size do, and the plan counts activations for)")
    parser.add_argument("--machine", default=None,
                        help="plan for this machine description or file instead of the detected one "
                             "(its devices must exist here)")
    parser.add_argument("--force", action="store_true",
                        help="rehearse even if the plan says it does not fit (an out-of-memory is caught and reported)")
    parser.add_argument("--json", action="store_true", help="print the plan and the measurements as JSON")


def _gb(value: float) -> str:
    """Bytes in GB (1e9), or MB below 1 GB so that small rehearsals stay readable."""
    if abs(value) < 1e9:
        return f"{value / 1e6:.1f} MB"
    return f"{value / 1e9:.2f} GB"


def _diff(measured: float, planned: float) -> str:
    if planned <= 0:
        return "n/a"
    return f"{(measured - planned) / planned * 100:+.2f}%"


def _progress(progress) -> None:
    counter = f"[{progress.done}/{progress.total}] " if progress.unit == "blocks" else ""
    print(f"  {counter}{progress.stage}", file=sys.stderr, flush=True)


def check_arguments(args: argparse.Namespace) -> None:
    backend = getattr(args, "backend", "cuda")
    if args.quant is None:
        args.quant = BACKEND_QUANTS[backend][0]
    if args.quant not in BACKEND_QUANTS[backend]:
        raise UserInputError(f"--quant {args.quant} is not a {backend} scheme; --backend {backend} takes "
                             f"{', '.join(BACKEND_QUANTS[backend])}")
    if args.context < 2:
        raise UserInputError("--context must be at least 2 tokens")
    if args.decode_tokens < 1:
        raise UserInputError("--decode-tokens must be at least 1")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UserInputError("--prefill-chunk must be at least 1 token")
    if args.decode_tokens >= args.context:
        raise UserInputError(f"--decode-tokens ({args.decode_tokens}) must be smaller than --context ({args.context})")


def make_rehearsal_plan(args: argparse.Namespace):
    """The spec (shrunk with --layers), the machine and the Plan the rehearsal follows."""
    from runner.budget import make_plan
    from runner.hardware import resolve_machine
    from runner.model import load_spec

    check_arguments(args)
    spec = load_spec(args.model)
    if args.layers is not None:
        spec = spec.with_layers(args.layers)
    if args.context > spec.max_context:
        raise UserInputError(f"--context {args.context} is longer than {spec.name}'s {spec.max_context} tokens")
    machine = resolve_machine(args.machine)
    return make_plan(spec, machine, args.quant, args.context, backend=getattr(args, "backend", "cuda"))


def run(args: argparse.Namespace) -> int:
    from runner.budget import FITS, OFFLOAD

    plan = make_rehearsal_plan(args)
    if plan.backend == "mlx":
        return run_mlx(args, plan)
    spec = plan.model
    try:
        from runner_cuda.loading import options_that_fit, plan_line
        from runner_cuda.rehearse import rehearse
    except ImportError as error:
        raise BackendUnavailable(f"rehearse needs the CUDA backend ({error}); install it with: pip install 'runner[cuda]'") from None
    if plan.verdict != FITS and not args.force:
        options = options_that_fit(plan)
        fits = f"options that fit: {', '.join(options)}, fewer --layers" if options else "use fewer --layers"
        raise DoesNotFit(
            f"{spec.name} ({spec.num_layers} layers) does not fit {plan.machine.label}"
            f"{' without offload' if plan.verdict == OFFLOAD else ''}: {plan_line(plan)}; "
            f"nothing was allocated; {fits}, or --force to try anyway"
        )
    if plan.verdict == FITS:
        where = ", ".join(
            f"{share.device} (layers {share.layers[0]}-{share.layers[1] - 1})" if share.num_layers else share.device
            for share in plan.placement if share.weights_bytes > 0
        )
    else:
        where = "the GPUs anyway (--force; layers split evenly), or the CPU if there is none"
    return rehearse_and_report(args, plan, rehearse, plan.quant, where)


def run_mlx(args: argparse.Namespace, plan) -> int:
    """`--backend mlx`: the same refusal, report and JSON, through runner_mlx.rehearse."""
    from runner.budget import FITS, make_plan

    try:
        from runner_mlx.rehearse import rehearse
    except ImportError as error:
        raise BackendUnavailable(f"rehearse --backend mlx needs the MLX backend ({error}); "
                                 "install it with: pip install 'runner[mlx]'") from None
    spec = plan.model
    if plan.verdict != FITS and not args.force:
        others = [q for q in BACKEND_QUANTS["mlx"] if q != plan.quant
                  and make_plan(spec, plan.machine, q, plan.context, backend="mlx").verdict == FITS]
        fits = f"--quant {' or '.join(others)} fits, or use fewer --layers" if others else "use fewer --layers"
        raise DoesNotFit(
            f"{spec.name} ({spec.num_layers} layers, mlx {plan.quant}) does not fit {plan.machine.label}: "
            f"the plan needs {_gb(plan.total_bytes)} ({_gb(plan.weights_bytes)} weights, "
            f"{_gb(plan.kv_cache_bytes)} KV cache); nothing was allocated; {fits}, or --force to try anyway"
        )
    where = plan.placement[0].device if plan.placement else "this machine (--force)"
    return rehearse_and_report(args, plan, rehearse, f"mlx {plan.quant}", where)


def rehearse_and_report(args: argparse.Namespace, plan, rehearse, scheme: str, where: str) -> int:
    """Say what is about to happen, run the backend's `rehearse`, print the report (or JSON)."""
    spec = plan.model
    print(f"runner: rehearsing {spec.name}: {spec.num_layers} layers, {scheme}, context {plan.context}, "
          f"random weights on {where}; the plan says {plan.verdict} ({_gb(plan.total_bytes)})",
          file=sys.stderr, flush=True)
    result = rehearse(plan, decode_tokens=args.decode_tokens, on_progress=_progress, prefill_chunk=args.prefill_chunk)
    if args.json:
        print(json.dumps({"plan": plan_summary(plan), "rehearsal": result.to_dict()}, indent=2))
    else:
        print(render(plan, result))
    return 0


def plan_summary(plan) -> dict:
    return {
        "model": plan.model.name,
        "num_layers": plan.model.num_layers,
        "quant": plan.quant,
        "context": plan.context,
        "machine": plan.machine.label,
        "verdict": plan.verdict,
        "weights_bytes": plan.weights_bytes,
        "kv_cache_bytes": plan.kv_cache_bytes,
        "overhead_bytes": plan.overhead_bytes,
        "total_bytes": plan.total_bytes,
        "roofline_tokens_per_s": plan.roofline_tokens_per_s,
        "placement": [
            {"device": s.device, "weights_bytes": s.weights_bytes, "kv_cache_bytes": s.kv_cache_bytes,
             "overhead_bytes": s.overhead_bytes, "capacity_bytes": s.capacity_bytes, "layers": list(s.layers)}
            for s in plan.placement
        ],
    }


def render(plan, result) -> str:
    how = {
        "allocator": "the CUDA allocator (torch.cuda.memory_allocated)",
        "mlx allocator": "mlx's allocator (mx.get_active_memory, mx.get_peak_memory)",
    }.get(result.method, "the bytes of live tensors, quantization state included (the CPU has no allocator statistics)")
    lines = [
        f"{result.model}: {result.num_layers} layers, {result.quant}, context {result.context} "
        f"(random weights; measured with {how})",
        "",
        f"{'device':<8} {'':<24} {'weights plan':>13} {'measured':>10} {'diff':>7}   "
        f"{'KV plan':>9} {'measured':>9} {'diff':>7}   {'resident':>9} {'diff':>7}   {'peak':>9} {'plan total':>10}",
    ]
    for d in result.devices:
        name = result.device_names.get(d.device, "")[:24]
        lines.append(
            f"{d.device:<8} {name:<24} {_gb(d.planned_weights):>13} {_gb(d.weights):>10} "
            f"{_diff(d.weights, d.planned_weights):>7}   {_gb(d.planned_kv_cache):>9} {_gb(d.kv_cache):>9} "
            f"{_diff(d.kv_cache, d.planned_kv_cache):>7}   {_gb(d.resident):>9} "
            f"{_diff(d.resident, d.planned_weights + d.planned_kv_cache):>7}   "
            f"{(_gb(d.peak) if d.peak else 'n/a'):>9} {_gb(d.planned_total):>10}"
        )
    if result.method == "allocator":
        for d in result.devices:
            if d.reserved_peak:
                lines.append(f"{d.device}: the caching allocator reserved up to {_gb(d.reserved_peak)} "
                             f"({_gb(d.reserved_peak - d.peak)} above the allocated peak: fragmentation)")
        lines.append("resident: what the allocator holds after the decode (cuBLAS' workspace included); peak: the "
                     "allocator's peak with the prefill's activations; the plan's total also counts the CUDA context "
                     "(~0.5 GB per GPU), which the allocator does not see")
    lines += list(result.notes)
    lines += [
        "",
        f"one decoder layer: plan {result.planned_layer_bytes / 1e6:.2f} MB, measured "
        f"{result.measured_layer_bytes / 1e6:.2f} MB ({_diff(result.measured_layer_bytes, result.planned_layer_bytes)})",
        f"load: {result.load_seconds:.1f} s;  prefill: {result.prefill_tokens} tokens in {result.prefill_seconds:.2f} s "
        f"({result.prefill_tokens_per_s:.0f} tok/s)",
        f"decode: {result.decode_tokens} tokens, {result.decode_tokens_per_s:.1f} tok/s (median step); "
        f"roofline {plan.roofline_tokens_per_s:.1f} tok/s"
        + (f" ({result.decode_tokens_per_s / plan.roofline_tokens_per_s * 100:.0f}% of it)"
           if plan.roofline_tokens_per_s > 0 else ""),
        "versions: " + ", ".join(f"{k} {v}" for k, v in result.versions.items()),
    ]
    return "\n".join(lines)

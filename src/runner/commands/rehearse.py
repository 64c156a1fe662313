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

from runner.commands.options import add_decode_arguments, add_model_arguments
from runner.errors import DoesNotFit, UserInputError

DEFAULT_DECODE_TOKENS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from runner.budget import PREFILL_CHUNK

    add_model_arguments(parser, load=False,
                        backend_help="rehearse this backend's load (default: the plan's backend for this machine)",
                        quant_help="weights as the backend would load them (cuda: nf4, bf16, int8; mlx: q4, q8, "
                                   "bf16; default: the best the plan says fits)")
    add_decode_arguments(parser)
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


def check_arguments(args: argparse.Namespace, context: int) -> None:
    if context < 2:
        raise UserInputError("--context must be at least 2 tokens")
    if args.decode_tokens < 1:
        raise UserInputError("--decode-tokens must be at least 1")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UserInputError("--prefill-chunk must be at least 1 token")
    if args.decode_tokens >= context:
        raise UserInputError(f"--decode-tokens ({args.decode_tokens}) must be smaller than --context ({context})")


def rehearsal_choice(args: argparse.Namespace):
    """The core's choice for the rehearsal: the spec shrunk with --layers, the schemes a backend
    can rehearse."""
    from runner.backend import backend_class
    from runner.choice import default_context, resolve
    from runner.hardware import resolve_machine
    from runner.model import load_spec

    spec = load_spec(args.model)
    if args.layers is not None:
        spec = spec.with_layers(args.layers)
    context = args.context if args.context is not None else default_context(spec)
    check_arguments(args, context)
    if context > spec.max_context:
        raise UserInputError(f"--context {context} is longer than {spec.name}'s {spec.max_context} tokens")
    machine = resolve_machine(args.machine)
    return resolve(spec, machine, args.backend, args.quant, context,
                   schemes=lambda name: backend_class(name).rehearse_quants)


def run(args: argparse.Namespace) -> int:
    from runner.backend import get_backend
    from runner.budget import FITS, OFFLOAD
    from runner.choice import check_kernel, options_that_fit, plan_line

    choice = rehearsal_choice(args)
    plan, spec = choice.plan, choice.spec
    check_kernel(choice.backend, args.kernel)
    backend = get_backend(choice.backend)
    if plan.verdict != FITS and not args.force:
        options = [o for o in options_that_fit(plan) if not o.startswith("--quant ")
                   or o.split()[1] in type(backend).rehearse_quants]
        fits = f"options that fit: {', '.join(options)}, fewer --layers" if options else "use fewer --layers"
        raise DoesNotFit(
            f"{spec.name} ({spec.num_layers} layers, {choice.backend} {plan.quant}) does not fit {plan.machine.label}"
            f"{' without offload' if plan.verdict == OFFLOAD else ''}: {plan_line(plan)}; "
            f"nothing was allocated; {fits}, or --force to try anyway"
        )
    if plan.verdict == FITS:
        where = ", ".join(
            f"{share.device} (layers {share.layers[0]}-{share.layers[1] - 1})" if share.num_layers else share.device
            for share in plan.placement if share.weights_bytes > 0
        )
    else:
        where = "this machine anyway (--force; layers split evenly over the GPUs, if any)"
    return rehearse_and_report(args, plan, backend.rehearse, f"{choice.backend} {plan.quant}", where)


def rehearse_and_report(args: argparse.Namespace, plan, rehearse, scheme: str, where: str) -> int:
    """Say what is about to happen, run the backend's `rehearse`, print the report (or JSON)."""
    spec = plan.model
    print(f"runner: rehearsing {spec.name}: {spec.num_layers} layers, {scheme}, context {plan.context}, "
          f"random weights on {where}; the plan says {plan.verdict} ({_gb(plan.total_bytes)})",
          file=sys.stderr, flush=True)
    result = rehearse(plan, decode_tokens=args.decode_tokens, on_progress=_progress, prefill_chunk=args.prefill_chunk,
                      fast_decode=args.fast_decode, kernel=args.kernel)
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

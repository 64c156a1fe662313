"""`runner plan`: will this model fit this machine, and how? No download, no weights, no torch.

    runner plan                                   the default model on this machine
    runner plan meta-llama/Llama-3.1-405B-Instruct --machine 4xA100-80GB --context 8k
    runner plan ./my-model --quant nf4 --json
    runner plan meta-llama/Llama-3.1-405B-Instruct --machine 2xM2Ultra-192GB --link 10gbe
    runner plan --list                            the models runner knows without a download
"""

from __future__ import annotations

import argparse
import json
import sys

from runner.commands.options import add_model_arguments, choose, parse_count
from runner.words import counted

GB = 10**9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, load=False, backend_help="plan for this backend (default: the plan's choice)",
                        quant_help="show the placement for this scheme (default: the recommended one)")
    parser.add_argument("--machine", metavar="SPEC|FILE", default=None,
                        help="plan for a machine you do not own: 4xA100-80GB, 8xRTX4090, 2xM2Ultra-192GB, cpu-64GB, "
                             "or a .toml/.json machine file (default: this machine)")
    parser.add_argument("--batch", metavar="B", default="1", help="sequences at once (default 1)")
    parser.add_argument("--link", metavar="NAME|LATENCY,BANDWIDTH", default=None,
                        help="the network between hosts: 1gbe, 10gbe, tb4, tb5, or measured (runner launch --probe "
                             "prints it, e.g. 85us,0.9GB/s): per-token network time and tokens/s of each split")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON, for scripts")
    parser.add_argument("--list", action="store_true", help="list the models in runner's catalog and exit")


def run(args: argparse.Namespace) -> int:
    from runner.model import catalog_ids

    if args.list:
        return _print_catalog(catalog_ids(), args.json)

    from runner import budget

    batch = parse_count(args.batch, "--batch")
    choice = choose(args, batch=batch)
    model, machine, context = choice.spec, choice.machine, choice.context
    link_text = args.link or machine.link          # the command line's, else the machine file's
    link = budget.parse_link(link_text) if link_text else None
    rows = [budget.make_plan(model, machine, quant, context, batch, backend, kv_bits=choice.kv_bits)
            for backend, quant in budget.schemes_for(machine, args.backend, model)]
    recommendation = budget.recommend(model, machine, context, choice.kv_bits)
    setups = budget.article_setups(model, context) if recommendation.plan.verdict != budget.FITS or machine.hypothetical else []

    network = _network_rows(model, machine, context, batch, choice.plan, link) if link else None
    if args.json:
        data = _as_json(model, machine, context, batch, rows, choice, recommendation, setups)
        if link:
            data["network"] = {"link": {"name": link.name, "latency_s": link.latency_s,
                                        "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s},
                               "splits": [{"split": split, "network_s_per_token": time.seconds_per_token,
                                           "messages_per_token": time.messages_per_token,
                                           "roofline_tokens_per_s": round(plan.roofline_tokens_per_s, 4),
                                           "tokens_per_s": round(time.tokens_per_s(plan.roofline_tokens_per_s), 4)}
                                          for split, plan, time in network]}
        print(json.dumps(data, indent=2))
    else:
        _print_report(model, machine, context, batch, rows, choice, recommendation, setups)
        if link:
            _print_network(machine, choice.plan, link, network)
    return 0


def _network_rows(model, machine, context, batch, chosen, link) -> list:
    """(split, plan, network time) for each split of the chosen scheme that fits the hosts."""
    from runner import budget
    from runner.errors import UserInputError

    if chosen.layout != budget.HOSTS or len(machine.hosts) < 2:
        return []
    rows = []
    for split in ("pipeline", "tensor"):
        try:
            plan = budget.make_plan(model, machine, chosen.quant, context, batch, chosen.backend, parallel=split,
                                    kv_bits=chosen.kv_bits)
        except UserInputError:       # tensor: the heads do not divide among the hosts
            continue
        if plan.verdict == budget.FITS:
            rows.append((split, plan, budget.network_time(plan, link)))
    return rows


# ---- text ------------------------------------------------------------------------------------

def _gb(value: int | float) -> str:
    return f"{value / GB:,.1f}"


def _speed(tokens_per_s: float) -> str:
    if tokens_per_s <= 0:
        return "-"
    return f"{tokens_per_s:.2f}" if tokens_per_s < 10 else f"{tokens_per_s:,.0f}"


VERDICT_WORDS = {"fits": "FITS", "offload": "OFFLOAD", "does-not-fit": "DOES NOT FIT"}


def _print_report(model, machine, context, batch, rows, choice, recommendation, setups) -> None:
    from runner import budget

    out = sys.stdout.write
    chosen = choice.plan
    params = model.parameter_count()
    experts = f" · {model.num_experts} experts ({model.experts_per_token} active)" if model.num_experts > 1 else ""
    out(f"{model.name}  [{model.source}]\n")
    out(f"  {params / 1e9:,.2f}B parameters · {counted(model.num_layers, 'layer')} · hidden {model.hidden_size:,} · "
        f"{model.num_heads} heads / {model.num_kv_heads} KV heads · vocab {model.vocab_size:,} · "
        f"max context {model.max_context:,}{experts}\n")
    kind = "hypothetical" if machine.hypothetical else "detected"
    out(f"Machine: {machine.label} ({kind}): {machine.describe()}\n")
    kv_bits = rows[0].kv_bits if rows else None
    kv_format = f"{kv_bits}-bit (quantized, group {budget.KV_GROUP_SIZE})" if kv_bits else "bf16"
    kv_per_token = model.kv_bytes_per_token(budget.kv_dtype_bytes("bf16", kv_bits))
    out(f"Context {counted(context, 'token', ',')} x batch {batch} · KV cache {int(kv_per_token):,} bytes/token in "
        f"{kv_format} · GB = 10^9 bytes\n\n")

    header = f"  {'scheme':<9} {'backend':<7} {'weights':>9} {'KV':>8} {'overhead':>9} {'total':>9}  {'verdict':<13} {'tok/s*':>7}\n"
    out(header)
    for plan in rows:
        mark = "<" if (plan.quant, plan.backend) == (chosen.quant, chosen.backend) else " "
        out(f"{mark} {plan.quant:<9} {plan.backend:<7} {_gb(plan.weights_bytes):>9} {_gb(plan.kv_cache_bytes):>8} "
            f"{_gb(plan.overhead_bytes):>9} {_gb(plan.total_bytes):>9}  {VERDICT_WORDS[plan.verdict]:<13} "
            f"{_speed(plan.roofline_tokens_per_s):>7}\n")
    out("  * roofline decode speed at batch 1 with the whole context cached (bandwidth / bytes read per token): an upper bound there\n")
    for plan in rows:
        if note := budget.scheme_note(model, machine, plan):
            out(f"    {note}\n")
    if not machine.gpus and not machine.is_apple:
        cpu = machine.hosts[0].cpu_bandwidth_bytes_per_s
        out(f"    CPU memory bandwidth assumed {cpu / GB:.0f} GB/s. On a CPU quantized matmuls are compute-bound and far\n"
            f"    below it (measured here, SmolLM2-135M: torch fp32 ~16 tok/s, mlx bf16 8.7, mlx 8-bit 1.2)\n")
    out("\n")

    _print_placement(chosen)
    out(f"  chosen because: {choice.reason}\n")
    if chosen.warnings:
        out("\nWarnings:\n")
        for warning in chosen.warnings:
            out(f"  ! {warning}\n")
    if chosen.notes:
        out("\nNotes:\n")
        for note in chosen.notes:
            out(f"  - {note}\n")
        if chosen.parallel == "pipeline" and any("tensor parallel" in n and "works" in n for n in chosen.notes):
            from runner.budget import make_plan

            tensor = make_plan(model, machine, chosen.quant, context, batch, chosen.backend, parallel="tensor",
                               kv_bits=chosen.kv_bits)
            if tensor.verdict == "fits":
                per_host = max(s.total_bytes for s in tensor.placement)
                out(f"  - tensor parallel would need {_gb(per_host)} GB per host and reach ~"
                    f"{_speed(tensor.roofline_tokens_per_s)} tok/s (pipeline: ~{_speed(chosen.roofline_tokens_per_s)}), "
                    f"before network time\n")

    longest = longest_context_per_kv(model, machine, chosen, batch)
    if longest:
        shown = " · ".join(f"{_kv_name(bits)} {tokens:,}" if tokens else f"{_kv_name(bits)} none"
                           for bits, tokens in longest.items())
        out(f"\nLongest context that fits as {chosen.quant} on {chosen.backend}, per KV cache (--kv-bits): {shown}\n")

    out("\nRecommendation: ")
    if recommendation.max_context:
        out(f"--backend {recommendation.backend} --quant {recommendation.quant} "
            f"(context up to {recommendation.max_context:,})\n  {recommendation.reason}\n")
    else:
        out(f"none: {recommendation.reason}\n")
    if setups:
        out("\nThe article's set-ups:\n")
        for label, rec in setups:
            verdict = VERDICT_WORDS[rec.plan.verdict]
            how = f"{rec.backend} {rec.quant}, ~{_speed(rec.plan.roofline_tokens_per_s)} tok/s" if rec.max_context else "-"
            out(f"  {label:<30} {verdict:<13} {how}\n")


def _print_network(machine, chosen, link, network) -> None:
    out = sys.stdout.write
    out(f"\nNetwork ({link.describe()}):\n")
    if not network:
        out("  nothing crosses a network: " + ("one host\n" if len(machine.hosts) < 2 else
                                               f"no split of {chosen.quant} fits these hosts\n"))
        return
    for split, plan, time in network:
        out(f"  {split:<9} {time.messages_per_token:>4} messages/token of {time.bytes_per_message / 1024:,.0f} KB: "
            f"{time.seconds_per_token * 1e3:,.2f} ms/token -> ~{_speed(time.tokens_per_s(plan.roofline_tokens_per_s))} "
            f"tok/s (~{_speed(plan.roofline_tokens_per_s)} before network time)\n")
    out("  (decode at batch 1; compute at the roofline; messages on the critical path, one after another)\n")


def longest_context_per_kv(model, machine, plan, batch: int) -> dict[int | None, int]:
    """The longest context that fits without offload for the plan's scheme, with the KV cache in
    the compute dtype and quantized to 8 and 4 bits (the backends that take --kv-bits)."""
    from runner import budget
    from runner.errors import UserInputError

    longest = {}
    for bits in (None, 8, 4):
        try:
            longest[bits] = budget.max_context_that_fits(model, machine, plan.quant, plan.backend, batch, kv_bits=bits)
        except UserInputError:   # a head size the quantized cache cannot group, or a backend without it
            continue
    return longest if len(longest) > 1 else {}


def _kv_name(bits: int | None) -> str:
    return f"kv{bits}" if bits else "unquantized"


def _print_placement(plan) -> None:
    from runner import budget

    out = sys.stdout.write
    title = {"layers": "layers split over GPUs (accelerate)", "pipeline": "pipeline: layer ranges per host (mlx.launch)",
             "tensor": "tensor parallel: every host holds a share of every layer", "single": "one device"}[plan.parallel]
    out(f"Placement of {plan.quant} on {plan.backend} ({title}): {VERDICT_WORDS[plan.verdict]}\n")
    if not plan.placement:
        host = plan.machine.hosts[0]
        memory = (f"{len(plan.machine.gpus)} GPUs + " if plan.machine.gpus else "") + \
            f"RAM {host.ram_bytes / GB:,.0f} GB + free disk {host.disk_free_bytes / GB:,.0f} GB"
        if plan.layout == budget.HOSTS:
            memory = " + ".join(f"{h.name}'s GPU working set {h.wired_limit_bytes / GB:,.0f} GB" if h.unified_memory
                                else f"{h.name} RAM {h.ram_bytes / GB:,.0f} GB" for h in plan.machine.hosts)
        out(f"  needs {_gb(plan.total_bytes)} GB; does not fit in {memory} ({plan.backend} does not offload)\n"
            if plan.layout == budget.HOSTS else
            f"  needs {_gb(plan.total_bytes)} GB; does not fit in {memory}, not even with offload\n")
        return
    out(f"  {'device':<16} {'layers':<14} {'weights':>9} {'KV':>8} {'overhead':>9} {'total':>9} {'of':>9}\n")
    for share in plan.placement:
        layers = f"{share.layers[0]}-{share.layers[1] - 1}" if share.num_layers else "-"
        extras = [tag for tag, on in (("emb", share.embeddings), ("head", share.head)) if on]
        if extras:
            layers += " +" + "+".join(extras)
        out(f"  {share.device:<16} {layers:<14} {_gb(share.weights_bytes):>9} {_gb(share.kv_cache_bytes):>8} "
            f"{_gb(share.overhead_bytes):>9} {_gb(share.total_bytes):>9} {_gb(share.capacity_bytes):>9}\n")


def _print_catalog(ids: list[str], as_json: bool) -> int:

    specs = [_catalog_spec(model_id) for model_id in ids]
    if as_json:
        print(json.dumps([{"id": s.name, "parameters": s.parameter_count(), "layers": s.num_layers,
                           "max_context": s.max_context} for s in specs], indent=2))
        return 0
    print("Models runner knows without a download (runner plan ID):")
    for spec in specs:
        print(f"  {spec.name:<42} {spec.parameter_count() / 1e9:>7.2f}B  {spec.num_layers:>3} layers  "
              f"context {spec.max_context:,}")
    return 0


def _catalog_spec(model_id: str):
    from runner.model import catalog_config, spec_from_config

    return spec_from_config(catalog_config(model_id), model_id, "catalog")


# ---- json ------------------------------------------------------------------------------------

def _plan_json(plan) -> dict:
    from runner import budget
    from runner.plan_rules import rules_for

    data = {
        "quant": plan.quant, "backend": plan.backend, "verdict": plan.verdict, "parallel": plan.parallel,
        "weights_bytes": plan.weights_bytes, "kv_cache_bytes": plan.kv_cache_bytes,
        "overhead_bytes": plan.overhead_bytes, "total_bytes": plan.total_bytes,
        "roofline_tokens_per_s": round(plan.roofline_tokens_per_s, 4),
        "placement": [
            {"device": s.device, "kind": s.kind, "layers": list(s.layers), "embeddings": s.embeddings, "head": s.head,
             "weights_bytes": s.weights_bytes, "kv_cache_bytes": s.kv_cache_bytes, "overhead_bytes": s.overhead_bytes,
             "total_bytes": s.total_bytes, "capacity_bytes": s.capacity_bytes}
            for s in plan.placement
        ],
        "warnings": list(plan.warnings), "notes": list(plan.notes),
    }
    if plan.verdict != budget.DOES_NOT_FIT:
        data.update(rules_for(plan.backend).plan_details(plan))
    return data


def _as_json(model, machine, context, batch, rows, choice, recommendation, setups) -> dict:
    chosen = choice.plan
    return {
        "model": {"name": model.name, "source": model.source, "path": str(model.path) if model.path else None,
                  "parameters": model.parameter_count(), "layers": model.num_layers,
                  "kv_bytes_per_token_bf16": int(model.kv_bytes_per_token(2)), "max_context": model.max_context},
        "machine": {"label": machine.label, "hypothetical": machine.hypothetical, "description": machine.describe()},
        "context": context,
        "batch": batch,
        "schemes": [{k: v for k, v in _plan_json(p).items() if k not in ("placement", "device_map", "max_memory")}
                    for p in rows],
        "plan": _plan_json(chosen),
        "reason": choice.reason,
        "longest_context_per_kv_bits": {str(bits or "none"): tokens for bits, tokens
                                        in longest_context_per_kv(model, machine, chosen, batch).items()},
        "recommendation": {"backend": recommendation.backend, "quant": recommendation.quant,
                           "max_context": recommendation.max_context, "reason": recommendation.reason},
        "article_setups": [{"setup": label, "verdict": rec.plan.verdict, "backend": rec.backend, "quant": rec.quant}
                           for label, rec in setups],
    }

"""NF4Mma's compile-time choices tried on the 8B shape, in one process on one GPU.

    PYTHONPATH=src:backends python3 bench/nf4_variants.py launches [--case gate_up ...] [--model 70b] \\
        --variant st4=staged=True,ahead=4 --variant w28=warps=28,split=2
    PYTHONPATH=src:backends python3 bench/nf4_variants.py session \\
        --policy registers="gate_up:staged=False;down:staged=False" --policy write="decoder:rope='write'"
    ncu --set full -k regex:nf4_mma --launch-skip 2 --launch-count 3 python3 bench/nf4_variants.py ncu

`launches`: each of a layer's four launches (q/k/v with its RMSNorm, o adding into the residual,
gate/up with its RMSNorm and SiLU x up, down adding into the residual) at its defaults ("base") and
with each --variant's NF4Mma options, timed in CUDA graphs over copies of its weights larger than L2,
its output compared with the default's bit for bit. `session`: the 8B NF4 session decoding a step
ahead at 1,024 (as bench/ab_session.py measures it) with its launches built at their defaults ("base")
and then with each --policy's options per launch (and the decoder's), greedy tokens compared
with the first policy's.
`ncu`: the 8B's gate/up and down at their defaults, each launched three times, for ncu to pick.
OPTIONS are NF4Mma's keyword arguments as name=value (Python literals), comma-separated. JSON under --out.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_speed as cs          # noqa: E402  (puts src and backends on sys.path)

CASES = cs.LAUNCHES_8B
# `launches --model 70b`: the 70B's
CASES_70B = {"qkv": (((8192, 8192), (1024, 8192), (1024, 8192)), "norm"), "o": (((8192, 8192),), "residual"),
             "gate_up": (((28672, 8192), (28672, 8192)), "glu"), "down": (((8192, 28672),), "residual")}


def options(text: str) -> dict:
    """'staged=True,ahead=4' -> {'staged': True, 'ahead': 4}."""
    pairs = [item.split("=", 1) for item in re.split(r",(?![^()]*\))", text) if item]     # not inside (...)
    return {name.strip(): ast.literal_eval(value.strip()) for name, value in pairs}


def named(text: str) -> tuple[str, str]:
    name, _, rest = text.partition("=")
    return name, rest


def nf4_weight(n: int, k: int):
    """Random N(0, 0.02) weights quantized by bitsandbytes (NF4, double quant), as runner reads them."""
    from runner_cuda.fast.nf4 import nf4_weight_of

    return nf4_weight_of(cs.nf4_layer(n, k))


def time_launches(case: str, variants: list[tuple[str, dict]], bandwidth: float, cases: dict = CASES) -> dict:
    """µs of one launch of `case` per variant (CUDA graphs over copies of its weights), and whether
    its output is the default's, bit for bit."""
    import torch

    from runner_cuda.fast.nf4_cuda import NF4Mma

    shapes, mode = cases[case]
    k = shapes[0][1]
    copies = cs.copies_beyond_l2(shapes)
    weights = [[nf4_weight(n, k) for n, k in shapes] for _ in range(copies)]
    nbytes = sum(w.packed.numel() + w.absmax.numel() for w in weights[0])
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    fixed = cs.fused_options(mode, k)
    start = torch.randn(shapes[0][0], device="cuda").to(torch.bfloat16)
    rows, reference = {"copies": copies, "nf4_mb": nbytes / 1e6}, None
    for name, extra in [("base", {})] + variants:
        try:
            calls = [NF4Mma(group, **fixed, **extra) for group in weights]
        except ValueError as error:            # a choice the kernel refuses: say so, keep the others
            rows[name] = {"error": str(error)}
            continue
        residual = start.clone()
        out = (calls[0](x, out=start.clone()) if mode == "residual" else calls[0](x)).clone()
        run = (lambda i: calls[i](x, out=residual)) if mode == "residual" else (lambda i: calls[i](x))
        reference = out if reference is None else reference
        us = cs.graph_time_us(run, copies)
        first = calls[0]
        rows[name] = dict(us=us, of_copy_bandwidth=nbytes / (us / 1e6) / bandwidth, shape=(first.warps, first.split),
                          ahead=first.ahead, staged=first.staged, slots=first.slots, wide_table=first.wide_table,
                          shared_bytes=first.shared,
                          same_bits_as_base=bool(torch.equal(out, reference)))
        cs.log(case, name, json.dumps(rows[name]))
    del weights
    cs.free()
    return rows


def kind_of(weights, glu: bool, norm) -> str:
    """An NF4Mma launch's job in a Llama layer, from its weights and options (o: the square one)."""
    if glu:
        return "gate_up"
    if norm is not None:
        return "qkv"
    return "o" if sum(w.out_features for w in weights) == weights[0].in_features else "down"


def launch_kind(call) -> str:
    return kind_of(call.weights, call.glu, call.norm)


def policy(text: str) -> dict:
    """'gate_up:staged=True;down:ahead=1' -> {'gate_up': {...}, 'down': {...}}; "decoder:rope='write'"
    passes rope='write' to that policy's FastDecoder; 'attention:launch=(64,4,3,64)' sets the plain
    cache's attention.LAUNCH (block, warps, stages, most parts) for it."""
    table = {}
    for part in filter(None, text.split(";")):
        case, _, rest = part.partition(":")
        if case not in (*CASES, "decoder", "attention"):
            raise SystemExit(f"nf4_variants: {case!r} is not one of {', '.join(CASES)}, decoder, attention")
        table[case] = options(rest)
    return table


def session_rates(policies: list[tuple[str, dict]], bandwidth: float) -> dict:
    """The 8B NF4 session a step ahead at 1,024 with each policy's launches (one model, one process)."""
    from runner import budget
    from runner.backend import Sampling
    from runner.model import load_spec
    from runner_cuda.fast import attention
    from runner_cuda.fast.decoder import FastDecoder
    from runner_cuda.fast.nf4_cuda import NF4Mma

    cs.SOURCE = "memory"
    model, _ = cs.load(None, "nf4")
    spec = load_spec(cs.MODEL_ID)
    kv = budget.kv_cache_bytes(spec, 1024 + cs.AHEAD_TOKENS, 1, "nf4", "cuda")
    roofline = bandwidth / (cs.bytes_read_per_token(model) + kv)
    init, launch, results, first_tokens = NF4Mma.__init__, attention.LAUNCH[None], {}, None
    for name, table in [("base", {})] + policies:
        def with_policy(self, weights, table=table, **kwargs):
            extra = table.get(kind_of(weights, kwargs.get("glu", False), kwargs.get("norm")), {})
            init(self, weights, **{**kwargs, **extra})

        NF4Mma.__init__ = with_policy
        attention.LAUNCH[None] = table.get("attention", {}).get("launch", launch)
        try:
            decoder = FastDecoder(model, max_len=2048, **table.get("decoder", {}))
            decoder.warm_up()
            session = cs.session_over(model, decoder, "nf4", spec)
            rates = cs.decode_ahead(session, 1024, repeats=2)
            tokens = [c.token for c in session.stream_tokens(cs.prompt(1024, seed=1024), Sampling(max_tokens=64))]
        finally:
            NF4Mma.__init__, attention.LAUNCH[None] = init, launch
        first_tokens = first_tokens or tokens
        results[name] = dict(policy=table, **rates, roofline_tok_s=roofline,
                             fraction_of_roofline=max(rates["tok_s_ahead"]) / roofline,
                             same_tokens_as_first=tokens == first_tokens)
        cs.log(name, json.dumps({k: results[name][k] for k in ("tok_s_ahead", "graph_replay_back_to_back_us",
                                                               "fraction_of_roofline", "same_tokens_as_first")}))
        del session, decoder
        cs.free()
    return results


def ncu_launches() -> None:
    """The 8B's gate/up and down at their defaults, three launches each (two copies alternating)."""
    import torch

    gate_up = [default_call("gate_up") for _ in range(2)]
    down = [default_call("down") for _ in range(2)]
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    residual = torch.zeros(4096, device="cuda", dtype=torch.bfloat16)
    for i in range(3):
        gate_up[i % 2](x)
        cs.sync()
    for i in range(3):
        down[i % 2](hidden, out=residual)
        cs.sync()


def default_call(case: str):
    from runner_cuda.fast.nf4_cuda import NF4Mma

    shapes, mode = CASES[case]
    return NF4Mma([nf4_weight(n, k) for n, k in shapes], **cs.fused_options(mode, shapes[0][1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("launches", "session", "ncu"))
    parser.add_argument("--case", action="append", choices=tuple(CASES), help="launches: these only (default: all four)")
    parser.add_argument("--variant", action="append", default=[], help="launches: NAME=OPTIONS")
    parser.add_argument("--model", choices=("8b", "70b"), default="8b", help="launches: these shapes")
    parser.add_argument("--policy", action="append", default=[], help="session: NAME=CASE:OPTIONS;CASE:OPTIONS")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    if args.what == "ncu":
        ncu_launches()
        return
    args.out.mkdir(parents=True, exist_ok=True)
    bandwidth = cs.copy_bandwidth()
    results: dict = {"copy_bandwidth_gb_s": bandwidth / 1e9}
    if args.what == "launches":
        variants = [(name, options(text)) for name, text in map(named, args.variant)]
        for case in args.case or CASES:
            results[case] = time_launches(case, variants, bandwidth, CASES_70B if args.model == "70b" else CASES)
    else:
        policies = [(name, policy(text)) for name, text in map(named, args.policy)]
        results["session"] = session_rates(policies, bandwidth)
    (args.out / f"nf4_variants_{args.what}.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

"""`runner launch`: one model across several hosts with MLX (mlx.launch, ring backend).

    runner launch --backend mlx --hosts 10.0.0.1,10.0.0.2 MODEL -p "Hello"
    runner launch --hostfile hosts.json MODEL --split pipeline -p "Hello"

Rank 0 (the first host) prints the reply; the other hosts run their share and follow. Everything
heavy happens in `runner_mlx.launcher`, imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runner.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="model folder or id (default: SmolLM2-135M-Instruct); the same path on every host")
    parser.add_argument("--backend", default="mlx", help="only mlx can span hosts (default: mlx)")
    parser.add_argument("--hosts", help="comma-separated hosts, rank 0 first (e.g. 127.0.0.1,127.0.0.1)")
    parser.add_argument("--hostfile", type=Path, help="mlx.launch's JSON hostfile instead of --hosts")
    parser.add_argument("--split", choices=("auto", "pipeline", "tensor"), default="auto",
                        help="tensor: mlx-lm's sharding (heads must divide); pipeline: runner's layer ranges "
                             "sized by each host's memory; auto: tensor when it works (default)")
    parser.add_argument("--quant", choices=("q4", "q8", "bf16", "fp16", "fp32"),
                        help="q4/q8: mlx-lm quantization, group 64; bf16: none "
                             "(default: q4, or q8 for models under 1B parameters, which 4-bit ruins)")
    parser.add_argument("-p", "--prompt", help="the message to answer (without it: read one from stdin)")
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--context", type=int, default=4096, help="tokens of KV cache to plan for (default 4096)")
    parser.add_argument("--host-memory", help="RAM of each host in GB, e.g. 192,128 (default: measured)")
    parser.add_argument("--rank-timeout", type=float, default=120.0,
                        help="seconds a rank waits for the others before it gives up (default 120)")
    parser.add_argument("--show-tokens", action="store_true", help="also print the generated token ids")
    parser.add_argument("--verbose", action="store_true", help="show mlx.launch's own messages")


def run(args: argparse.Namespace) -> int:
    from runner.backend import Sampling  # validates the sampling values with clear messages

    if args.backend != "mlx":
        raise UserInputError(f"runner launch runs on several hosts only with --backend mlx, not '{args.backend}'")
    if args.hosts and args.hostfile:
        raise UserInputError("give --hosts or --hostfile, not both")
    if args.rank_timeout <= 0:
        raise UserInputError("--rank-timeout must be more than 0 seconds")
    quant = args.quant or default_quant(args.model)
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    memory = None
    if args.host_memory:
        try:
            memory = [float(x) for x in args.host_memory.split(",")]
        except ValueError:
            raise UserInputError(f"--host-memory '{args.host_memory}': expected GB per host, e.g. 192,128") from None
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            print("message (end with Enter): ", end="", file=sys.stderr, flush=True)
            prompt = sys.stdin.readline().strip()
        else:
            prompt = sys.stdin.read().strip()
    if not prompt:
        raise UserInputError("nothing to answer: give -p MESSAGE (or a message on stdin)")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}]

    from runner.backend import get_backend

    get_backend("mlx")  # says how to install mlx when it is missing
    from runner_mlx.launcher import LaunchRequest, launch

    return launch(LaunchRequest(
        model=args.model, hosts=args.hosts, hostfile=args.hostfile, split=args.split, quant=quant,
        context=args.context, messages=messages,
        sampling={"temperature": sampling.temperature, "top_p": sampling.top_p,
                  "max_tokens": sampling.max_tokens, "seed": sampling.seed},
        host_memory_gb=memory, rank_timeout=args.rank_timeout, verbose=args.verbose,
        show_tokens=args.show_tokens,
    ))


def default_quant(model: str | None) -> str:
    """q4 spreads a big model over the fewest hosts; small models do not survive it (budget's threshold)."""
    from runner.budget import SMALL_MODEL_PARAMETERS
    from runner.model import load_spec

    return "q8" if load_spec(model).parameter_count() < SMALL_MODEL_PARAMETERS else "q4"

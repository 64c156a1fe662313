"""`runner launch`: one model across several hosts with MLX (mlx.launch, ring backend). A sub-command
the mlx backend registers (`MlxBackend.commands`).

    runner launch --backend mlx --hosts 10.0.0.1,10.0.0.2 MODEL -p "Hello"
    runner launch --hostfile hosts.json MODEL --split pipeline -p "Hello"
    runner launch --hosts 10.0.0.1,10.0.0.2 MODEL          # in a terminal: the chat app
    runner launch --hosts 10.0.0.1,10.0.0.2 --probe        # the network's latency and bandwidth
    runner launch --hosts 10.0.0.1,10.0.0.2 ORG/NAME --split pipeline --pull   # each host fetches its shards

Rank 0 (the first host) owns the user interface; the other hosts run their share and follow. With
-p (or a message on stdin when it is not a terminal) rank 0 prints the reply. In a terminal without
-p the chat app opens here and rank 0, on this machine, streams each reply to it
(`runner_mlx.remote`). Everything heavy is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runner.commands.options import context_count
from runner.commands.serve import add_server_arguments
from runner.errors import UserInputError

ONE_SHOT = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 256}     # sampling of a one-shot reply


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
    parser.add_argument("-p", "--prompt", help="the message to answer (without it: the chat app in a terminal, "
                                               "else one message read from stdin)")
    # in the chat app, those given become its starting settings (else the saved ones apply)
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--max-tokens", type=int, help=f"default {ONE_SHOT['max_tokens']} (one-shot)")
    parser.add_argument("--temperature", type=float, help="0 is greedy (the one-shot default)")
    parser.add_argument("--top-p", type=float, help="default 1.0")
    parser.add_argument("--seed", type=int, help="one-shot only")
    parser.add_argument("--context", type=context_count, default=None,
                        help="tokens of KV cache to plan for, e.g. 8192 or 8k (default 4096, or the model's maximum if less)")
    parser.add_argument("--kv-bits", type=int, choices=(8, 4), default=None,
                        help="every rank stores its KV cache quantized to 8 or 4 bits (default: the compute dtype)")
    parser.add_argument("--host-memory", help="RAM of each host in GB, e.g. 192,128 (default: measured)")
    parser.add_argument("--rank-timeout", type=float, default=120.0,
                        help="seconds a rank waits for the others before it gives up (default 120)")
    parser.add_argument("--show-tokens", action="store_true", help="also print the generated token ids")
    parser.add_argument("--verbose", action="store_true", help="show mlx.launch's own messages")
    parser.add_argument("--serve", action="store_true",
                        help="rank 0 (this machine) serves the model over runner serve's OpenAI-compatible API")
    add_server_arguments(parser, host_flag="--listen")
    parser.add_argument("--pull", action="store_true",
                        help="no chat: each host downloads from the Hugging Face Hub only the safetensors files "
                             "holding its layers of the split (runner pull --layers, over ssh)")
    parser.add_argument("--probe", action="store_true",
                        help="no model: measure the latency and bandwidth between the hosts through mx.distributed "
                             "and print the --link value for runner plan")


def run(args: argparse.Namespace) -> int:
    from runner.backend import Sampling, get_backend  # Sampling validates the values with clear messages

    if args.backend != "mlx":
        raise UserInputError(f"runner launch runs on several hosts only with --backend mlx, not '{args.backend}'")
    if args.hosts and args.hostfile:
        raise UserInputError("give --hosts or --hostfile, not both")
    if args.rank_timeout <= 0:
        raise UserInputError("--rank-timeout must be more than 0 seconds")
    if args.probe:
        if args.model is not None or args.prompt is not None:
            raise UserInputError("--probe measures the network alone: give no model and no -p")
        get_backend("mlx")
        from runner_mlx.launcher import probe

        return probe(args.hosts, args.hostfile, 5, args.rank_timeout, args.verbose)
    if args.pull:     # the model is on the Hub, not here yet: planned from its config.json there
        get_backend("mlx")
        from runner_mlx.host_pull import pull_shares

        return pull_shares(args, host_memory_gb(args))
    quant = args.quant or default_quant(args.model)
    args.context = checked_context(args.model, args.context)
    given = {name: getattr(args, name) for name in ONE_SHOT if getattr(args, name) is not None}
    sampling = Sampling(**{**ONE_SHOT, **given}, seed=args.seed)       # checks the values given
    if args.serve:
        if args.prompt is not None:
            raise UserInputError("--serve answers requests over HTTP: give no -p")
        get_backend("mlx")
        return serve_from_ranks(args, quant)
    memory = host_memory_gb(args)
    get_backend("mlx")  # says how to install mlx when it is missing
    if args.prompt is None and sys.stdin.isatty() and sys.stdout.isatty():
        return chat(args, quant, given)
    prompt = args.prompt
    if prompt is None:
        prompt = sys.stdin.read().strip()
    if not prompt:
        raise UserInputError("nothing to answer: give -p MESSAGE (or a message on stdin)")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}]

    from runner_mlx.launcher import LaunchRequest, launch

    return launch(LaunchRequest(
        model=args.model, hosts=args.hosts, hostfile=args.hostfile, split=args.split, quant=quant,
        context=args.context, messages=messages,
        sampling={"temperature": sampling.temperature, "top_p": sampling.top_p,
                  "max_tokens": sampling.max_tokens, "seed": sampling.seed},
        host_memory_gb=memory, rank_timeout=args.rank_timeout, verbose=args.verbose,
        show_tokens=args.show_tokens, kv_bits=args.kv_bits,
    ))


def chat(args: argparse.Namespace, quant: str, given: dict) -> int:
    """The chat app here, each reply generated by the ranks (rank 0 on this machine serves it).
    `given`: the sampling flags on the command line, the app's starting settings over the saved ones."""
    from runner_mlx.launcher import request_hosts
    from runner_mlx.remote import LaunchSource

    from runner.tui.app import RunnerApp  # Textual is imported only when the chat really opens
    from runner.tui.loading import ModelChoice

    hosts = request_hosts(args.hosts, args.hostfile, host_memory_gb(args), 5, rank0_here=True)
    source = LaunchSource(hosts, args.split, args.context, args.rank_timeout, kv_bits=args.kv_bits)
    choice = ModelChoice(args.model, "mlx", quant, args.context)
    source.plan(choice, None)        # a split that cannot work is refused before the app opens
    app = RunnerApp(choice, source=source)
    app.initial_settings = starting_settings(app.initial_settings, given, args.system)
    try:
        app.run()
    finally:
        source.close()
    return 0


def serve_from_ranks(args: argparse.Namespace, quant: str) -> int:
    """`runner serve`'s API, each reply generated by the ranks; rank 0 runs here and answers the
    server over 127.0.0.1, as it answers the chat app."""
    from runner_mlx.launcher import request_hosts
    from runner_mlx.remote import LaunchSource

    from runner.commands.serve import check_server_arguments, serve
    from runner.tui.loading import ModelChoice

    check_server_arguments(args)
    hosts = request_hosts(args.hosts, args.hostfile, host_memory_gb(args), 5, rank0_here=True)
    source = LaunchSource(hosts, args.split, args.context, args.rank_timeout, kv_bits=args.kv_bits)
    choice = ModelChoice(args.model, "mlx", quant, args.context)
    spec, plan = source.plan(choice, None)        # a split that cannot work is refused before listening
    aliases = {spec.name.rsplit("/", 1)[-1]} | ({args.model} if args.model else set())
    try:
        return serve(args, model=spec.name, aliases=aliases, context=args.context,
                     open_model=lambda report: source.load(choice, spec, plan, report))
    finally:
        source.close()


def starting_settings(saved, given: dict, system: str | None):
    """The chat's settings: the saved ones, with the sampling flags and --system given on top."""
    import dataclasses

    extra = {"system_prompt": system} if system is not None else {}
    return dataclasses.replace(saved, **given, **extra)


def host_memory_gb(args: argparse.Namespace) -> list[float] | None:
    if not args.host_memory:
        return None
    try:
        return [float(x) for x in args.host_memory.split(",")]
    except ValueError:
        raise UserInputError(f"--host-memory '{args.host_memory}': expected GB per host, e.g. 192,128") from None


def checked_context(model: str | None, context: int | None) -> int:
    """The context to plan for: the one given, within the model's maximum, or the default."""
    from runner.choice import default_context
    from runner_mlx.launcher import launch_spec

    spec = launch_spec(model)
    if context is None:
        return default_context(spec)
    if context > spec.max_context:
        raise UserInputError(f"--context {context:,} is more than {spec.name} was trained for ({spec.max_context:,} tokens)")
    return context


def default_quant(model: str | None) -> str:
    from runner_mlx.launcher import launch_spec
    from runner_mlx.split import default_launch_quant

    return default_launch_quant(launch_spec(model))

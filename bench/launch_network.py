"""The plan's per-token network time (`runner plan --link`) against the network it models.

    scripts/fake_hosts.sh up 2 && export PATH=/tmp/runner-fake-hosts/bin:$PATH
    python bench/launch_network.py --hosts 10.77.0.1,10.77.0.2

Starts itself on every host through mlx.launch (as `runner launch` starts its ranks), measures the
link as `runner launch --probe` does, then replays, token after token, exactly the collectives
each split sends per decoded token (no compute): pipeline: the hidden state sent host to host,
the all_gather of the last host's, the stop flag's all_sum; tensor: two all_sums of the hidden
state per layer, then the stop flag's. Rank 0 prints, per model shape and split, the plan's
prediction from the measured link and the measured time per token (fastest and median).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
          "meta-llama/Llama-3.1-405B-Instruct")
TOKENS = 40


def timings(step, rounds: int) -> list[float]:
    """Seconds of `step()` (which evaluates what it sends), `rounds` times after two to warm up."""
    times = []
    for _ in range(rounds + 2):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times[2:]


def token_step(group, split: str, hidden: int, layers: int):
    """One decoded token's collectives under `split`, for a hidden state of `hidden` bf16 values."""
    import mlx.core as mx

    rank, size = group.rank(), group.size()
    h0 = mx.ones((1, 1, hidden), dtype=mx.bfloat16)
    stop = mx.zeros((1,), dtype=mx.int32)
    mx.eval(h0, stop)

    def step() -> None:
        h = h0
        if split == "tensor":
            for _ in range(2 * layers):          # attention and MLP outputs of every layer
                h = mx.distributed.all_sum(h, group=group, stream=mx.cpu) * 0.5
        else:
            if rank > 0:
                h = mx.distributed.recv_like(h, rank - 1, group=group, stream=mx.cpu)
            if rank < size - 1:
                h = mx.distributed.send(h, rank + 1, group=group, stream=mx.cpu)
            h = mx.distributed.all_gather(h, group=group, stream=mx.cpu)[-1:]
        mx.eval(h)
        mx.eval(mx.distributed.all_sum(stop, group=group, stream=mx.cpu))
    return step


def collective_step(group, kind: str, hidden: int):
    """One collective alone on a hidden state of `hidden` bf16 values."""
    import mlx.core as mx

    rank, size = group.rank(), group.size()
    h = mx.ones((1, 1, hidden), dtype=mx.bfloat16)
    mx.eval(h)

    def step() -> None:
        if kind == "send/recv":
            mx.eval(mx.distributed.send(h, 1, group=group, stream=mx.cpu) if rank == 0
                    else mx.distributed.recv_like(h, 0, group=group, stream=mx.cpu) if rank == 1 else h)
        elif kind == "all_gather":
            mx.eval(mx.distributed.all_gather(h, group=group, stream=mx.cpu))
        else:
            mx.eval(mx.distributed.all_sum(h, group=group, stream=mx.cpu))
    return step


def rank_main() -> int:
    import mlx.core as mx

    from runner import budget
    from runner.errors import UserInputError
    from runner.hardware import parse_machine
    from runner.model import load_spec
    from runner_mlx.probe import LARGE_BYTES, link_from

    group = mx.distributed.init(backend="ring", strict=True)
    small = timings(collective_step(group, "all_sum", 2), 200)           # 4 bytes
    large = timings(collective_step(group, "all_sum", LARGE_BYTES // 2), 8)
    # the fastest of many: what the network does when both hosts have a CPU free (see RESULTS.md)
    latency, bandwidth = link_from(min(small), min(large), LARGE_BYTES, group.size())
    link = budget.Link("measured (fastest of 200 and of 8)", latency, bandwidth)
    machine = parse_machine(f"{group.size()}xM2Ultra-192GB")
    rows = []
    for model_id in MODELS:
        spec = load_spec(model_id)
        for split in ("pipeline", "tensor"):
            try:
                plan = budget.make_plan(spec, machine, "bf16" if spec.parameter_count() < 1e10 else "q4", 4096, 1,
                                        "mlx", parallel=split)
            except UserInputError:       # SmolLM2's 9 heads do not divide for the tensor split
                continue
            predicted = budget.network_time(plan, link)
            measured = timings(token_step(group, split, spec.hidden_size, spec.num_layers), TOKENS)
            rows.append((spec.name, split, predicted, measured))
    sizes = sorted({load_spec(model_id).hidden_size for model_id in MODELS})
    alone = {(kind, hidden): timings(collective_step(group, kind, hidden), 50)
             for kind in ("send/recv", "all_gather", "all_sum") for hidden in sizes}
    if group.rank() == 0:
        print(f"link: {link.describe()}; 4-byte all_sum min {min(small) * 1e3:.3f} ms, median "
              f"{statistics.median(small) * 1e3:.3f} ms; 8 MiB all_sum min {min(large) * 1e3:.1f} ms, median "
              f"{statistics.median(large) * 1e3:.1f} ms")
        print(f"{'model':<38} {'split':<9} {'messages':>8} {'predicted':>10} {'fastest':>9} {'median':>9}")
        for name, split, predicted, measured in rows:
            print(f"{name:<38} {split:<9} {predicted.messages_per_token:>8} {predicted.seconds_per_token * 1e3:>8.2f}ms "
                  f"{min(measured) * 1e3:>7.2f}ms {statistics.median(measured) * 1e3:>7.2f}ms")
        print("each collective alone on a hidden state (bf16): fastest / median of 50 (the model's prediction)")
        for kind in ("send/recv", "all_gather", "all_sum"):
            messages = 1 if kind == "send/recv" else 2 * (group.size() - 1) if kind == "all_sum" else group.size() - 1
            share = group.size() if kind == "all_sum" else 1
            print(f"  {kind:<10} " + "   ".join(
                f"{hidden * 2 // 1024 or 1} KB: {min(alone[kind, hidden]) * 1e3:.2f} / "
                f"{statistics.median(alone[kind, hidden]) * 1e3:.2f} ms "
                f"({messages * link.message_seconds(hidden * 2 / share) * 1e3:.2f})" for hidden in sizes))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", help="the hosts, as for runner launch")
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        return rank_main()
    from runner_mlx.launcher import request_hosts, ring_argv, run_ranks

    hosts = request_hosts(args.hosts, None, None, 5)
    with tempfile.TemporaryDirectory() as scratch:
        argv = ring_argv(hosts, Path(scratch), False) + ["--", sys.executable, str(Path(__file__).resolve()), "--rank"]
        return run_ranks(argv, hosts, 5.0, False)


if __name__ == "__main__":
    sys.exit(main())

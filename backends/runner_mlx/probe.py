"""`runner launch --probe`: the network between the hosts as the ranks see it, measured through
mx.distributed (ring backend), in the terms `runner plan --link` uses.

Every host runs `python -m runner_mlx.probe`, started by mlx.launch like the ranks of a model. They
time all-reduces (`mx.distributed.all_sum`, what the splits use): many of one number give the
latency of one message, a few of several MB the bandwidth. Over the ring an all-reduce of S bytes
on n hosts is 2(n-1) messages of S/n, one after another, so

    small all-reduce = 2(n-1) x latency
    large all-reduce = 2(n-1) x (latency + S/n / bandwidth)

Rank 0 prints the result and the `--link` value for `runner plan`, from the fastest rounds: the
network's own time. The medians are printed beside them; far above the fastest, they say that the
hosts' CPUs are busy (a rank waits for its peer to be scheduled), which no link setting fixes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

SMALL_ROUNDS = 200
LARGE_BYTES = 8 * 2**20
LARGE_ROUNDS = 8


def all_reduce_seconds(group, count: int, rounds: int) -> list[float]:
    """Seconds of each of `rounds` all_sums of `count` float32 values over the group."""
    import mlx.core as mx

    values = mx.ones((count,), dtype=mx.float32)
    mx.eval(values)
    mx.eval(mx.distributed.all_sum(values, group=group, stream=mx.cpu))       # warm the connections
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        mx.eval(mx.distributed.all_sum(values, group=group, stream=mx.cpu))
        times.append(time.perf_counter() - started)
    return times


def link_from(small: float, large: float, large_bytes: int, hosts: int) -> tuple[float, float]:
    """(latency in s, bandwidth in bytes/s) from the two medians (see the module's note)."""
    steps = 2 * (hosts - 1)
    latency = small / steps
    per_message = max(large / steps - latency, 1e-9)
    return latency, large_bytes / hosts / per_message


def main(argv: list[str] | None = None) -> int:
    from runner_mlx.rank import EXIT_LOST_PEER
    from runner_mlx.rank import Watchdog, host_name, launcher_pid

    parser = argparse.ArgumentParser(prog="python -m runner_mlx.probe")
    parser.add_argument("--hosts", default="", help="host names by rank, for messages")
    parser.add_argument("--rank-timeout", type=float, default=120.0)
    parser.add_argument("--launcher", default="", help="HOST:PID of runner launch")
    args = parser.parse_args(argv)
    hosts = [h for h in args.hosts.split(",") if h]
    rank_env = int(os.environ.get("MLX_RANK", "0"))
    watchdog = Watchdog(f"rank {rank_env} ({host_name(hosts, rank_env)})", launcher_pid(args.launcher))
    try:
        return probe(hosts, args.rank_timeout, watchdog)
    except RuntimeError as error:
        if "[ring]" not in str(error):
            raise
        print(f"runner: error: {watchdog.name}: lost the connection to another host while {watchdog.phase}",
              file=sys.stderr, flush=True)
        return EXIT_LOST_PEER


def probe(hosts: list[str], rank_timeout: float, watchdog) -> int:
    import mlx.core as mx

    from runner_mlx.rank import Heartbeat

    watchdog.enter("joining the ring", rank_timeout)
    watchdog.listen(Heartbeat.from_ring(int(os.environ.get("MLX_RANK", "0")), hosts))
    group = mx.distributed.init(backend="ring", strict=True)
    watchdog.joined()
    watchdog.enter("measuring the network", rank_timeout)
    small = all_reduce_seconds(group, 1, SMALL_ROUNDS)
    large = all_reduce_seconds(group, LARGE_BYTES // 4, LARGE_ROUNDS)
    watchdog.enter("finishing", rank_timeout)
    watchdog.listen(None)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    if group.rank() == 0:
        latency, bandwidth = link_from(min(small), min(large), LARGE_BYTES, group.size())
        print(f"{group.size()} hosts ({', '.join(hosts)}), mx.distributed ring:\n"
              f"  all-reduce of 4 bytes: fastest {min(small) * 1e3:.3f} ms, median {statistics.median(small) * 1e3:.3f} "
              f"ms of {SMALL_ROUNDS}: {latency * 1e6:,.0f} µs per message\n"
              f"  all-reduce of {LARGE_BYTES // 2**20} MiB: fastest {min(large) * 1e3:.1f} ms, median "
              f"{statistics.median(large) * 1e3:.1f} ms of {LARGE_ROUNDS}: {bandwidth / 1e9:,.2f} GB/s\n"
              f"  for runner plan: --link {latency * 1e6:.0f}us,{bandwidth / 1e9:.3g}GB/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`runner launch --pull`: each host downloads from the Hub only the safetensors files its share
of the split reads.

    runner launch --hosts mac1,mac2 meta-llama/Llama-3.1-405B-Instruct --split pipeline --pull

The split is planned here from the repository's config.json (read from the Hub, nothing written),
as `runner launch` would plan it; then every host runs `runner pull MODEL --revision COMMIT
--layers START:STOP` (this machine directly, the others over ssh, all hosts at once), so that
each one fetches the shards holding its layers and the embeddings and head, all of the same
commit, into the same folder of its Hugging Face cache. A tensor split reads a slice of every
layer: each host fetches every shard.

`runner launch` then starts from the shares: each rank converts and loads only the layers its host
holds (`runner_mlx.convert`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading

from runner.errors import RunnerError, UserInputError

# the pull command each host runs: the same python as here (runner launch's rule: same path everywhere)
RUNNER_MAIN = "import sys; from runner.cli import main; sys.exit(main(sys.argv[1:]))"
# what each host's pull needs to see as this machine does: the Hub's address and the cache's place
FORWARDED_ENV = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "RUNNER_HOME")
CONNECT_TIMEOUT = 5


def pull_command(repo_id: str, commit: str, layers: tuple[int, int] | None) -> list[str]:
    share = ["--layers", f"{layers[0]}:{layers[1]}"] if layers is not None else []
    return [sys.executable, "-c", RUNNER_MAIN, "pull", repo_id, "--revision", commit, *share]


def remote_command(argv: list[str]) -> str:
    """`argv` as one shell line for ssh, with this machine's Hub and cache settings."""
    env = [f"{name}={os.environ[name]}" for name in FORWARDED_ENV if os.environ.get(name)]
    return shlex.join(["env", *env, *argv] if env else argv)


def run_queues(queues: list[list[tuple[str, list[str]]]]) -> list[tuple[str, int]]:
    """Each machine's pulls one after the other, the machines at the same time; (host, exit code) of
    those that failed. One machine: its bars as they are; several: each line named by its host."""
    if len(queues) == 1:
        for name, command in queues[0]:
            code = subprocess.run(command, stdin=subprocess.DEVNULL).returncode
            if code != 0:
                return [(name, code)]
        return []
    lock = threading.Lock()
    failed: list[tuple[str, int]] = []

    def relay(name: str, stream) -> None:
        for line in stream:
            if line.strip():
                with lock:
                    print(f"{name} │ {line.rstrip()}", file=sys.stderr, flush=True)

    def run(queue: list[tuple[str, list[str]]]) -> None:
        for name, command in queue:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, errors="replace")
            # each stream on its own: rich leaves its last bar's line open until it stops
            readers = [threading.Thread(target=relay, args=(name, stream), daemon=True)
                       for stream in (process.stdout, process.stderr)]
            for reader in readers:
                reader.start()
            for reader in readers:
                reader.join()
            if process.wait() != 0:
                with lock:
                    failed.append((name, process.returncode))
                return

    threads = [threading.Thread(target=run, args=(queue,), daemon=True) for queue in queues]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failed


def pull_shares(args: argparse.Namespace, memory_gb: list[float] | None) -> int:
    from runner import download
    from runner.choice import default_context
    from runner.model import spec_from_config
    from runner_mlx.launcher import plan_launch, request_hosts, ssh_command
    from runner_mlx.split import default_launch_quant

    if args.prompt is not None or args.serve:
        raise UserInputError("--pull only downloads each host's share: give no -p and no --serve")
    repo_id = download.check_repo_id(args.model)
    hosts = request_hosts(args.hosts, args.hostfile, memory_gb, CONNECT_TIMEOUT)
    pull = download.prepare(repo_id)
    spec = spec_from_config(pull.config, pull.repo_id, "hub")
    quant = args.quant or default_launch_quant(spec)
    context = args.context or default_context(spec)
    if context > spec.max_context:
        raise UserInputError(f"--context {context:,} is more than {spec.name} was trained for ({spec.max_context:,} tokens)")
    plan = plan_launch(spec, quant, context, hosts, args.split, args.kv_bits)
    for line in plan.describe():
        print(f"runner: {line}", file=sys.stderr, flush=True)
    queues: dict[str, list[tuple[str, list[str]]]] = {}    # one queue per machine: two pulls never share a cache
    for host, share in zip(plan.hosts, plan.shares):
        layers = share.layers if plan.split == "pipeline" else None
        what = f"layers {layers[0]}-{layers[1] - 1}" if layers else "all layers: tensor split"
        print(f"runner: {host.name}: pulling {pull.repo_id} ({what}) at {pull.commit[:12]}", file=sys.stderr, flush=True)
        argv = pull_command(pull.repo_id, pull.commit, layers)
        command = argv if host.local else ssh_command(host.name, remote_command(argv), CONNECT_TIMEOUT)
        queues.setdefault("" if host.local else host.name, []).append((host.name, command))
    failed = run_queues(list(queues.values()))
    if failed:
        raise RunnerError("; ".join(f"{name}: its runner pull stopped (exit code {code})" for name, code in failed)
                          + "; what arrived is kept: run the same runner launch --pull again to resume")
    print(f"runner: every host holds its share of {pull.repo_id} in {pull.snapshot}", file=sys.stderr, flush=True)
    if plan.split == "pipeline":
        print(f"runner: next: the same runner launch without --pull starts {pull.repo_id} from these shares "
              "(the same hosts and options: the same split)", file=sys.stderr)
    return 0

"""Start a model on several hosts through `mlx.launch` (ring backend) and supervise the ranks.

`runner launch` calls `launch(...)`. Before anything starts it checks every host (resolvable,
reachable over ssh, its memory), plans the split (`runner_mlx.split`) and prints each host's
share; then it runs

    mlx.launch --backend ring --hostfile H.json --starting-port P -- python -m runner_mlx.rank ...

relays rank 0's reply as it streams, and watches mlx.launch's report of each rank. mlx.launch
itself exits 0 even when a rank fails, so runner reads "Node with rank N exited with code C"
and turns it into one clear line and an exit code. When a rank dies, mlx.launch stops the others;
if that does not end everything within `grace` seconds (a frozen peer ignores SIGTERM), runner kills
the whole process group: no rank is left behind.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import RunnerError, UserInputError

from runner_mlx.rank import EXIT_LOST_PEER, EXIT_SILENT_PEER, EXIT_STOPPED, EXIT_WATCHDOG
from runner_mlx.split import HostShare, LaunchHost
from runner.words import counted

if TYPE_CHECKING:
    from runner.budget import Plan
    from runner.model import ModelSpec

ANSI = re.compile(r"\x1b\[[0-9;]*m")
NODE_EXIT = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
SILENT_PEER = re.compile(r"^runner: error: rank \d+ \(.*\): no heartbeat from rank (\d+) \(.*\) for (\d+) s while (.*?): ")


# ---- hosts ------------------------------------------------------------------------------------


def read_hostfile(path: Path) -> list[tuple[str, list[str]]]:
    """(ssh name, ips) per host from mlx.launch's JSON hostfile (a list, or {"hosts": [...]})."""
    try:
        data = json.loads(Path(path).read_text())
        hosts = data["hosts"] if isinstance(data, dict) else data
        return [(str(h["ssh"]), [str(ip) for ip in h.get("ips", [])]) for h in hosts]
    except OSError as error:
        raise UserInputError(f"{path}: cannot read the hostfile ({error.strerror})") from None
    except (ValueError, KeyError, TypeError) as error:
        raise UserInputError(f"{path}: not an mlx.launch hostfile ({error}); expected "
                             '[{"ssh": "host1", "ips": ["10.0.0.1"]}, ...]') from None


def is_local_ip(ip: str) -> bool:
    """Loopback, or an address of one of this machine's network interfaces."""
    import psutil

    try:
        if ipaddress.ip_address(ip).is_loopback:
            return True
    except ValueError:
        raise UserInputError(f"'{ip}' is not an IP address (the ring backend connects to IPs)") from None
    return any(address.address == ip for addresses in psutil.net_if_addrs().values() for address in addresses)


def resolve_hosts(entries: list[tuple[str, list[str]]]) -> list[tuple[str, str, bool]]:
    """(name, ip, local) per host; a name that does not resolve is an error."""
    hosts = []
    for name, ips in entries:
        if not ips:
            try:
                ips = [socket.gethostbyname(name)]
            except OSError:
                raise UserInputError(f"cannot resolve host '{name}': check the name, or give its IP address") from None
        hosts.append((name, ips[0], is_local_ip(ips[0])))
    return hosts


def ssh_command(host: str, command: str, timeout: int) -> list[str]:
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}", host, command]


def check_reachable(name: str, timeout: int) -> None:
    """A remote host must answer ssh without a password prompt within `timeout` seconds."""
    if shutil.which("ssh") is None:
        raise UserInputError(f"cannot reach {name}: no ssh client here (mlx.launch starts remote ranks over ssh)")
    try:
        done = subprocess.run(ssh_command(name, "true", timeout), capture_output=True, text=True,
                              timeout=timeout + 5, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserInputError(f"cannot reach {name}: ssh did not answer within {timeout} s") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["ssh failed"])[-1]
        raise UserInputError(f"cannot reach {name} over ssh ({why}); runner launch needs "
                             "password-less ssh (ssh-copy-id) to every other host")


def check_remote_files(name: str, model: Path, timeout: int) -> tuple[int, int] | None:
    """The ranks start as `sys.executable -m runner_mlx.rank --model MODEL` on every host: both paths
    must be there on `name` before anything starts. Returns the layers `name` holds when its model
    folder is a share (`runner launch --pull`), None when it holds the whole model."""
    import shlex

    from runner.model import PARTIAL_PULL_MARKER
    from runner_mlx.convert import marker_layers

    python, config = shlex.quote(sys.executable), shlex.quote(str(model / "config.json"))
    marker = shlex.quote(str(model / PARTIAL_PULL_MARKER))
    probe = f"test -x {python} || echo python; test -f {config} || echo model; cat {marker} 2>/dev/null; true"
    try:
        done = subprocess.run(ssh_command(name, probe, timeout), capture_output=True, text=True,
                              timeout=timeout + 5, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserInputError(f"cannot reach {name}: ssh did not answer within {timeout} s") from None
    words, brace, marker = done.stdout.partition("{")
    missing = words.split()
    if done.returncode != 0:
        raise UserInputError(f"cannot check the model on {name} over ssh "
                             f"({(done.stderr.strip().splitlines() or ['ssh failed'])[-1]})")
    if "python" in missing:
        raise UserInputError(f"{name} has no {sys.executable}: runner launch starts every rank with this "
                             "python at the same path on every host; install runner there the same way")
    if "model" in missing:
        raise UserInputError(f"{name} has no model at {model} (no config.json there): runner launch needs the "
                             f"model folder at the same path on every host; copy it, e.g. rsync -a {model}/ "
                             f"{name}:{model}/")
    return marker_layers(brace + marker, f"{name} holds") if brace else None


def remote_facts(name: str, timeout: int) -> tuple[int, str]:
    """(RAM bytes, os) of a remote host, over ssh."""
    probe = ("uname -s; sysctl -n hw.memsize 2>/dev/null || "
             "awk '/MemTotal/ {print $2 * 1024}' /proc/meminfo")
    done = subprocess.run(ssh_command(name, probe, timeout), capture_output=True, text=True,
                          timeout=timeout + 5, stdin=subprocess.DEVNULL)
    try:
        system, memory = done.stdout.split()[:2]
        return int(float(memory)), system.lower()
    except ValueError:
        raise UserInputError(f"cannot read the memory of {name}; give it with --host-memory") from None


def launch_hosts(entries: list[tuple[str, list[str]]], memory_gb: list[float] | None,
                 timeout: int) -> list[LaunchHost]:
    """Resolve, reach and measure every host, before anything starts."""
    import psutil

    if memory_gb is not None and len(memory_gb) != len(entries):
        raise UserInputError(f"--host-memory gives {len(memory_gb)} sizes for {len(entries)} hosts")
    hosts = []
    for rank, (name, ip, local) in enumerate(resolve_hosts(entries)):
        if local:
            ram, system = int(psutil.virtual_memory().total), sys.platform
        else:
            check_reachable(name, timeout)
            ram, system = remote_facts(name, timeout)
        if memory_gb is not None:
            ram = int(memory_gb[rank] * 1024**3)
        hosts.append(LaunchHost(name, ip, local, ram, system))
    return hosts


def free_port_range(count: int) -> int:
    """A starting port with `count` free ports after it, for TCP (the ring listens on port + rank)
    and UDP (each rank's heartbeat)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("", 0))
            start = probe.getsockname()[1]
        if start + count >= 65535:
            continue
        try:
            for port in range(start, start + count):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind(("", port))
            return start
        except OSError:
            continue
    raise RunnerError("no free ports for the ring")


def mlx_launch_command() -> list[str]:
    """mlx.launch, run through runner_mlx.quiet_launch (the same program without the busy loop
    that spins a CPU core per rank)."""
    import importlib.util

    if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx._distributed_utils.launch") is None:
        raise UserInputError("mlx.launch not found: pip install 'runner[mlx]'")
    return [sys.executable, "-m", "runner_mlx.quiet_launch"]


# ---- running and watching -------------------------------------------------------------------


class RankReport:
    """What mlx.launch and the ranks said, read from mlx.launch's stderr as it comes."""

    def __init__(self, hosts: list[LaunchHost], verbose: bool, echo=None):
        """`echo(line)` receives what is worth showing (default: this process's stderr)."""
        self.hosts = hosts
        self.verbose = verbose
        self.echo = echo or self._to_stderr
        self.exits: dict[int, int] = {}      # rank -> exit code (-signal when killed)
        self.silent: dict[int, str] = {}     # rank -> how another rank saw it go silent
        self.first_failure: float | None = None

    @staticmethod
    def _to_stderr(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def read(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = ANSI.sub("", raw.decode(errors="replace")).rstrip("\n")
            match = NODE_EXIT.search(line)
            if match:
                rank = int(match.group(1))
                self.exits[rank] = int(match.group(2)) if match.group(2) else -signal.SIGTERM
                if self.first_failure is None:
                    self.first_failure = time.monotonic()
                if not self.verbose:
                    continue
            silent = SILENT_PEER.match(line)
            if silent:
                self.silent.setdefault(int(silent.group(1)), f"for {silent.group(2)} s while {silent.group(3)}")
                if not self.verbose:
                    continue         # the verdict names the silent rank
            if line.startswith("[ring]") and not self.verbose:
                continue             # mlx's own socket chatter; the ranks say what it means
            self.echo(line)

    def verdict(self) -> tuple[int, str | None]:
        """(exit code, one line) for the whole run."""
        if not self.exits:
            return 0, None
        # the cause is the rank that failed by itself, not one stopped because of it
        followers = (EXIT_STOPPED, EXIT_LOST_PEER, EXIT_SILENT_PEER, -signal.SIGTERM, 128 + signal.SIGTERM)
        # ssh exits 255 when its rank dies, and when mlx.launch stops it because that rank went silent
        causes = [r for r, code in sorted(self.exits.items())
                  if code not in followers and not (code == 255 and self.remote(r) and r in self.silent)]
        if not causes and self.silent:           # a host gone quiet: dead, frozen or cut off
            rank = min(self.silent)
            return 1, (f"{self.host(rank)} stopped answering (no heartbeat {self.silent[rank]}): the host "
                       "died, froze or lost the network; every rank was stopped")
        rank = (causes or sorted(self.exits))[0]
        code = self.exits[rank]
        if code == 255 and self.remote(rank):
            how = "ended without an exit status over ssh (killed, or the connection dropped)"
        elif code < 0:
            how = f"died (killed by signal {-code}, {signal.Signals(-code).name})"
        elif code == EXIT_WATCHDOG:
            how = "stopped by its watchdog (no answer from the other hosts)"
        elif code == EXIT_LOST_PEER:
            how = "lost the connection to the other hosts"
        else:
            how = f"stopped with exit code {code}"
        return (2 if code == 2 else 1), f"{self.host(rank)} {how}; every rank was stopped"

    def remote(self, rank: int) -> bool:
        return rank < len(self.hosts) and not self.hosts[rank].local

    def host(self, rank: int) -> str:
        return f"rank {rank} ({self.hosts[rank].name if rank < len(self.hosts) else f'host {rank}'})"


class Stopped(Exception):
    """runner launch itself was asked to stop (SIGTERM, SIGHUP) or its output was closed."""


def run_ranks(launch_argv: list[str], hosts: list[LaunchHost], grace: float, verbose: bool,
              on_start=None) -> int:
    """Run mlx.launch, relay output, stop everything on failure; return the exit code.

    mlx.launch and the local ranks run in a process group of their own, which is killed on the way
    out whatever happens (a failure, Ctrl-C, SIGTERM, a closed pipe): nothing outlives runner."""
    process = subprocess.Popen(launch_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    if on_start is not None:
        on_start(process)
    report = RankReport(hosts, verbose)
    output_closed = threading.Event()

    def relay_stdout() -> None:
        for chunk in iter(lambda: os.read(process.stdout.fileno(), 4096), b""):
            try:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            except (BrokenPipeError, ValueError, OSError):
                output_closed.set()     # whoever read the reply is gone: stop the ranks
                return

    def stop(signum, _frame):
        raise Stopped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    threads = [threading.Thread(target=relay_stdout, daemon=True),
               threading.Thread(target=report.read, args=(process.stderr,), daemon=True)]
    for thread in threads:
        thread.start()
    try:
        while process.poll() is None:
            if report.first_failure is not None and time.monotonic() - report.first_failure > grace:
                break
            if output_closed.is_set():
                raise Stopped("the output was closed")
            time.sleep(0.1)
    except (KeyboardInterrupt, Stopped) as why:
        kill_group(process, signal.SIGTERM)     # the ranks say why they stop
        time.sleep(1)
        print(f"runner: error: stopped ({str(why) or 'interrupted'}); every rank was stopped", file=sys.stderr, flush=True)
        return 130 if isinstance(why, KeyboardInterrupt) else 1
    finally:
        kill_group(process, signal.SIGKILL)      # whatever is left of the ranks on this machine
        process.wait()
        for thread in threads:
            thread.join(timeout=2)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code, line = report.verdict()
    if line:
        print(f"runner: error: {line}", file=sys.stderr, flush=True)
    return code


def kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---- the whole launch -----------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchRequest:
    model: str | None
    hosts: str | None                # "h1,h2"
    hostfile: Path | None
    split: str                       # "auto", "pipeline" or "tensor"
    quant: str
    context: int
    messages: list[dict]
    sampling: dict
    host_memory_gb: list[float] | None = None
    rank_timeout: float = 120.0
    connect_timeout: int = 5
    grace: float = 5.0                # after a rank fails, how long mlx.launch gets to stop the rest
    verbose: bool = False
    show_tokens: bool = False
    kv_bits: int | None = None        # the KV cache quantized to 8 or 4 bits on every rank


@dataclass(frozen=True)
class LaunchPlan:
    """How one model is split over the hosts, worked out before any rank starts."""

    spec: "ModelSpec"
    quant: str
    context: int
    split: str                       # "pipeline" or "tensor"
    why: str                         # why this split, in words
    hosts: tuple[LaunchHost, ...]
    shares: tuple[HostShare, ...]
    kv_bits: int | None = None

    def describe(self) -> list[str]:
        lines = [f"{self.spec.name} ({self.quant}, {counted(self.context, 'token')} of context) over "
                 f"{len(self.hosts)} hosts, {self.why}:"]
        return lines + [f"  {share.describe(self.spec.num_layers, self.split)}" for share in self.shares]

    def as_plan(self) -> "Plan":
        """The same split as a runner Plan, one device per host, for the chat app's plan panel."""
        from runner.budget import FITS, DeviceShare, Plan
        from runner.hardware import Host, Machine

        machine = Machine(tuple(Host(share.host, host.os, host.ram_bytes, host.ram_bytes, 0, 0, 0, (),
                                     unified_memory=host.os == "darwin")
                                for host, share in zip(self.hosts, self.shares)),
                          "the hosts of runner launch")
        last = len(self.shares) - 1
        placement = tuple(
            DeviceShare(share.host, "unified" if host.os == "darwin" else "cpu", share.capacity_bytes,
                        share.weights_bytes, share.kv_cache_bytes, share.overhead_bytes, share.layers,
                        embeddings=True, head=self.split == "tensor" or rank == last)
            for rank, (host, share) in enumerate(zip(self.hosts, self.shares)))
        return Plan(
            model=self.spec, machine=machine, quant=self.quant, context=self.context, batch=1, backend="mlx",
            weights_bytes=sum(s.weights_bytes for s in placement),
            kv_cache_bytes=sum(s.kv_cache_bytes for s in placement),
            overhead_bytes=sum(s.overhead_bytes for s in placement),
            placement=placement, verdict=FITS, warnings=(), roofline_tokens_per_s=0.0, parallel=self.split,
            kv_bits=self.kv_bits,
            notes=(self.why, *(f"{share.host}: layers {share.layers[0]}-{share.layers[1] - 1}" if self.split == "pipeline"
                               else f"{share.host}: 1/{len(self.shares)} of every layer" for share in self.shares)))


def request_hosts(hosts: str | None, hostfile: Path | None, memory_gb: list[float] | None,
                  connect_timeout: int, rank0_here: bool = False) -> list[LaunchHost]:
    """The hosts of --hosts or --hostfile, resolved, reached and measured. `rank0_here`: the first
    host must be this machine (the chat app talks to rank 0 over 127.0.0.1)."""
    if hostfile is not None:
        entries = read_hostfile(hostfile)
    elif hosts:
        entries = [(h.strip(), []) for h in hosts.split(",")]
        if any(not ssh for ssh, _ in entries):
            raise UserInputError(f"--hosts '{hosts}': empty host name")
    else:
        raise UserInputError("say where to run: --hosts HOST1,HOST2 or --hostfile FILE")
    if len(entries) < 2:
        raise UserInputError("runner launch needs at least two hosts (for one, use runner generate)")
    if rank0_here:
        name, _, local = resolve_hosts(entries[:1])[0]
        if not local:
            raise UserInputError(
                f"the chat needs the first host to be this machine (rank 0 serves the app over 127.0.0.1), "
                f"and {name} is not: put this machine first, or give -p for a one-shot reply")
    return launch_hosts(entries, memory_gb, connect_timeout)


def plan_launch(spec: "ModelSpec", quant: str, context: int, hosts: list[LaunchHost], wanted: str,
                kv_bits: int | None = None) -> LaunchPlan:
    """The split and each host's share; UserInputError or DoesNotFit when it cannot work."""
    from runner_mlx.split import choose_split, plan_hosts

    split, why = choose_split(spec, quant, len(hosts), wanted)
    shares = plan_hosts(spec, quant, context, hosts, split, kv_bits)
    return LaunchPlan(spec, quant, context, split, why, tuple(hosts), tuple(shares), kv_bits)


def mlx_launch_argv(plan: LaunchPlan, scratch: Path, rank_timeout: float, verbose: bool,
                    rank_options: list[str]) -> list[str]:
    """The mlx.launch command that starts `runner_mlx.rank` on every host (its hostfile goes in `scratch`)."""
    rank_command = [
        sys.executable, "-m", "runner_mlx.rank",
        "--model", str(plan.spec.path), "--quant", plan.quant, "--split", plan.split,
        "--layers", ",".join(f"{s.layers[0]}:{s.layers[1]}" for s in plan.shares),
        "--share-bytes", ",".join(str(s.total_bytes) for s in plan.shares),
        "--hosts", ",".join(h.name for h in plan.hosts),
        "--rank-timeout", str(rank_timeout),
        "--launcher", f"{socket.gethostname()}:{os.getpid()}",
        *(["--kv-bits", str(plan.kv_bits)] if plan.kv_bits is not None else []),
        "--context", str(plan.context),
        *rank_options,
    ]
    return ring_argv(plan.hosts, scratch, verbose) + ["--", *rank_command]


def ring_argv(hosts, scratch: Path, verbose: bool) -> list[str]:
    """mlx.launch with a ring over `hosts` (its hostfile goes in `scratch`), up to the rank's command."""
    hostfile = Path(scratch) / "hosts.json"
    # mlx.launch starts a rank without ssh only when its host is spelled "127.0.0.1"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1" if h.local else h.name, "ips": [h.ip]} for h in hosts]))
    argv = [*mlx_launch_command(), "--backend", "ring", "--hostfile", str(hostfile),
            "--starting-port", str(free_port_range(len(hosts)))]
    if os.environ.get("RUNNER_HOME"):
        argv += ["--env", f"RUNNER_HOME={os.environ['RUNNER_HOME']}"]
    if verbose:
        argv.append("--verbose")
    return argv


def launch_spec(model: str | None) -> "ModelSpec":
    """`load_spec`, and also a model id of which the HF cache holds only this host's share
    (`runner launch --pull`): runner chat does not offer such a snapshot, runner launch starts from it."""
    from runner.model import hf_cache_snapshot, load_spec, read_config, spec_from_config
    from runner.paths import user_path
    from runner.store import share_snapshot

    if model and not user_path(model).exists() and hf_cache_snapshot(model) is None:
        share = share_snapshot(model)
        if share is not None:
            snapshot = share[0]
            return spec_from_config(read_config(snapshot / "config.json", model), model, "hf-cache", snapshot)
    return load_spec(model)


def check_holdings(plan: LaunchPlan, connect_timeout: int) -> None:
    """Every host holds the model folder and runner's python at the same paths, and either the
    whole model or a share (`runner launch --pull`) with the layers this split gives it."""
    from runner_mlx.convert import covers, held_layers, share_refusal

    folder = Path(plan.spec.path)
    for host, share in zip(plan.hosts, plan.shares):
        held = held_layers(folder) if host.local else check_remote_files(host.name, folder, connect_timeout)
        needed = share.layers if plan.split == "pipeline" else (0, plan.spec.num_layers)
        if not covers(held, needed):
            raise UserInputError(share_refusal(share.host, plan.spec.name, held, needed))


def convert_here(plan: LaunchPlan, on_progress) -> None:
    """Convert once here, before the ranks start, when this machine runs one of them (a share: the
    layers it holds)."""
    local = [share for host, share in zip(plan.hosts, plan.shares) if host.local]
    if local:
        from runner_mlx.convert import mlx_folder

        layers = local[0].layers if plan.split == "pipeline" else (0, plan.spec.num_layers)
        mlx_folder(Path(plan.spec.path), plan.quant, on_progress, layers)


def launch(request: LaunchRequest, on_start=None) -> int:
    """One-shot: answer `request.messages` over the hosts, printing the reply as it streams."""
    hosts = request_hosts(request.hosts, request.hostfile, request.host_memory_gb, request.connect_timeout)
    spec = launch_spec(request.model)
    if spec.path is None:
        raise UserInputError(f"{spec.name}: no local folder with weights; runner launch needs the model "
                             "folder at the same path on every host")
    plan = plan_launch(spec, request.quant, request.context, hosts, request.split, request.kv_bits)
    check_holdings(plan, request.connect_timeout)
    for line in plan.describe():
        print(f"runner: {line}", file=sys.stderr)
    sys.stderr.flush()
    convert_here(plan, lambda p: print(f"runner: {p.stage} {p.done}/{p.total}" if p.total else f"runner: {p.stage}",
                                       file=sys.stderr, flush=True))
    options = ["--request-json", json.dumps({"messages": request.messages, "sampling": request.sampling})]
    if request.show_tokens:
        options.append("--show-tokens")
    with tempfile.TemporaryDirectory(prefix="runner-launch-") as scratch:
        argv = mlx_launch_argv(plan, Path(scratch), request.rank_timeout, request.verbose, options)
        return run_ranks(argv, hosts, request.grace, request.verbose, on_start)


def probe(hosts: str | None, hostfile: Path | None, connect_timeout: int, rank_timeout: float,
          verbose: bool) -> int:
    """`runner launch --probe`: latency and bandwidth between the hosts, through mx.distributed."""
    checked = request_hosts(hosts, hostfile, None, connect_timeout)
    names = [h.name for h in checked]
    print(f"runner: measuring the network between {', '.join(names)} (all-reduces through mx.distributed)",
          file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "runner_mlx.probe", "--hosts", ",".join(names),
               "--rank-timeout", str(rank_timeout), "--launcher", f"{socket.gethostname()}:{os.getpid()}"]
    with tempfile.TemporaryDirectory(prefix="runner-probe-") as scratch:
        return run_ranks(ring_argv(checked, Path(scratch), verbose) + ["--", *command], checked, 5.0, verbose)

"""`runner launch` over ssh between separate network stacks: two fake hosts (network namespaces with
their own sshd, tests/fake_hosts.py), mlx.launch reaching each over ssh, the ring over their 10.x
addresses. runner launch runs on this machine (both ranks remote) or on host 1 (rank 0 local).

Every test has a time limit and checks that nothing is left running on any host. The module skips,
with the reason, where fake hosts cannot be made (not root, no network namespaces, no sshd).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from fake_hosts import fake_hosts  # noqa: F401  (the fixture)
from conftest import LONG_CONTEXT
from mlx_helpers import PROMPT, copy_model, greedy_tokens, load

pytest.importorskip("mlx_lm")

RUNNER = "import sys\nfrom runner.cli import main\nsys.exit(main(sys.argv[1:]))"


def launch(hosts, *args: str, timeout: float = 240, on_host: int | None = None) -> subprocess.CompletedProcess:
    """`runner launch ARGS` with the fake hosts' ssh, here or on host `on_host`."""
    prefix = hosts.in_namespace(on_host) if on_host else []
    return subprocess.run([*prefix, sys.executable, "-c", RUNNER, "launch", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=hosts.env)


def launched_tokens(stderr: str) -> list[int]:
    match = re.search(r"runner: tokens: ([\d ]+)", stderr)
    assert match, stderr
    return [int(t) for t in match.group(1).split()]


def single_process(folder, quant: str, max_tokens: int) -> list[int]:
    """The greedy tokens of one process (this also converts the model once, for the ranks)."""
    session = load(folder, quant)
    tokens = greedy_tokens(session, max_tokens=max_tokens)
    session.close()
    return tokens


def nothing_left(hosts, within: float = 15) -> list[psutil.Process]:
    """What still runs on the hosts (besides sshd) after `within` seconds; [] is the goal."""
    deadline = time.monotonic() + within
    while True:
        left = [p for host in (1, 2) for p in hosts.processes(host)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def assert_one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("runner: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr and "CalledProcessError" not in stderr, stderr
    return errors[0]


# ---- the same tokens as one process ---------------------------------------------------------


@pytest.mark.slow
def test_pipeline_over_ssh_gives_one_process_tokens_and_stdout_holds_the_reply_alone(fake_hosts, tiny_llama_dir):
    expected = single_process(tiny_llama_dir, "q4", 16)
    done = launch(fake_hosts, str(tiny_llama_dir), "--hosts", ",".join(fake_hosts.ips), "--split", "pipeline",
                  "--quant", "q4", "-p", PROMPT, "--max-tokens", "16", "--show-tokens")
    assert done.returncode == 0, done.stderr
    assert launched_tokens(done.stderr) == expected
    h1, h2 = fake_hosts.ips
    assert f"rank 0 ({h1}): layers 0-0" in done.stderr and f"rank 1 ({h2}): layers 1-1" in done.stderr
    # what ssh -tt used to merge into stdout: the ranks' status lines, CRLF line ends
    assert "runner:" not in done.stdout and "\r" not in done.stdout, done.stdout
    assert done.stdout.endswith("\n") and done.stdout.strip()
    assert re.search(r"runner: 16 tokens, [\d.]+ tokens/s over 2 hosts", done.stderr), done.stderr
    assert nothing_left(fake_hosts) == []


@pytest.mark.slow
def test_tensor_split_over_ssh_gives_one_process_tokens(fake_hosts, tiny_llama_dir):
    expected = single_process(tiny_llama_dir, "fp32", 16)
    done = launch(fake_hosts, str(tiny_llama_dir), "--hosts", ",".join(fake_hosts.ips), "--split", "tensor",
                  "--quant", "fp32", "-p", PROMPT, "--max-tokens", "16", "--show-tokens")
    assert done.returncode == 0, done.stderr
    assert "1/2 of every layer" in done.stderr
    assert launched_tokens(done.stderr) == expected
    assert "runner:" not in done.stdout and "\r" not in done.stdout
    assert nothing_left(fake_hosts) == []


@pytest.mark.slow
def test_default_model_from_host_1_answers_as_one_process(fake_hosts, default_model_dir):
    """runner launch on host 1 (rank 0 runs there without ssh), rank 1 over ssh on host 2."""
    from runner.backend import Message, Sampling

    session = load(default_model_dir, "q8")
    chunks = list(session.stream([Message("user", PROMPT)], Sampling(max_tokens=12)))
    session.close()
    done = launch(fake_hosts, "--hosts", ",".join(fake_hosts.ips), "--quant", "q8", "-p", PROMPT,
                  "--max-tokens", "12", "--show-tokens", on_host=1)
    assert done.returncode == 0, done.stderr
    assert launched_tokens(done.stderr) == [c.token for c in chunks if c.token is not None]
    assert done.stdout == "".join(c.text for c in chunks) + "\n"
    assert nothing_left(fake_hosts) == []


CHAT = """
import json, sys
from runner.backend import Message, Sampling
from runner.tui.loading import ModelChoice
from runner_mlx.launcher import request_hosts
from runner_mlx.remote import LaunchSource

model, hosts = sys.argv[1:3]
source = LaunchSource(request_hosts(hosts, None, None, 5, rank0_here=True), "pipeline", 256, rank_timeout=60)
choice = ModelChoice(model, "mlx", "q4", 256)
spec, plan = source.plan(choice, None)
session = source.load(choice, spec, plan, None)
replies = []
for turn in json.loads(sys.argv[3]):
    chunks = list(session.stream([Message(**m) for m in turn], Sampling(max_tokens=8)))
    replies.append([c.token for c in chunks if c.token is not None])
session.close()
source.close()
print(json.dumps(replies))
"""


@pytest.mark.slow
def test_chat_from_host_1_over_ssh_keeps_one_process_tokens_turn_after_turn(fake_hosts, tiny_llama_dir):
    """The chat app's source on host 1 (rank 0 serves it there), rank 1 over ssh on host 2: two turns,
    the second reusing each rank's kept KV cache, each the single process's greedy continuation."""
    from runner.backend import Message, Sampling

    session = load(tiny_llama_dir, "q4")
    first = [Message("user", PROMPT)]
    chunks = list(session.stream(first, Sampling(max_tokens=8)))
    second = first + [Message("assistant", "".join(c.text for c in chunks)), Message("user", "And of Germany?")]
    expected = [[c.token for c in chunks if c.token is not None],
                [c.token for c in session.stream(second, Sampling(max_tokens=8)) if c.token is not None]]
    session.close()
    turns = json.dumps([[{"role": m.role, "content": m.content} for m in turn] for turn in (first, second)])
    done = subprocess.run([*fake_hosts.in_namespace(1), sys.executable, "-c", CHAT, str(tiny_llama_dir),
                           ",".join(fake_hosts.ips), turns], capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL, env=fake_hosts.env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected
    assert nothing_left(fake_hosts) == []


# ---- refused before anything starts ---------------------------------------------------------


def test_a_host_nobody_answers_at_is_refused_in_bounded_time(fake_hosts, tiny_llama_dir):
    started = time.monotonic()
    done = launch(fake_hosts, str(tiny_llama_dir), "--hosts", f"{fake_hosts.ips[0]},{fake_hosts.nobody}",
                  "-p", "hi", timeout=60)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 30
    assert done.stderr.startswith(f"runner: error: cannot reach {fake_hosts.nobody}"), done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_a_host_that_refuses_ssh_is_refused(fake_hosts, tiny_llama_dir, tmp_path):
    hostfile = tmp_path / "hosts.json"
    closed = fake_hosts.closed_port_alias(2)
    hostfile.write_text(json.dumps([{"ssh": fake_hosts.ips[0], "ips": [fake_hosts.ips[0]]},
                                    {"ssh": closed, "ips": [fake_hosts.ips[1]]}]))
    done = launch(fake_hosts, str(tiny_llama_dir), "--hostfile", str(hostfile), "-p", "hi", timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"runner: error: cannot reach {closed} over ssh (ssh: connect to host {fake_hosts.ips[1]} port 9: "
        "Connection refused); runner launch needs password-less ssh (ssh-copy-id) to every other host")


def test_a_model_missing_on_one_host_is_refused_before_any_rank_starts(fake_hosts, tiny_llama_dir, tmp_path):
    model = copy_model(tiny_llama_dir, tmp_path / "tiny")
    with fake_hosts.hidden(2, tmp_path):
        done = launch(fake_hosts, str(model), "--hosts", ",".join(fake_hosts.ips), "-p", "hi", timeout=60)
    h2 = fake_hosts.ips[1]
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"runner: error: {h2} has no model at {model} (no config.json there): runner launch needs the model "
        f"folder at the same path on every host; copy it, e.g. rsync -a {model}/ {h2}:{model}/")


MISSING = """
import sys
from runner.errors import UserInputError
from runner.tui.loading import ModelChoice
from runner_mlx.launcher import request_hosts
from runner_mlx.remote import LaunchSource

model, hosts = sys.argv[1:3]
source = LaunchSource(request_hosts(hosts, None, None, 5, rank0_here=True), "pipeline", 256, rank_timeout=60)
choice = ModelChoice(model, "mlx", "q4", 256)
spec, plan = source.plan(choice, None)
try:
    source.load(choice, spec, plan, None)
except UserInputError as error:
    print(error)
source.close()
"""


def test_the_chat_and_serve_source_checks_the_model_on_every_host_first(fake_hosts, tiny_llama_dir, tmp_path):
    """The chat's (and `launch --serve`'s) launch source refuses a model missing on host 2 with the
    one-shot's line, before any rank starts."""
    model = copy_model(tiny_llama_dir, tmp_path / "tiny")
    with fake_hosts.hidden(2, tmp_path):
        done = subprocess.run([*fake_hosts.in_namespace(1), sys.executable, "-c", MISSING, str(model),
                               ",".join(fake_hosts.ips)], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, env=fake_hosts.env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(f"{fake_hosts.ips[1]} has no model at {model} (no config.json there)")
    assert nothing_left(fake_hosts) == []


@pytest.mark.slow
def test_a_different_model_on_one_host_stops_every_rank(fake_hosts, tiny_llama_dir, tmp_path, runner_home):
    model = copy_model(tiny_llama_dir, tmp_path / "tiny")
    other = copy_model(tiny_llama_dir, tmp_path / "tiny-other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    h1, h2 = fake_hosts.ips
    (runner_home / "cache").mkdir(exist_ok=True)
    # host 2 converts into a cache of its own, as a separate machine would (the shared one is keyed by name)
    with fake_hosts.replaced(2, model, other), fake_hosts.hidden(2, runner_home / "cache"):
        done = launch(fake_hosts, str(model), "--hosts", f"{h1},{h2}", "--split", "pipeline", "--quant", "q4",
                      "-p", "hi")
    assert done.returncode == 2, done.stderr
    assert (f"rank 1 ({h2}) has a different model than rank 0 ({h1}): config.json or the weight files differ"
            in done.stderr), done.stderr
    assert "Traceback" not in done.stderr
    assert nothing_left(fake_hosts) == []


# ---- failures mid-reply ---------------------------------------------------------------------


class LongRun:
    """A reply that runs until stopped, its stderr lines collected; the run is always ended."""

    def __init__(self, hosts, model, on_host: int | None = None, context: int | None = None):
        prefix = hosts.in_namespace(on_host) if on_host else []
        context_option = ["--context", str(context)] if context else []
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-c", RUNNER, "launch", str(model), "--hosts", ",".join(hosts.ips),
             "--split", "pipeline", "--quant", "q4", "-p", PROMPT, "--max-tokens", "100000", *context_option],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=hosts.env)
        self.lines: list[str] = []
        self.replied: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.process.stderr.readline, "")), daemon=True).start()
        threading.Thread(target=lambda: self.replied.extend(iter(lambda: self.process.stdout.read(1), "")),
                         daemon=True).start()

    def wait_for_reply(self, limit: float = 180) -> None:
        deadline = time.monotonic() + limit
        while len(self.replied) < 5:                          # both ranks loaded, tokens coming
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.end()
                pytest.fail("no reply: " + "".join(self.lines))
            time.sleep(0.2)

    def seconds_to_end(self, limit: float) -> float:
        started = time.monotonic()
        try:
            self.process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.end()
            raise
        return time.monotonic() - started

    @property
    def stderr(self) -> str:
        time.sleep(0.2)                                     # the reader thread's last lines
        return "".join(self.lines)

    def end(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture
def long_run(fake_hosts, long_llama_dir):
    single_process(long_llama_dir, "q4", 1)                 # converted once, before the ranks start
    runs = []

    def start(on_host: int | None = None) -> LongRun:
        runs.append(LongRun(fake_hosts, long_llama_dir, on_host, LONG_CONTEXT))
        runs[-1].wait_for_reply()
        return runs[-1]

    yield start
    for run in runs:
        run.end()


@pytest.mark.slow
def test_a_rank_killed_on_the_far_host_stops_every_rank(fake_hosts, long_run):
    run = long_run()
    [rank] = fake_hosts.ranks(2)
    rank.kill()
    assert run.seconds_to_end(60) < 30
    assert run.process.returncode == 1
    h2 = fake_hosts.ips[1]
    assert (f"runner: error: rank 1 ({h2}) ended without an exit status over ssh (killed, or the connection "
            "dropped); every rank was stopped") in run.stderr
    assert "Traceback" not in run.stderr
    assert nothing_left(fake_hosts) == []


@pytest.mark.slow
def test_a_link_cut_mid_reply_is_noticed_within_seconds_and_ends_every_rank(fake_hosts, long_run):
    run = long_run()
    fake_hosts.cut(2)
    try:
        seconds = run.seconds_to_end(60)
        line = assert_one_error_line(run.stderr)
        # the far host, cut off, stops its rank by itself: its heartbeat from rank 0 stopped too
        left = nothing_left(fake_hosts)
    finally:
        fake_hosts.mend(2)
    assert seconds < 20, run.stderr
    assert run.process.returncode == 1
    assert re.fullmatch(rf"runner: error: rank 1 \({re.escape(fake_hosts.ips[1])}\) stopped answering \(no "
                        r"heartbeat for \d+ s while generating\): the host died, froze or lost the network; every "
                        r"rank was stopped", line), line
    assert left == []


def loading(hosts, model) -> LongRun:
    """A run of `model` whose ring is up and whose ranks are loading their layers."""
    single_process(model, "q4", 1)                          # converted once, before the ranks start
    run = LongRun(hosts, model)
    deadline = time.monotonic() + 120
    while not any("comparing the model with the other hosts" in line for line in run.lines):
        if run.process.poll() is not None or time.monotonic() > deadline:
            run.end()
            pytest.fail("the ranks did not join: " + run.stderr)
        time.sleep(0.05)
    return run


@pytest.mark.slow
def test_a_link_cut_while_loading_is_noticed_within_seconds(fake_hosts, default_model_dir):
    run = loading(fake_hosts, default_model_dir)
    try:
        fake_hosts.cut(2)
        seconds = run.seconds_to_end(60)
        line = assert_one_error_line(run.stderr)
        left = nothing_left(fake_hosts)
    finally:
        fake_hosts.mend(2)
        run.end()
    assert seconds < 20, run.stderr
    assert re.fullmatch(rf"runner: error: rank 1 \({re.escape(fake_hosts.ips[1])}\) stopped answering \(no "
                        r"heartbeat for \d+ s while .+\): the host died, froze or lost the network; every rank was "
                        r"stopped", line), line
    assert left == []


@pytest.mark.slow
def test_runner_stopped_while_a_host_is_cut_off_leaves_nothing_on_either_host(fake_hosts, default_model_dir):
    """Nobody reads the ranks' stderr any more and host 2 cannot be reached to be stopped: each rank
    stops by itself (host 1's: its ssh session is gone; host 2's: no heartbeat)."""
    run = loading(fake_hosts, default_model_dir)
    try:
        fake_hosts.cut(2)
        run.process.terminate()
        assert run.seconds_to_end(30) < 20
        left = nothing_left(fake_hosts)
    finally:
        fake_hosts.mend(2)
        run.end()
    assert left == []


@pytest.mark.slow
def test_ctrl_c_on_host_1_stops_the_ranks_on_both_hosts(fake_hosts, long_run):
    run = long_run(on_host=1)
    run.process.send_signal(signal.SIGINT)
    assert run.seconds_to_end(30) < 20
    assert run.process.returncode == 130, run.stderr
    assert "runner: error: stopped (interrupted); every rank was stopped" in run.stderr
    assert "Traceback" not in run.stderr
    assert nothing_left(fake_hosts) == []


# ---- what mlx.launch and the ranks said, read back into one line ------------------------------


def verdict(lines: list[str]) -> tuple[tuple[int, str | None], list[str]]:
    """(RankReport's verdict, what it echoed) for these stderr lines of mlx.launch over two remote hosts."""
    import io

    from runner_mlx.launcher import RankReport
    from runner_mlx.split import LaunchHost

    hosts = [LaunchHost(ip, ip, False, 2**30, "linux") for ip in ("10.0.0.1", "10.0.0.2")]
    echoed: list[str] = []
    report = RankReport(hosts, verbose=False, echo=echoed.append)
    report.read(io.BytesIO("".join(line + "\n" for line in lines).encode()))
    return report.verdict(), echoed


def test_a_silent_host_is_named_even_after_its_ssh_was_stopped():
    """A cut link: rank 0 stops on the missing heartbeat; mlx.launch then stops rank 1's ssh (255)."""
    said = ("runner: error: rank 0 (10.0.0.1): no heartbeat from rank 1 (10.0.0.2) for 5 s while generating: "
            "that host died, froze or lost the network; stopping this rank")
    (code, line), echoed = verdict([said, "\x1b[33m[WARN] Node with rank 0 exited with code 6\x1b[0m",
                                    "[WARN] Node with rank 1 exited with code 255"])
    assert code == 1 and line == ("rank 1 (10.0.0.2) stopped answering (no heartbeat for 5 s while generating): "
                                  "the host died, froze or lost the network; every rank was stopped")
    assert echoed == []                       # the verdict says it; one line in all


def test_a_rank_killed_over_ssh_is_the_cause_whichever_exit_comes_first():
    lost = "runner: error: rank 0 (10.0.0.1): lost the connection to another host while generating"
    for order in ((0, 1), (1, 0)):
        exits = {0: "[WARN] Node with rank 0 exited with code 5", 1: "[WARN] Node with rank 1 exited with code 255"}
        (code, line), echoed = verdict([lost, *(exits[rank] for rank in order)])
        assert code == 1 and line == ("rank 1 (10.0.0.2) ended without an exit status over ssh (killed, or the "
                                      "connection dropped); every rank was stopped")
        assert echoed == [lost]


# ---- the network, measured ------------------------------------------------------------------


@pytest.mark.slow
def test_probe_measures_the_link_in_the_terms_the_plan_takes(fake_hosts):
    from runner.budget import parse_link

    done = launch(fake_hosts, "--hosts", ",".join(fake_hosts.ips), "--probe", timeout=120)
    assert done.returncode == 0, done.stderr
    match = re.search(r"for runner plan: --link (\S+)", done.stdout)
    assert match, done.stdout
    link = parse_link(match.group(1))
    assert 0 < link.latency_s < 0.1 and link.bandwidth_bytes_per_s > 1e6      # a veth: fast, but not free
    assert f"2 hosts ({', '.join(fake_hosts.ips)}), mx.distributed ring:" in done.stdout
    assert nothing_left(fake_hosts) == []


def test_probe_takes_no_model(fake_hosts):
    done = launch(fake_hosts, "some-model", "--hosts", ",".join(fake_hosts.ips), "--probe", timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "runner: error: --probe measures the network alone: give no model and no -p"

"""The network in the plan: `runner plan --link` (per-token network time of each split over several
hosts, and the tokens/s with it) and the arithmetic of runner.budget.network_time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runner import budget
from runner.errors import UserInputError
from runner.hardware import parse_machine
from runner.model import load_spec

L405 = "meta-llama/Llama-3.1-405B-Instruct"


def plan(model: str, machine: str, split: str, quant: str = "q4"):
    return budget.make_plan(load_spec(model), parse_machine(machine), quant, 4096, 1, "mlx", parallel=split)


def test_latency_alone_counts_every_message_on_the_critical_path():
    """With a link of endless bandwidth only latency is left: the time is messages x latency."""
    fast = budget.Link("latency only", 100e-6, 1e18)
    tensor = budget.network_time(plan(L405, "2xM2Ultra-192GB", "tensor"), fast)
    pipeline = budget.network_time(plan(L405, "2xM2Ultra-192GB", "pipeline"), fast)
    # tensor: 2 all-reduces per layer (126 layers) + the stop flag's, each 2 messages on 2 hosts
    assert tensor.messages_per_token == (2 * 126 + 1) * 2
    # pipeline: the hidden state to the next host, the gather of the last host's, the stop flag's all-reduce
    assert pipeline.messages_per_token == 1 + 1 + 2
    assert tensor.seconds_per_token == pytest.approx(506 * 100e-6)
    assert pipeline.seconds_per_token == pytest.approx(4 * 100e-6)


def test_bandwidth_counts_the_bytes_of_each_message():
    slow = budget.Link("bandwidth only", 0.0, 1e6)                 # 1 MB/s, no latency
    hidden = 16384 * 2                                              # 405B's hidden state in bf16
    pipeline = budget.network_time(plan(L405, "2xM2Ultra-192GB", "pipeline"), slow)
    assert pipeline.bytes_per_message == hidden
    assert pipeline.seconds_per_token == pytest.approx((2 * hidden + 2 * 4 / 2) / 1e6)
    tensor = budget.network_time(plan(L405, "2xM2Ultra-192GB", "tensor"), slow)
    assert tensor.seconds_per_token == pytest.approx((252 * 2 * hidden / 2 + 2 * 4 / 2) / 1e6)


def test_three_hosts_take_more_hops_and_one_host_none():
    link = budget.LINKS["10gbe"]
    two = budget.network_time(plan("meta-llama/Llama-3.1-70B-Instruct", "2xM2Ultra-192GB", "pipeline"), link)
    three = budget.network_time(plan("meta-llama/Llama-3.1-70B-Instruct", "3xM2Ultra-192GB", "pipeline"), link)
    assert three.messages_per_token == 2 + 2 + 4 and three.seconds_per_token > two.seconds_per_token
    one = budget.make_plan(load_spec(L405), parse_machine("1xM2Ultra-192GB"), "q4", 4096, 1, "mlx")
    assert budget.network_time(one, link) == budget.NetworkTime(0.0, 0, 0)


def test_tokens_per_s_adds_the_network_to_each_token():
    time = budget.NetworkTime(0.05, 10, 100)
    assert time.tokens_per_s(10.0) == pytest.approx(1 / (0.1 + 0.05))
    assert time.tokens_per_s(0.0) == 0.0


def test_links_by_name_or_measured():
    assert budget.parse_link("TB5") is budget.LINKS["tb5"]
    measured = budget.parse_link("85us,0.9GB/s")
    assert measured.latency_s == pytest.approx(85e-6) and measured.bandwidth_bytes_per_s == pytest.approx(0.9e9)
    assert budget.parse_link("1.5ms, 300MB/s").bandwidth_bytes_per_s == pytest.approx(0.3e9)
    for bad in ("fast", "0us,1GB/s", "85us", "85us,-1GB/s", "nanus,1GB/s"):
        with pytest.raises(UserInputError, match="expected one of 1gbe, 10gbe, tb4, tb5"):
            budget.parse_link(bad)


def runner_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", "plan", *args], capture_output=True, text=True,
                          timeout=60)


def test_plan_gives_both_splits_with_their_network_time():
    done = runner_plan(L405, "--machine", "2xM2Ultra-192GB", "--link", "10gbe")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Network (10 Gb Ethernet (assumed): 50 µs per message, 1.10 GB/s):" in out
    pipeline = next(line for line in out.splitlines() if line.strip().startswith("pipeline "))
    tensor = next(line for line in out.splitlines() if line.strip().startswith("tensor "))
    assert "4 messages/token of 32 KB: 0.26 ms/token -> ~3.47 tok/s" in pipeline, pipeline
    assert "506 messages/token of 16 KB: 32.81 ms/token -> ~5.61 tok/s (~6.87 before network time)" in tensor, tensor
    data = json.loads(runner_plan(L405, "--machine", "2xM2Ultra-192GB", "--link", "tb5", "--json").stdout)
    splits = {s["split"]: s for s in data["network"]["splits"]}
    assert set(splits) == {"pipeline", "tensor"}
    assert splits["tensor"]["tokens_per_s"] < splits["tensor"]["roofline_tokens_per_s"]


def test_plan_says_when_nothing_crosses_a_network_and_refuses_a_bad_link():
    done = runner_plan(L405, "--machine", "1xM2Ultra-192GB", "--link", "tb4")
    assert done.returncode == 0, done.stderr
    assert "nothing crosses a network: one host" in done.stdout
    bad = runner_plan(L405, "--machine", "2xM2Ultra-192GB", "--link", "fast")
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("runner: error: --link 'fast': expected one of 1gbe, 10gbe, tb4, tb5, or a measured "
                                  "latency and bandwidth such as 85us,0.9GB/s (runner launch --probe prints it)")


def test_a_machine_file_carries_its_link(tmp_path, capsys):
    """`link = "10gbe"` in a machine file: the plan counts that network as --link 10gbe does;
    --link on the command line wins; a bad link names the file, in one line."""
    from runner.cli import main

    hosts = '[[hosts]]\nname = "a"\nmac = "M2Ultra-192GB"\n[[hosts]]\nname = "b"\nmac = "M2Ultra-192GB"\n'
    with_link = tmp_path / "studios.toml"
    with_link.write_text('link = "10gbe"\n' + hosts)
    bare = tmp_path / "bare.toml"
    bare.write_text(hosts)

    def network(*args: str) -> dict:
        assert main(["plan", L405, "--json", *args]) == 0
        return json.loads(capsys.readouterr().out).get("network")

    assert network("--machine", str(with_link)) == network("--machine", str(bare), "--link", "10gbe") is not None
    assert network("--machine", str(bare)) is None
    assert network("--machine", str(with_link), "--link", "tb5")["link"]["name"] == budget.LINKS["tb5"].name
    broken = tmp_path / "broken.toml"
    broken.write_text('link = "carrier pigeon"\n' + hosts)
    assert main(["plan", L405, "--machine", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"runner: error: {broken}: link 'carrier pigeon'"), err

"""`runner launch` for real: two ranks on 127.0.0.1 through mlx.launch (ring backend).

Every test has a time limit, and checks that no rank process is left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import LONG_CONTEXT
from mlx_helpers import PROMPT, copy_model, greedy_tokens, launch_popen, load, rank_processes, runner

pytest.importorskip("mlx_lm")
LOOPBACK = "127.0.0.1,127.0.0.1"


def launched_tokens(stderr: str) -> list[int]:
    match = re.search(r"runner: tokens: ([\d ]+)", stderr)
    assert match, stderr
    return [int(t) for t in match.group(1).split()]


def all_gone(processes: list[psutil.Process]) -> bool:
    """Every process of a run (mlx.launch, the ranks) has ended within a few seconds."""
    _, alive = psutil.wait_procs(processes, timeout=5)
    return not alive


@pytest.mark.slow
def test_pipeline_split_gives_the_single_process_greedy_tokens_q4(tiny_llama_dir):
    session = load(tiny_llama_dir, "q4")
    expected = greedy_tokens(session, max_tokens=16)
    session.close()
    done = runner("launch", str(tiny_llama_dir), "--hosts", LOOPBACK, "--split", "pipeline", "--quant", "q4",
                  "-p", PROMPT, "--max-tokens", "16", "--show-tokens", timeout=240)
    assert done.returncode == 0, done.stderr
    assert "127.0.0.1#0: layers 0-0 (1 of 2)" in done.stderr and "127.0.0.1#1: layers 1-1 (1 of 2)" in done.stderr
    assert launched_tokens(done.stderr) == expected
    assert done.stdout.strip()


@pytest.mark.slow
def test_tensor_split_gives_the_single_process_greedy_tokens_fp32(tiny_llama_dir):
    # 4 heads / 2 KV heads divide by 2; fp32, because the ranks' partial sums are added in the
    # model's dtype and bf16 rounding would differ from one process's matmul after a few tokens
    session = load(tiny_llama_dir, "fp32")
    expected = greedy_tokens(session, max_tokens=16)
    session.close()
    done = runner("launch", str(tiny_llama_dir), "--hosts", LOOPBACK, "--quant", "fp32",
                  "-p", PROMPT, "--max-tokens", "16", "--show-tokens", timeout=240)
    assert done.returncode == 0, done.stderr
    assert "tensor split: heads and KV heads divide among 2 hosts" in done.stderr
    assert "1/2 of every layer" in done.stderr
    assert launched_tokens(done.stderr) == expected


def start_long_run(model_dir, *extra: str):
    process = launch_popen(str(model_dir), "--hosts", LOOPBACK, "--split", "pipeline", "--quant", "q4",
                           "-p", PROMPT, "--max-tokens", "100000", "--context", str(LONG_CONTEXT), *extra)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True).start()
    threading.Thread(target=lambda: process.stdout.read(), daemon=True).start()
    deadline = time.monotonic() + 180
    while sum("GB in use" in line for line in lines) < 2:       # both ranks loaded
        if process.poll() is not None or time.monotonic() > deadline:
            process.terminate()
            pytest.fail("the ranks did not start: " + "".join(lines))
        time.sleep(0.2)
    time.sleep(1.5)                                            # now generating
    children = psutil.Process(process.pid).children(recursive=True)
    assert len(children) >= 3, children                        # mlx.launch and two ranks
    return process, lines, children


def finish(process: subprocess.Popen, limit: float) -> float:
    """Seconds until `process` ends; past `limit`, SIGTERM it (runner launch then stops its ranks)."""
    started = time.monotonic()
    try:
        process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait(timeout=30)
        raise
    return time.monotonic() - started


@pytest.fixture
def long_run(long_llama_dir):
    """start(*extra) -> (process, stderr lines, its child processes); the run is always ended."""
    started = []

    def start(*extra: str):
        run = start_long_run(long_llama_dir, *extra)
        started.append(run[0])
        return run

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


@pytest.mark.slow
def test_a_rank_that_dies_mid_generation_stops_every_rank_with_a_clear_error(long_run):
    process, lines, children = long_run()
    ranks = rank_processes(process.pid)
    assert set(ranks) == {0, 1}
    ranks[1].kill()
    seconds = finish(process, 60)
    text = "".join(lines)
    assert process.returncode == 1, text
    assert seconds < 30, text
    assert "runner: error: rank 1 (127.0.0.1) died (killed by signal 9, SIGKILL); every rank was stopped" in text
    assert "Traceback" not in text
    assert all_gone(children)


@pytest.mark.slow
def test_a_frozen_rank_is_caught_by_the_watchdog_and_nothing_is_left(long_run):
    process, lines, children = long_run("--rank-timeout", "4")
    ranks = rank_processes(process.pid)
    ranks[1].send_signal(signal.SIGSTOP)                      # alive, but answers nothing: a frozen host
    try:
        seconds = finish(process, 60)
    finally:
        for rank in ranks.values():
            if rank.is_running():
                rank.send_signal(signal.SIGCONT)
    text = "".join(lines)
    assert process.returncode == 1, text
    assert seconds < 30, text
    assert re.search(r"runner: error: rank 0 \(127\.0\.0\.1\): no progress for \d+ s while generating: another "
                     r"host died, froze or lost the network", text), text
    assert "runner: error: rank 0 (127.0.0.1) stopped by its watchdog" in text
    assert all_gone(children)


@pytest.mark.slow
def test_different_models_on_the_hosts_are_refused_on_every_rank(tiny_llama_dir, tmp_path):
    """Each rank opens its own folder (as two hosts would); one copy has a different config."""
    other = copy_model(tiny_llama_dir, tmp_path / "tiny-other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    folders = [str(tiny_llama_dir), str(other)]
    code = ("import os, sys\nfrom runner_mlx.rank import main\n"
            f"folders = {folders!r}\n"
            "sys.exit(main(['--model', folders[int(os.environ['MLX_RANK'])], '--quant', 'q4', '--split', "
            "'pipeline', '--layers', '0:1,1:2', '--hosts', 'studio,mini', '--rank-timeout', '60', '--context', '256']))")
    from runner_mlx.launcher import free_port_range, mlx_launch_command

    done = subprocess.run([*mlx_launch_command(), "--backend", "ring", "--hosts", LOOPBACK, "--starting-port",
                           str(free_port_range(2)), "--", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=240, stdin=subprocess.PIPE)
    for rank in (0, 1):
        assert (f"runner: error: rank {rank} (studio" if rank == 0 else "runner: error: rank 1 (mini") in done.stderr
    assert done.stderr.count("rank 1 (mini) has a different model than rank 0 (studio): config.json or the "
                             "weight files differ; copy the same model folder to every host") == 2, done.stderr


# ---- bad input: refused before anything starts ---------------------------------------------


def test_tensor_split_of_smollm2_is_refused_before_launch(default_model_dir):
    done = runner("launch", "--hosts", LOOPBACK, "--split", "tensor", "-p", "hi", timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "runner: error: HuggingFaceTB/SmolLM2-135M-Instruct: the tensor split does not work: 9 attention heads "
        "and 3 KV heads do not divide among 2 hosts, and mlx-lm would shard it anyway and crash in attention; "
        "use --split pipeline")


def test_a_host_that_does_not_resolve_is_refused(tiny_llama_dir):
    done = runner("launch", str(tiny_llama_dir), "--hosts", "127.0.0.1,no-such-host.invalid", "-p", "hi", timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("runner: error: cannot resolve host 'no-such-host.invalid': check the name, "
                                   "or give its IP address")


def test_a_host_that_does_not_answer_is_refused_in_bounded_time(tiny_llama_dir, tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                    {"ssh": "192.0.2.1", "ips": ["192.0.2.1"]}]))   # TEST-NET: nobody there
    started = time.monotonic()
    done = runner("launch", str(tiny_llama_dir), "--hostfile", str(hostfile), "-p", "hi", timeout=60)
    assert done.returncode == 2
    assert time.monotonic() - started < 30
    assert done.stderr.startswith("runner: error: cannot reach 192.0.2.1"), done.stderr


def test_a_malformed_hostfile_is_refused(tiny_llama_dir, tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[{"name": "a"}]')
    done = runner("launch", str(tiny_llama_dir), "--hostfile", str(hostfile), "-p", "hi", timeout=60)
    assert done.returncode == 2
    assert "not an mlx.launch hostfile" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_stopping_runner_launch_stops_every_rank(long_run):
    process, lines, children = long_run()
    process.terminate()                                        # as `timeout` or a closed terminal would
    assert finish(process, 30) < 20
    assert process.returncode == 1
    assert "runner: error: stopped (SIGTERM); every rank was stopped" in "".join(lines)
    assert all_gone(children)


def test_a_split_that_does_not_fit_a_host_is_refused_with_every_share(default_model_dir):
    done = runner("launch", "--hosts", LOOPBACK, "--quant", "bf16", "--host-memory", "2,0.1", "-p", "hi", timeout=60)
    assert done.returncode == 2
    # the bigger host takes most layers; the smaller cannot hold even one beside the embeddings and head
    assert re.fullmatch(
        r"runner: error: HuggingFaceTB/SmolLM2-135M-Instruct \(bf16, 4096 tokens of context\) does not fit these "
        r"hosts with the pipeline split: 127\.0\.0\.1#0: layers 0-28 \(29 of 30\), [\d.]+ MB of 1\.93 GB usable; "
        r"127\.0\.0\.1#1: layers 29-29 \(1 of 30\), [\d.]+ MB of 96\.6 MB usable", done.stderr.strip()), done.stderr


# ---- mlx.launch without its busy loop ----------------------------------------------------------


def test_quiet_launch_patches_mlx_launch_and_waits_instead_of_spinning():
    """mlx.launch's per-rank thread selects on the rank's stdin, always writable: it spun a core
    (94 % measured, bench/RESULTS.md). The quiet wait still reports the pipe writable, but only
    after waiting for output; and the patch must find mlx's module as it expects (else this fails
    and the busy loop is back)."""
    from runner_mlx.quiet_launch import WAIT, quiet_select

    read_end, write_end = os.pipe()
    try:
        started = time.monotonic()
        readable, writable, _ = quiet_select([read_end], [write_end], [], 1.0)
        waited = time.monotonic() - started
        assert readable == [] and writable == [write_end]
        assert waited >= WAIT * 0.9
        os.write(write_end, b"x")                    # output waiting: no wait at all
        started = time.monotonic()
        readable, _, _ = quiet_select([read_end], [write_end], [], 1.0)
        assert readable == [read_end] and time.monotonic() - started < WAIT
    finally:
        os.close(read_end)
        os.close(write_end)
    done = subprocess.run([sys.executable, "-c", "from runner_mlx.quiet_launch import patch; print(patch())"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True", done.stderr

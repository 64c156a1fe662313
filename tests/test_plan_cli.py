"""`runner plan` through the real command line (a subprocess), as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runner.model import catalog_config

L405 = "meta-llama/Llama-3.1-405B-Instruct"


@pytest.fixture
def env(tmp_path, monkeypatch):
    import os

    environment = dict(os.environ)
    environment["RUNNER_HOME"] = str(tmp_path / "runner-home")
    environment["HF_HOME"] = str(tmp_path / "hf-home")
    environment.pop("HF_HUB_CACHE", None)
    return environment


def runner(env, *args):
    return subprocess.run([sys.executable, "-m", "runner.cli", "plan", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_405b_on_four_a100s(env):
    result = runner(env, L405, "--machine", "4xA100-80GB", "--context", "8k")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "811.7" in out and "215.6" in out and "234.3" in out and "516,096 bytes/token" in out
    assert "Context 8,192 tokens" in out
    nf4_row = next(line for line in out.splitlines() if line.startswith("< nf4"))
    assert "FITS" in nf4_row
    assert "cuda:3" in out and "+head" in out
    assert "Recommendation: --backend cuda --quant nf4" in out
    assert "8x RTX 4090 24GB" in out and "OFFLOAD" in out


def test_405b_on_eight_4090s_warns(env):
    out = runner(env, L405, "--machine", "8xRTX4090").stdout
    assert "! OFFLOAD:" in out and "PCIe" in out and "tok/s" in out


def test_405b_on_two_macs(env):
    out = runner(env, L405, "--machine", "2xM2Ultra-192GB").stdout
    assert "mac1:metal" in out and "mac2:metal" in out and "pipeline" in out
    assert "tensor parallel over 2 hosts works" in out


def test_machine_file(env):
    from runner.hardware import example_machine_files

    result = runner(env, L405, "--machine", str(example_machine_files()["8xRTX3090-4090"]))
    assert result.returncode == 0, result.stderr
    assert "4 x NVIDIA GeForce RTX 3090 24GB" in result.stdout


def test_json_for_scripts(env):
    result = runner(env, L405, "--machine", "4xA100-80GB", "--quant", "nf4", "--json")
    data = json.loads(result.stdout)
    assert data["model"]["kv_bytes_per_token_bf16"] == 516_096
    assert data["plan"]["verdict"] == "fits" and data["plan"]["quant"] == "nf4"
    schemes = {row["quant"]: row for row in data["schemes"]}
    assert schemes["bf16"]["weights_bytes"] == 811_706_777_600
    assert data["plan"]["device_map"]["model.layers.125"] == 3
    assert set(data["plan"]["max_memory"]) == {"0", "1", "2", "3"}


def test_default_model_on_this_machine(env):
    result = runner(env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "(detected)" in result.stdout and "Recommendation:" in result.stdout


def test_list(env):
    result = runner(env, "--list")
    assert result.returncode == 0
    assert L405 in result.stdout and "Qwen/Qwen2.5-72B-Instruct" in result.stdout


def test_local_folder(env, tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(catalog_config("meta-llama/Llama-3.1-8B-Instruct")))
    result = runner(env, str(folder), "--machine", "1xRTX4090")
    assert result.returncode == 0, result.stderr
    assert "[folder]" in result.stdout and "8.03B parameters" in result.stdout


def test_hugging_face_cache_entry(env, tmp_path):
    repo = tmp_path / "hf-home" / "hub" / "models--someone--tiny-llama"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "config.json").write_text(json.dumps(catalog_config("meta-llama/Llama-3.2-1B-Instruct")))
    result = runner(env, "someone/tiny-llama", "--machine", "cpu-16GB")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("someone/tiny-llama  [hf-cache]")


def _write_config(tmp_path, text):
    folder = tmp_path / "bad-model"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    return str(folder)


@pytest.mark.parametrize("args,message", [
    (["./no/such/folder"], "no such file or folder"),
    (["nobody/NoSuchModel"], "not in runner's catalog"),
    ([L405, "--context", "-5"], "--context must be a positive"),
    ([L405, "--context", "abc"], "--context must be a number"),
    ([L405, "--context", "10m"], "more than"),
    ([L405, "--batch", "0"], "--batch must be"),
    ([L405, "--batch", "two"], "--batch must be a number like 8192 or 8k, not 'two'"),   # not "of tokens"
    ([L405, "--batch", "two\nlines"], "not 'two lines'"),           # still one line
    ([L405, "--machine", "4xZ9000" + "0" * 60], "unknown device 'Z90000000"),
    ([L405, "--machine", "4xZ9000"], "unknown device 'Z9000'"),
    ([L405, "--machine", "/no/machine.toml"], "no such file"),
    ([L405, "--quant", "int3"], "unknown"),
    ([L405, "--quant", "q4", "--backend", "cuda", "--machine", "1xH100"], "is not a cuda scheme"),
    ([L405, "--quant", "nf4", "--machine", "2xM2Ultra-192GB"], "on Apple silicon runner uses mlx"),
    ([L405, "--kv-bits", "3"], "runner plan: argument --kv-bits: invalid choice: 3"),   # argparse's own errors
    ([L405, "--context", "-1k"], "runner plan: argument --context: expected one argument"),
    ([L405, "--contxt", "8k"], "unrecognized arguments: --contxt 8k"),
])
def test_bad_input_is_one_line_and_exit_2(env, args, message):
    result = runner(env, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("runner: error:") and message in lines[0], result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("argv,message", [
    (["generate"], "runner: error: runner generate: the following arguments are required: -p/--prompt"),
    (["generate", "-p", "hi", "--max-tokens", "ten"], "runner generate: argument --max-tokens: invalid int value"),
    (["parity", "--a", "cuda:fp32", "--bogus"], "runner: error: unrecognized arguments: --bogus"),
    (["rm"], "runner: error: runner rm: the following arguments are required: MODEL"),
    (["genrate", "-p", "hi"], "runner: error: unknown command 'genrate' (did you mean runner generate?)"),
])
def test_a_malformed_command_line_is_one_line_too(env, argv, message):
    result = subprocess.run([sys.executable, "-m", "runner.cli", *argv], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 2 and result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert message in result.stderr and result.stdout == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("args", [[], ["--json"]])
def test_a_full_disk_under_the_output_is_one_line(env, args):
    """`runner plan > file` on a full disk: /dev/full fails every write with ENOSPC."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "runner.cli", "plan", L405, *args], stdout=full,
                                stderr=subprocess.PIPE, text=True, env=env, timeout=60)
    assert result.returncode == 1 and result.stderr == "runner: error: No space left on device\n", result.stderr


@pytest.mark.parametrize("config,message", [
    ("{ not json", "malformed JSON"),
    ('{"model_type": "gpt2", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, '
     '"intermediate_size": 8, "vocab_size": 8}', "model_type 'gpt2' is not supported"),
    ('{"model_type": "llama"}', "config.json lacks"),
])
def test_bad_config_is_one_line_and_exit_2(env, tmp_path, config, message):
    result = runner(env, _write_config(tmp_path, config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_plan_says_the_longest_context_per_kv_setting(capsys):
    """Issue 17: '405B on two 192 GB Macs at 128k' gets a clear answer: only with a quantized KV cache."""
    from runner.cli import main

    args = ["plan", "meta-llama/Llama-3.1-405B-Instruct", "--machine", "2xM2Ultra-192GB"]
    assert main(args) == 0
    assert ("per KV cache (--kv-bits): unquantized 93,184 · kv8 131,072 · kv4 131,072"
            in capsys.readouterr().out)
    assert main(args + ["--json"]) == 0
    longest = json.loads(capsys.readouterr().out)["longest_context_per_kv_bits"]
    assert longest == {"none": 93184, "8": 131072, "4": 131072}


def test_one_layer_and_one_token_are_singular(env, tmp_path):
    folder = tmp_path / "one-layer"
    folder.mkdir()
    config = dict(catalog_config("meta-llama/Llama-3.2-1B-Instruct"), num_hidden_layers=1)
    (folder / "config.json").write_text(json.dumps(config))
    result = runner(env, str(folder), "--context", "1")
    assert result.returncode == 0, result.stderr
    assert " · 1 layer · " in result.stdout and "Context 1 token x batch 1" in result.stdout
    assert "1 layers" not in result.stdout and "1 tokens" not in result.stdout

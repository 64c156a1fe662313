"""The built-in model on a machine with no CUDA GPU and no Apple GPU: the resolver picks llama.cpp
with runner's F16 copy of the package's GGUF (`--backend llamacpp --quant fp16`: torch float32's
answers, ~5x its decode speed), and falls back to torch fp32 where llama-cpp-python is not
installed. With a GPU or on a Mac nothing changes. The plan counts the F16 copy's bytes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("llama_cpp", reason="the llamacpp extra is not installed")

from runner.budget import make_plan  # noqa: E402
from runner.choice import resolve  # noqa: E402
from runner.cli import main  # noqa: E402
from runner.default_model import gguf_file  # noqa: E402
from runner.gguf import read_gguf  # noqa: E402
from runner.hardware import detect_machine, parse_machine  # noqa: E402
from runner.model import DEFAULT_MODEL_ID, load_spec  # noqa: E402

pytestmark = pytest.mark.slow

CPU_ONLY = "cpu-64GB"


def test_no_gpu_picks_llama_cpp_fp16_for_the_default_model():
    spec = load_spec(DEFAULT_MODEL_ID)
    choice = resolve(spec, parse_machine(CPU_ONLY), None, None, 4096)
    assert (choice.backend, choice.quant) == ("llamacpp", "fp16"), choice.reason
    asked = resolve(spec, parse_machine(CPU_ONLY), "llamacpp", None, 4096)
    assert asked.quant == "fp16", asked.reason       # --backend llamacpp alone: the copy, not the Q4_1 as stored


def test_a_gpu_or_a_mac_keeps_its_backend():
    spec = load_spec(DEFAULT_MODEL_ID)
    assert resolve(spec, parse_machine("1xH100-80GB"), None, None, 4096).backend == "cuda"
    assert resolve(spec, parse_machine("2xM2Ultra-192GB"), None, None, 4096).backend == "mlx"


def test_a_gguf_file_still_runs_as_stored():
    """Only the default model gets the F16 copy by default; a GGUF the user gives runs as stored."""
    spec = load_spec(str(gguf_file()))
    assert resolve(spec, parse_machine(CPU_ONLY), None, None, 4096).quant == "gguf"


def test_the_plan_counts_the_f16_copys_bytes():
    from runner_llamacpp.f16 import f16_nbytes

    expected = sum(f16_nbytes(t) for t in read_gguf(gguf_file()).tensors)     # 269 MB of F16, the norms F32
    plan = make_plan(load_spec(DEFAULT_MODEL_ID), parse_machine(CPU_ONLY), "fp16", 4096, 1, "llamacpp")
    assert plan.weights_bytes == expected, (plan.weights_bytes, expected)


def test_without_llama_cpp_the_default_stays_torch_fp32():
    """llama-cpp-python not installed (hidden from the child as Python hides a blocked import)."""
    code = ("import sys\nsys.modules['llama_cpp'] = None\nfrom runner.cli import main\n"
            f"sys.exit(main(['plan', '--json', '--machine', '{CPU_ONLY}']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)["plan"]
    assert (plan["backend"], plan["quant"]) == ("cuda", "fp32")


def test_the_readme_first_question_is_answered_by_the_default_path(capsys, default_model_dir):
    """`runner generate -p "What is the capital of France?"` with nothing chosen: on this machine
    (no GPU on the CI VM) through llama.cpp's F16 copy, with torch float32's answer."""
    machine = detect_machine()
    assert main(["generate", "-p", "What is the capital of France?", "--json", "--context", "1024"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    if not machine.gpus and not machine.is_apple:
        assert (result["backend"], result["quant"]) == ("llamacpp", "fp16"), result["reason"]
    assert result["text"] == "The capital of France is Paris."


def test_the_first_use_writes_the_f16_copy_without_importing_through_torch(tmp_path):
    """A fresh RUNNER_HOME: the F16 copy is made from the package's GGUF directly; the default
    model's torch import (dequantize, write safetensors: ~40 s of a first start here) is not needed."""
    import os

    env = {**os.environ, "RUNNER_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "runner.cli", "generate", "-p", "What is the capital of France?",
                           "--backend", "llamacpp", "--quant", "fp16"], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "writing an F16 copy of the GGUF (once)" in done.stderr
    assert "dequantizing the default model" not in done.stderr, done.stderr
    assert done.stdout.strip() == "The capital of France is Paris."

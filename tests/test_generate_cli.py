"""`runner generate` end to end: the real command, real models, on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from runner.cli import main

RUNNER = Path(sys.executable).with_name("runner")


def test_default_model_says_paris(default_model_dir):
    """The command a new user types first, in a fresh process, with the default model, on this
    machine without a GPU: llama.cpp's F16 copy of the model's GGUF where llama-cpp-python is
    installed, else torch fp32 on the CPU; both keep the model's answer."""
    result = subprocess.run(
        [str(RUNNER), "generate", "-p", "What is the capital of France?", "--max-tokens", "12"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    if importlib.util.find_spec("llama_cpp") is not None:
        assert "HuggingFaceTB/SmolLM2-135M-Instruct · llamacpp · fp16" in result.stderr
        assert "llama.cpp" in result.stderr and "(CPU" in result.stderr
    else:
        assert "HuggingFaceTB/SmolLM2-135M-Instruct · cuda · fp32" in result.stderr
        assert "loading weights" in result.stderr and "no CUDA GPU: running on the CPU" in result.stderr
    assert "Traceback" not in result.stderr


def test_json_gives_text_and_stats(tiny_llama_dir, capsys):
    code = main(["generate", str(tiny_llama_dir), "-p", "Hello", "--quant", "nf4", "--max-tokens", "5", "--json", "--context", "128"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert result["backend"] == "cuda" and result["quant"] == "nf4" and result["context"] == 128
    assert result["tokens"] == 5 and result["finish_reason"] == "length" and result["text"]
    assert result["time_to_first_token_s"] > 0 and result["tokens_per_s"] > 0
    measured, planned = result["memory"]["measured_bytes"]["cpu"], result["memory"]["planned_weights_bytes"]["cpu"]
    assert abs(measured - planned) / planned < 0.02


def test_streams_text_to_stdout_and_stats_to_stderr(tiny_llama_dir, capsys):
    code = main(["generate", str(tiny_llama_dir), "-p", "Hello", "--quant", "fp32", "--max-tokens", "4",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "7", "--system", "Be brief."])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.strip() and "runner:" not in captured.out
    assert "4 tokens (length)" in captured.err and "measured" in captured.err


def test_a_one_token_reply_says_1_token(tiny_llama_dir, capsys):
    code = main(["generate", str(tiny_llama_dir), "-p", "Hello", "--quant", "fp32", "--max-tokens", "1"])
    captured = capsys.readouterr()
    assert code == 0
    assert "runner: 1 token (" in captured.err and "1 tokens" not in captured.err


def test_bad_input_is_one_line_and_exit_2(tiny_llama_dir, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    (base / "chat_template.jinja").unlink()
    cases = [
        (["generate", str(tmp_path / "nothing-here"), "-p", "hi"], "no such file or folder"),
        (["generate", str(tiny_llama_dir), "-p", "hi", "--backend", "cuda", "--quant", "q4"], "q4"),
        (["generate", str(tiny_llama_dir), "-p", "hi", "--context", "100000"], "256"),
        (["generate", str(tiny_llama_dir), "-p", "hi", "--temperature", "-1"], "temperature"),
        (["generate", str(base), "-p", "hi"], "no chat template: it looks like a base model"),
        (["generate", str(tiny_llama_dir), "-p", "word " * 300, "--context", "200"], "the prompt is"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("runner: error:") and message in err[-1], (argv, err)


def test_a_runner_home_that_cannot_be_written_is_one_line(tmp_path):
    """RUNNER_HOME names a file: the default model's first use cannot write runner's cache there
    (the F16 copy for llama.cpp, or the float32 import for torch)."""
    home = tmp_path / "a-file"
    home.write_text("")
    result = subprocess.run([str(RUNNER), "generate", "-p", "hi", "--max-tokens", "2"], capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, RUNNER_HOME=str(home)))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"runner: error: Not a directory: {home}/cache/models")


def test_a_torch_load_prints_no_library_warnings(tiny_llama_dir):
    """transformers' own warnings (its tensor-parallel plan check, its missing-tensor table) stay out
    of the user's terminal: runner says what matters in its own lines."""
    result = subprocess.run([str(RUNNER), "generate", str(tiny_llama_dir), "-p", "Hi", "--backend", "cuda",
                             "--quant", "fp32", "--max-tokens", "2", "--context", "64"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert "[transformers]" not in result.stderr and "not sharded" not in result.stderr, result.stderr

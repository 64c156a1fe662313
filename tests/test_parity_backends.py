"""`runner parity` on real backends, on the CPU: torch (runner_cuda) and mlx-lm (runner_mlx).

Real checkpoints only: the tiny random Llama of conftest and SmolLM2-135M-Instruct (real weights).
The numbers asserted here were measured on this machine (see the README's parity section); each
bound leaves room around the measured value, and the checks that must fail are checked to fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.cli import main
from runner.errors import BackendUnavailable
from runner.model import load_spec
from runner.parity import (
    DEFAULT_THRESHOLDS,
    builtin_prompts,
    capture,
    compare,
    load_session,
    parse_target,
    read_record,
    thresholds_for,
    write_record,
)

PROMPTS = [p for p in builtin_prompts() if p.name in ("capital", "sky")]
CONTEXT = 256


def run_capture(folder: Path, target: str, token_ids=None, max_tokens: int = 12, prompts=PROMPTS):
    try:
        session = load_session(load_spec(str(folder)), parse_target(target), CONTEXT)
    except BackendUnavailable as error:
        pytest.skip(str(error))
    try:
        return capture(session, prompts, token_ids=token_ids, context=CONTEXT, max_tokens=max_tokens)
    finally:
        session.close()


def copy_with_config(folder: Path, destination: Path, **changes) -> Path:
    """A copy of a checkpoint (weights linked) whose config.json differs by `changes`."""
    destination.mkdir()
    for item in folder.iterdir():
        if item.name != "config.json":
            (destination / item.name).symlink_to(item.resolve())
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if key == "rope_theta_top_level":
            config["rope_theta"] = config["rope_parameters"]["rope_theta"]
        elif key == "rope_theta" and "rope_parameters" in config:   # transformers 5 keeps it there
            config["rope_parameters"]["rope_theta"] = value
        else:
            config[key] = value
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    return destination


def copy_with_layers_swapped(folder: Path, destination: Path, first: int, second: int) -> Path:
    """A copy of a checkpoint whose decoder layers `first` and `second` trade places (same config)."""
    from safetensors.numpy import load_file, save_file

    destination.mkdir()
    for item in folder.iterdir():
        if item.name != "model.safetensors":
            (destination / item.name).symlink_to(item.resolve())
    tensors = load_file(str(folder / "model.safetensors"))
    a, b = f"model.layers.{first}.", f"model.layers.{second}."
    swapped = {}
    for name, tensor in tensors.items():
        if name.startswith(a):
            name = b + name[len(a):]
        elif name.startswith(b):
            name = a + name[len(b):]
        swapped[name] = tensor
    save_file(swapped, str(destination / "model.safetensors"), metadata={"format": "pt"})
    return destination


# ---- the tiny random Llama: torch float32 against MLX float32 ---------------------------------


@pytest.fixture(scope="module")
def tiny_torch_fp32(tiny_llama_dir):
    return run_capture(tiny_llama_dir, "cuda:fp32")


def test_torch_and_mlx_float32_agree_near_identically(tiny_llama_dir, tiny_torch_fp32):
    mlx = run_capture(tiny_llama_dir, "mlx:fp32", token_ids=tiny_torch_fp32.prompt_ids())
    result = compare(tiny_torch_fp32, mlx)
    # measured: mean KL 1.8e-12, max 1.2e-11 nats, top-1 100 %, every greedy reply identical
    assert result.kl_exact
    assert result.kl_mean < 1e-9 and result.kl_max < 1e-8
    assert result.top1 == 1.0 and result.top5 == 1.0
    assert result.greedy_same == result.greedy_prompts == len(PROMPTS)
    assert result.passed and result.thresholds.scheme == "fp32"


def test_record_then_compare_round_trip_through_the_cli(tiny_llama_dir, tmp_path, capsys):
    torch_record, mlx_record = str(tmp_path / "linux.parity"), str(tmp_path / "mac.parity")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n\nName three fruits that are red.\n")
    common = ["--prompts", str(prompts), "--no-builtin-prompts", "--max-tokens", "8", "--context", str(CONTEXT)]
    assert main(["parity", "record", "--backend", "cuda:fp32", str(tiny_llama_dir), "-o", torch_record, *common]) == 0
    assert main(["parity", "record", str(tiny_llama_dir), "--backend", "mlx:fp32", "-o", mlx_record, *common]) == 0
    capsys.readouterr()
    assert main(["parity", "compare", torch_record, mlx_record, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    result = report["results"][0]
    assert result["verdict"] == "PASS" and result["kl_exact"] is False
    assert result["top1"] == 1.0 and result["kl_mean"] < 1e-9
    assert report["reference"]["backend"] == "cuda" and report["sessions"][0]["backend"] == "mlx"
    record = read_record(mlx_record)
    assert record.meta["model"] == str(tiny_llama_dir) and record.meta["top_k"] == 64
    assert "mlx" in record.meta["versions"] and record.meta["device"].startswith("mlx")
    assert record.prompts[0].top_ids.shape[1] == 64


def test_a_record_of_another_model_is_refused(tiny_llama_dir, tiny_torch_fp32, tmp_path, capsys):
    other_folder = copy_with_config(tiny_llama_dir, tmp_path / "other", rope_theta=500000.0)
    other = run_capture(other_folder, "cuda:fp32", token_ids=tiny_torch_fp32.prompt_ids())
    a = str(write_record(tiny_torch_fp32, tmp_path / "a.parity"))
    b = str(write_record(other, tmp_path / "b.parity"))
    assert main(["parity", "compare", a, b]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the same model config" in err[0]


# ---- SmolLM2-135M-Instruct, real weights ----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_fp32(default_model_dir):
    return run_capture(default_model_dir, "cuda:fp32")


@pytest.mark.slow
def test_a_model_with_another_rope_theta_fails(default_model_dir, smollm2_fp32, tmp_path):
    # SmolLM2's theta is 100000; 10000 is Llama 2's, and mlx-lm's default when it finds none
    wrong = copy_with_config(default_model_dir, tmp_path / "theta", rope_theta=10000.0)
    other = run_capture(wrong, "cuda:fp32", token_ids=smollm2_fp32.prompt_ids())
    # the config check would refuse this pair outright; turn it off to judge the numbers alone
    result = compare(smollm2_fp32, other, require_same_model=False)
    assert not result.passed and result.thresholds.scheme == "fp32"
    # measured on these two short prompts: mean KL 0.07, far above float32 noise (1e-12 between
    # torch and MLX); short prompts hide much of it (rotations differ most at long distances), so
    # against 4-bit thresholds it would pass: compare like with like
    assert result.kl_mean > 100 * DEFAULT_THRESHOLDS["fp32"].max_kl


@pytest.mark.slow
def test_a_model_with_two_layers_swapped_fails(default_model_dir, smollm2_fp32, tmp_path):
    swapped = copy_with_layers_swapped(default_model_dir, tmp_path / "swapped", 14, 15)
    other = run_capture(swapped, "cuda:fp32", token_ids=smollm2_fp32.prompt_ids())
    # the same config and tokenizer: records are accepted, and the numbers must fail
    result = compare(read_record(write_record(smollm2_fp32, tmp_path / "a.parity")),
                     read_record(write_record(other, tmp_path / "b.parity")))
    assert not result.passed and result.thresholds.scheme == "fp32"


@pytest.mark.slow
def test_nf4_against_float32_is_measured_and_judged(default_model_dir, smollm2_fp32):
    nf4 = run_capture(default_model_dir, "cuda:nf4", token_ids=smollm2_fp32.prompt_ids())
    result = compare(smollm2_fp32, nf4)
    assert result.thresholds.scheme == "4-bit"
    # measured on these two prompts: mean KL 0.97, top-1 65 % (0.37 and 79 % on the 8 built-in
    # prompts); it keeps "Paris" but fails the default 4-bit verdict on this 135M model. A user
    # who accepts that much says so:
    assert 1e-2 < result.kl_mean < 3.0
    assert "Paris" in result.answers["capital"][1]
    assert not result.passed
    assert compare(smollm2_fp32, nf4, thresholds_for("fp32", "nf4", max_kl=3.0, min_top1=0.4)).passed


@pytest.mark.slow
def test_mlx_q4_against_float32_loses_the_answer_and_fails(default_model_dir, smollm2_fp32, tmp_path):
    # rope_theta also at the top of config.json, where mlx-lm 0.32 reads it (see the last test)
    folder = copy_with_config(default_model_dir, tmp_path / "top-level-theta", rope_theta_top_level=True)
    q4 = run_capture(folder, "mlx:q4", token_ids=smollm2_fp32.prompt_ids())
    result = compare(smollm2_fp32, q4)   # the same model identity: theta is 100000 in both configs
    # measured: mean KL 0.87, top-1 57 %, the answer "L'Alogue, the AI assistant designed by Smol"
    assert result.thresholds.scheme == "4-bit"
    assert "Paris" in result.answers["capital"][0] and "Paris" not in result.answers["capital"][1]
    assert not result.passed


@pytest.mark.slow
def test_torch_and_mlx_float32_agree_on_smollm2(default_model_dir, smollm2_fp32):
    # This caught a real bug: transformers 5 writes SmolLM2's theta (100000) inside
    # "rope_parameters", mlx-lm 0.32 reads only a top-level "rope_theta" and ran the model with
    # 10000: mean KL 0.09, top-1 89 %, "La femme au pays: Paris, ..." (the MLX backend now passes it).
    mlx = run_capture(default_model_dir, "mlx:fp32", token_ids=smollm2_fp32.prompt_ids())
    result = compare(smollm2_fp32, mlx)
    # measured on the 8 built-in prompts: mean KL 3.6e-11, max 4.1e-10, top-1 100 %, 8/8 replies same
    assert result.kl_mean < 1e-8 and result.top1 == 1.0
    assert result.greedy_same == result.greedy_prompts
    assert result.passed

"""The one path: `resolve` decides backend, quant and context once; every front end shows and
loads exactly what it decided, or ends with one line and exit 2."""

from __future__ import annotations

import json

import pytest

from runner.backend import all_quants, backend_names
from runner_llamacpp.plan_rules import default_model_runs_here as default_model_on_llamacpp
from runner.choice import resolve
from runner.default_model import gguf_file
from runner.cli import main
from runner.errors import UserInputError
from runner.hardware import parse_machine
from runner.model import catalog_ids, load_spec

MACHINES = ("4xA100-80GB", "8xRTX4090", "1xRTX4090", "2xM2Ultra-192GB", "cpu-64GB")
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
L70 = "meta-llama/Llama-3.1-70B-Instruct"


def outcome(spec, machine, backend, quant):
    """(backend, quant) that resolve picks, or the one-line error it gives."""
    try:
        choice = resolve(spec, machine, backend, quant)
    except UserInputError as error:
        assert "\n" not in str(error)
        return ("error", str(error))
    assert choice.plan.backend == choice.backend and choice.plan.quant == choice.quant
    assert choice.reason
    return (choice.backend, choice.quant)


def test_resolve_fills_in_what_was_not_asked_for():
    smol, cpu = load_spec(SMOL), parse_machine("cpu")
    # no GPU: llama.cpp's F16 copy of the default model's GGUF (torch fp32's answers, faster) when the
    # backend is installed, else torch fp32 (tests/test_llamacpp_default.py covers both)
    expected = ("llamacpp", "fp16") if default_model_on_llamacpp(smol) else ("cuda", "fp32")
    assert outcome(smol, cpu, None, None) == expected
    assert outcome(smol, cpu, "cuda", None) == ("cuda", "fp32")      # torch on the CPU, full precision
    assert outcome(smol, parse_machine("1xRTX4090"), None, None)[0] == "cuda"   # a GPU: llama.cpp not preferred
    assert outcome(smol, parse_machine("2xM2Ultra-192GB"), None, None)[0] == "mlx"
    assert outcome(smol, cpu, "mlx", None) == ("mlx", "bf16")
    assert outcome(smol, cpu, None, "q4") == ("mlx", "q4")           # only mlx takes q4
    llama70 = load_spec(L70)
    assert outcome(llama70, parse_machine("1xH100-80GB"), None, None) == ("cuda", "nf4")
    assert outcome(llama70, parse_machine("1xH100-80GB"), "cuda", None) == ("cuda", "nf4")
    # the case, where generate, the chat and plan used to disagree (q4, bf16, q8)
    choice = resolve(llama70, parse_machine("cpu-64GB"), "mlx")
    assert (choice.backend, choice.quant) == ("mlx", "q4")
    assert choice.reason == "you asked for mlx: q4 is its best scheme that fits"
    assert outcome(llama70, parse_machine("cpu-64GB"), "cuda", "q4")[0] == "error"
    # llama.cpp runs GGUF files as stored: a safetensors model is one line; a GGUF file has no other backend
    assert outcome(llama70, parse_machine("cpu-64GB"), "llamacpp", None)[0] == "error"
    assert outcome(llama70, parse_machine("cpu-64GB"), None, "gguf")[0] == "error"
    gguf = load_spec(str(gguf_file()))
    for machine in MACHINES:
        assert outcome(gguf, parse_machine(machine), None, None) == ("llamacpp", "gguf")
        assert outcome(gguf, parse_machine(machine), "cuda", None)[0] == "error"


@pytest.mark.parametrize("machine_name", MACHINES)
def test_every_front_end_resolves_as_the_core_does(machine_name, capsys):
    """The catalog x a machine x every backend (and none) x every quant (and none): the plan
    command (JSON) and the chat's planning pick what `resolve` picks, or both refuse in one line."""
    from runner.tui.loading import ModelChoice, plan_for

    machine = parse_machine(machine_name)
    for model in catalog_ids() + [str(gguf_file())]:
        spec = load_spec(model)
        for backend in (None, *backend_names()):
            for quant in (None, *all_quants()):
                expected = outcome(spec, machine, backend, quant)
                argv = ["plan", model, "--machine", machine_name, "--json"]
                argv += ["--backend", backend] if backend else []
                argv += ["--quant", quant] if quant else []
                code = main(argv)
                out, err = capsys.readouterr()
                if expected[0] == "error":
                    assert code == 2 and err.strip() == f"runner: error: {expected[1]}", (argv, err)
                    continue
                assert code == 0, (argv, err)
                chosen = json.loads(out)["plan"]
                assert (chosen["backend"], chosen["quant"]) == expected, argv
                plan = plan_for(ModelChoice(model, backend, quant), spec, machine)
                assert (plan.backend, plan.quant) == expected, argv


def test_generate_loads_what_resolve_picks_on_this_machine(capsys):
    """generate on this machine: the line it prints before loading names resolve's choice; a
    catalog entry without weights then ends in one line and exit 2."""
    from runner.hardware import detect_machine

    machine = detect_machine()
    spec = load_spec(L70)
    for backend in (None, *backend_names()):
        for quant in (None, "bf16", "nf4", "q4"):
            expected = outcome(spec, machine, backend, quant)
            argv = ["generate", L70, "-p", "hi"] + (["--backend", backend] if backend else []) + \
                (["--quant", quant] if quant else [])
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert "Traceback" not in "\n".join(err)
            assert err[-1].startswith("runner: error: "), err
            if expected[0] == "error":
                assert err == [f"runner: error: {expected[1]}"], (argv, err)
            else:
                assert err[0].startswith(f"runner: {L70} · {expected[0]} · {expected[1]} · "), (argv, err)


def test_plan_for_mlx_on_a_gpu_machine_is_a_table_not_a_traceback(capsys):
    """Issue 15: `plan … --machine 1xRTX4090 --backend mlx` ended in an IndexError."""
    assert main(["plan", "meta-llama/Llama-3.1-8B-Instruct", "--machine", "1xRTX4090", "--backend", "mlx"]) == 0
    out = capsys.readouterr().out
    assert "< bf16      mlx" in out and "chosen because: you asked for mlx" in out


def test_context_takes_8k_everywhere(capsys):
    for argv in (["plan", SMOL, "--context", "2k", "--json"],):
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["context"] == 2048
    for bad in ("0", "-5", "8x", "1e9999"):
        assert main(["generate", SMOL, "-p", "hi", "--context", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("runner: error: --context"), err


def test_launch_refuses_a_context_it_cannot_hold(capsys):
    """Issue 21, item 7: `runner launch --context -5` (or 0, or above the model's maximum) ran anyway."""
    for bad, message in (("-5", "positive number"), ("0", "positive number"), ("9999999", "trained for")):
        assert main(["launch", "--hosts", "127.0.0.1,127.0.0.1", "--context", bad, "-p", "hi"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_backends_register_their_own_commands():
    from runner.backend import backend_class
    from runner.cli import all_commands

    assert all_commands()["launch"][0] == backend_class("mlx").commands["launch"][0] == "runner_mlx.launch_command"


def test_kernel_names_are_the_backends_own(capsys):
    for argv, message in (
        (["generate", "-p", "hi", "--backend", "cuda", "--kernel", "foo"],
         "--kernel foo: not a kernel of the cuda backend; it takes cuda"),
        (["generate", "-p", "hi", "--backend", "llamacpp", "--kernel", "cuda"], "it has no kernels to choose from"),
        (["generate", "-p", "hi", "--backend", "mlx", "--kernel", "cuda"], "it has no kernels to choose from"),
        (["rehearse", "--layers", "1", "--kernel", "x"], "--kernel x: not a kernel of the cuda backend"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("runner: error: ") and message in err[-1] and "Traceback" not in "\n".join(err)

"""`runner rehearse` on the CPU: a real catalog architecture (Llama 3.2 1B, shrunk to 2 layers),
random weights materialized layer by layer in NF4 (bitsandbytes, double quant) and BF16, a real
prefill and decode, and the measured bytes held against the Plan.

Tolerances. On the CPU, "measured" is the bytes of the live tensors (bitsandbytes' quantization
state included: absmax, the nested absmax and both code tables), since the CPU allocator keeps no
statistics. The Plan counts the same objects from the architecture's numbers, so the two must agree
to within 0.1 %: the only bytes the Plan leaves out are the rotary embedding's two float32 inverse
frequency buffers (256 bytes here). The KV cache must match the Plan exactly (context x layers x
2 x KV heads x head_dim x 2 bytes). A Plan that forgot the quantization state (~3 % of NF4 weights)
or counted NF4 at 4 bits without absmax would fail these tests; the GPU proof runs hold the Plan to
the issue's 3 % with the CUDA allocator (bench/RESULTS.md).
"""

from __future__ import annotations

import json

import pytest

from runner.cli import main

MODEL = "meta-llama/Llama-3.2-1B-Instruct"
CONTEXT = 48
DECODE = 3
WEIGHTS_TOLERANCE = 0.001


def plan_for(quant: str, layers: int = 2, context: int = CONTEXT, machine: str | None = None):
    from runner.budget import make_plan
    from runner.hardware import resolve_machine
    from runner.model import load_spec

    return make_plan(load_spec(MODEL).with_layers(layers), resolve_machine(machine), quant, context, backend="cuda")


def run_rehearsal(quant: str):
    from runner_cuda.rehearse import rehearse

    plan = plan_for(quant)
    progress = []
    return plan, rehearse(plan, decode_tokens=DECODE, on_progress=progress.append), progress


@pytest.fixture(scope="module")
def nf4_run():
    return run_rehearsal("nf4")


@pytest.fixture(scope="module")
def bf16_run():
    return run_rehearsal("bf16")


def within(measured: float, planned: float, tolerance: float) -> bool:
    return abs(measured - planned) <= tolerance * planned


@pytest.mark.parametrize("run_name", ["nf4_run", "bf16_run"])
def test_measured_weights_and_kv_cache_match_the_plan(run_name, request):
    plan, result, _ = request.getfixturevalue(run_name)
    assert result.num_layers == 2 and plan.model.num_layers == 2
    assert result.method == "tensor bytes"
    (device,) = result.devices
    assert device.device == "cpu"
    assert device.planned_weights == plan.weights_bytes > 0
    assert within(device.weights, device.planned_weights, WEIGHTS_TOLERANCE), device
    # context x layers x (K and V) x 8 KV heads x head_dim 64 x bf16
    assert device.kv_cache == device.planned_kv_cache == CONTEXT * 2 * 2 * 8 * 64 * 2
    # one decoder layer: the figure that extrapolates to the full-size model
    assert within(result.measured_layer_bytes, result.planned_layer_bytes, WEIGHTS_TOLERANCE)


def test_nf4_is_really_four_bit_with_double_quant(nf4_run, bf16_run):
    """NF4 layers hold ~0.516 bytes per weight (4 bits + a uint8 absmax per 64 + an fp32 per 256
    blocks), BF16 layers exactly 2: the rehearsal quantized for real instead of keeping bf16."""
    layer_elements = 2048 * 2048 * 2 + 512 * 2048 * 2 + 3 * 8192 * 2048
    nf4_layer = nf4_run[1].measured_layer_bytes
    bf16_layer = bf16_run[1].measured_layer_bytes
    assert bf16_layer == layer_elements * 2 + 2 * 2048 * 2       # + the two RMSNorm weights
    per_weight = nf4_layer / layer_elements
    assert 0.515 < per_weight < 0.518, per_weight                # without double quant: 0.5625
    # the embeddings stay bf16 (bitsandbytes does not quantize them); Llama 3.2 1B ties lm_head to them
    sizes = {block.name: block.bytes for block in nf4_run[1].blocks}
    assert sizes["embeddings"] == 128256 * 2048 * 2
    assert sizes["head"] == 2048 * 2


def test_prefill_and_decode_ran(nf4_run):
    _, result, _ = nf4_run
    assert result.prefill_tokens == CONTEXT - DECODE
    assert len(result.decode_step_seconds) == DECODE
    assert result.decode_tokens_per_s > 0 and result.prefill_tokens_per_s > 0


def test_prefill_in_chunks_fills_the_cache_to_the_context():
    """--prefill-chunk 16: the 45-token prompt goes in as 16 + 16 + 13 tokens through the session's
    own forward_in_chunks; the cache still ends holding exactly the context (the rehearsal checks
    it and fails otherwise), with the bytes the plan gives it."""
    from runner_cuda.rehearse import rehearse

    plan = plan_for("bf16", layers=1)
    progress = []
    result = rehearse(plan, decode_tokens=DECODE, on_progress=progress.append, prefill_chunk=16)
    assert f"prefill of {CONTEXT - DECODE} tokens in chunks of 16" in [p.stage for p in progress]
    (device,) = result.devices
    assert device.kv_cache == device.planned_kv_cache == plan.kv_cache_bytes


def test_int8_weights_and_row_scales_match_the_plan():
    from runner_cuda.rehearse import rehearse

    plan = plan_for("int8", layers=1, context=8)
    result = rehearse(plan, decode_tokens=1)
    (device,) = result.devices
    assert within(device.weights, device.planned_weights, WEIGHTS_TOLERANCE), device
    # int8 weights + one fp32 scale per output row (SCB) + the two fp16 norms
    rows = 2048 + 512 + 512 + 2048 + 8192 + 8192 + 2048
    assert result.measured_layer_bytes == (2048 * 2048 * 2 + 512 * 2048 * 2 + 3 * 8192 * 2048) + rows * 4 + 2 * 2048 * 2


def test_progress_per_layer(nf4_run):
    stages = [progress.stage for progress in nf4_run[2]]
    assert [s.split(" on ")[0] for s in stages[:4]] == ["embeddings", "layer 0", "layer 1", "head"]
    assert f"prefill of {CONTEXT - DECODE} tokens" in stages


def test_human_output_shows_plan_against_measured(nf4_run):
    from runner.commands.rehearse import render

    plan, result, _ = nf4_run
    out = render(plan, result)
    assert "weights plan" in out and "one decoder layer: plan 31.39 MB, measured 31.39 MB" in out
    assert "roofline" in out and "bitsandbytes" in out   # versions are part of the record


def test_versions_are_read_without_importing_bitsandbytes():
    """A bf16 rehearsal needs no bitsandbytes; importing it only for its version printed its
    warning about the `kernels` package (on CPUs with AVX512-BF16) into the rehearsal's output."""
    import subprocess
    import sys

    code = ("import sys, json; from runner_cuda.rehearse import versions; found = versions(); "
            "print(json.dumps([found.get('bitsandbytes'), 'bitsandbytes' in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    version, imported = json.loads(result.stdout)
    assert version and not imported and "kernels" not in result.stderr, result.stderr


def test_refuses_a_plan_that_does_not_fit_before_allocating(capsys):
    # 8B in bf16 (16 GB) on a hypothetical 1 GB CPU-only machine: the plan says it does not fit.
    code = main(["rehearse", "meta-llama/Llama-3.1-8B-Instruct", "--quant", "bf16", "--machine", "cpu-1GB"])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit" in err and "--force" in err and "nothing was allocated" in err
    assert "layer 0" not in err    # no progress: nothing was materialized
    assert len(err.strip().splitlines()) == 1


def test_force_rehearses_anyway_and_measures(capsys):
    # On a hypothetical 1 GB CPU-only machine the plan puts 4 bf16 layers of the 1B partly on disk;
    # without --force that is refused, with --force it runs here (this machine has the RAM).
    arguments = ["rehearse", MODEL, "--layers", "4", "--quant", "bf16", "--context", "8", "--decode-tokens", "1",
                 "--machine", "cpu-1GB"]
    assert plan_for("bf16", layers=4, context=8, machine="cpu-1GB").verdict == "offload"
    assert main(arguments) == 2
    assert "does not fit" in capsys.readouterr().err
    code = main([*arguments, "--force", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["plan"]["verdict"] == "offload"
    (device,) = result["rehearsal"]["devices"]
    # everything on the CPU (the plan's CPU + disk shares together)
    assert device["device"] == "cpu"
    assert within(device["weights"], result["plan"]["weights_bytes"], WEIGHTS_TOLERANCE)
    assert "layer 3 on cpu" in captured.err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--layers", "0"], "--layers must be between 1 and 16"),
        (["--layers", "17"], "--layers must be between 1 and 16"),
        (["--context", "1"], "--context must be at least 2"),
        (["--context", "8", "--decode-tokens", "8"], "must be smaller than --context"),
        (["--decode-tokens", "0"], "--decode-tokens must be at least 1"),
        (["--context", "200000"], "--context 200000 is longer than"),
        (["--machine", "1xH100-80GB", "--layers", "1", "--context", "16", "--decode-tokens", "1"],
         "this machine has 0 CUDA GPU(s)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, arguments, message):
    code = main(["rehearse", MODEL, *arguments])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1 or "rehearsing" in err.splitlines()[0]


def test_unknown_model_and_quant(capsys):
    assert main(["rehearse", "no-such/model"]) == 2
    assert "not in runner's catalog" in capsys.readouterr().err
    assert main(["rehearse", MODEL, "--quant", "fp7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("runner: error: unknown quantization 'fp7'") and len(err.splitlines()) == 1, err


def test_two_gpu_plan_places_every_parameter_of_the_405b_where_the_plan_says():
    """Issue 9's placement without its GPUs: the 405B built on the meta device (no memory), the
    2 x H200 plan's device map resolved by transformers as a real load does, and each parameter's
    target device: what the rehearsal materializes where."""
    from runner.budget import make_plan
    from runner.hardware import parse_machine
    from runner.model import load_spec
    from runner_cuda.loading import scheme_for
    from runner_cuda.rehearse import block_of, build_meta_model, device_of, resolve_device_map

    plan = make_plan(load_spec("meta-llama/Llama-3.1-405B-Instruct"), parse_machine("2xH200"), "nf4", 8192,
                     backend="cuda")
    assert plan.verdict == "fits"
    model, quantizer = build_meta_model(plan.model, scheme_for("nf4", [], allow_offload=False), "sdpa")
    device_map = resolve_device_map(model, plan, quantizer)
    blocks_per_device: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        blocks_per_device.setdefault(device_of(name, device_map), set()).add(block_of(name))
    shares = {share.device: share for share in plan.placement}
    assert set(blocks_per_device) == {"cuda:0", "cuda:1"} == set(shares)
    for device, blocks in blocks_per_device.items():
        start, stop = shares[device].layers
        assert {b for b in blocks if b.startswith("layer ")} == {f"layer {i}" for i in range(start, stop)}
    assert "embeddings" in blocks_per_device["cuda:0"] and "head" in blocks_per_device["cuda:1"]
    assert len(set(device_map.values())) == 2     # so rehearse() adds accelerate's hooks (dispatch_model)


def test_forced_placement_spreads_layers_over_the_gpus():
    from runner.model import load_spec
    from runner_cuda.rehearse import forced_device_map

    spec = load_spec("meta-llama/Llama-3.1-70B-Instruct")
    mapping = forced_device_map(spec, 2)
    assert [mapping[f"model.layers.{i}"] for i in (0, 39, 40, 79)] == [0, 0, 1, 1]
    assert mapping["model.embed_tokens"] == 0 and mapping["lm_head"] == 1 and mapping["model.norm"] == 1
    assert forced_device_map(spec, 0) == {"": "cpu"}


def test_rehearsal_decodes_through_the_path_a_session_here_uses(nf4_run):
    """On the CPU a session decodes through transformers' loop (the fast path needs CUDA): so does
    the rehearsal, and it says so."""
    _, result, _ = nf4_run
    assert result.decode_path == "transformers"
    assert "no CUDA GPU" in result.decode_path_reason
    assert result.to_dict()["decode_path"] == "transformers"
    assert any("transformers' loop" in note for note in result.notes)


def test_fast_decode_steps_give_the_transformers_steps_logits():
    """The rehearsal's two decode paths over one random model (Llama 3.2 1B shrunk to 2 layers, BF16,
    on the CPU, where the fast decoder runs eagerly): the same prompt and tokens give the same next-token
    logits within bf16 rounding, and both caches end holding every position."""
    import torch

    from runner.model import load_spec
    from runner_cuda.fast.decoder import FastDecoder
    from runner_cuda.rehearse import FastDecode, TransformersDecode, random_model

    spec = load_spec(MODEL).with_layers(2)
    model = random_model(spec, "bf16", device="cpu")
    prompt = torch.randint(0, spec.vocab_size, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    paths = [TransformersDecode(model, prefill_chunk=8, device="cpu"), FastDecode(FastDecoder(model, 64), prefill_chunk=8)]
    runs = []
    for steps in paths:
        logits = [steps.prefill(prompt).float().clone()]
        for token in (5, 6, 7):
            logits.append(steps.step(token).float().clone())
        runs.append(torch.stack(logits))
        assert steps.length == len(prompt) + 3
        kv = sum(t.numel() for t in steps.kv_tensors() if t.numel())
        assert kv >= 2 * 2 * (len(prompt) + 3) * spec.num_kv_heads * spec.head_dim
    assert paths[1].warm_up_seconds > 0
    slow, fast = runs
    assert ((fast - slow).norm() / slow.norm()).item() < 2e-2
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))

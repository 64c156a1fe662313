"""`runner rehearse --backend mlx` on the CPU (mlx[cpu]): Llama 3.2 1B shrunk to 2 layers, built
with mlx-lm's own class and `quantize_model`, random weights materialized block by block in q4, q8
and bf16, a real prefill and decode through mlx-lm's KVCache, memory measured with mlx's allocator.

Tolerances.
- Weights: mlx[cpu]'s allocator counts the exact bytes each buffer asks for (no rounding on the
  CPU), so the measured active memory equals the plan's bytes up to a few hundred bytes of small
  arrays that are not weights: the scalar constants mlx-lm's initializers made (4-byte arrays, freed
  as each block replaces them) and the 8-byte random key. WEIGHTS_TOLERANCE_BYTES = 1 KiB, for
  ~200 MB to 770 MB of weights. (On Metal the allocator may align buffers to pages and keep small
  ones in a heap, so a Metal rehearsal could differ by up to a page per array; not checked: no Mac
  here, and mlx 0.32's Metal allocator was not read for this.)
- KV cache: the plan counts `context` tokens exactly; mlx-lm's KVCache allocates its buffers in
  steps of 256 tokens, so after a prefill in 2048-token chunks the cache holds `context` tokens in
  ceil(context / 256) x 256 slots. The tests check both: the tokens held times the bytes per token
  equals the plan exactly, and the allocated bytes equal the plan scaled to the slots exactly.
Speed: mlx's CPU quantized matmul is slow (about 0.3 G multiply-adds/s here, batched or not), so the
quantized runs use a 8-token context and one decoded token.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from runner.cli import main  # noqa: E402

MODEL = "meta-llama/Llama-3.2-1B-Instruct"
CONTEXT = 8
DECODE = 1
WEIGHTS_TOLERANCE_BYTES = 1024
KV_BYTES_PER_TOKEN = 2 * 2 * 8 * 64 * 2      # 2 layers x (K and V) x 8 KV heads x head_dim 64 x bf16


def plan_for(quant: str, layers: int = 2, context: int = CONTEXT, machine: str | None = None):
    from runner.budget import make_plan
    from runner.hardware import resolve_machine
    from runner.model import load_spec

    return make_plan(load_spec(MODEL).with_layers(layers), resolve_machine(machine), quant, context, backend="mlx")


def run_rehearsal(quant: str, context: int = CONTEXT):
    from runner_mlx.rehearse import rehearse

    plan = plan_for(quant, context=context)
    progress = []
    return plan, rehearse(plan, decode_tokens=DECODE, on_progress=progress.append), progress


@pytest.fixture(scope="module")
def q4_run():
    return run_rehearsal("q4")


@pytest.fixture(scope="module")
def q8_run():
    return run_rehearsal("q8")


@pytest.fixture(scope="module")
def bf16_run():
    # bf16 runs through BLAS and is fast: a context past one 256-token step of the KV cache
    return run_rehearsal("bf16", context=300)


@pytest.mark.parametrize("run_name", ["q4_run", "q8_run", "bf16_run"])
def test_measured_weights_match_the_plan(run_name, request):
    plan, result, _ = request.getfixturevalue(run_name)
    assert result.num_layers == 2 and result.method == "mlx allocator"
    (device,) = result.devices
    assert device.device == "cpu" and device.planned_weights == plan.weights_bytes > 0
    assert abs(device.weights - device.planned_weights) <= WEIGHTS_TOLERANCE_BYTES, device
    assert abs(result.measured_layer_bytes - result.planned_layer_bytes) <= WEIGHTS_TOLERANCE_BYTES
    # no full-precision copy was ever made: the load's peak is the weights themselves
    assert device.load_peak - device.weights <= WEIGHTS_TOLERANCE_BYTES, device


def test_quantized_layers_hold_packed_words_and_bf16_scales(q4_run, q8_run, bf16_run):
    """One layer: 4 bits (or 8) per weight in uint32 words, plus a bf16 scale and bias per 64."""
    elements = 2048 * 2048 * 2 + 512 * 2048 * 2 + 3 * 8192 * 2048
    norms = 2 * 2048 * 2
    for (_, result, _), bits in ((q4_run, 4), (q8_run, 8)):
        expected = elements * bits // 8 + 2 * (elements // 64) * 2 + norms
        assert abs(result.measured_layer_bytes - expected) <= WEIGHTS_TOLERANCE_BYTES
    assert abs(bf16_run[1].measured_layer_bytes - (elements * 2 + norms)) <= WEIGHTS_TOLERANCE_BYTES
    # mlx-lm quantizes the embedding too (QuantizedEmbedding); Llama 3.2 1B ties lm_head to it
    sizes = {block.name: block.bytes for block in q4_run[1].blocks}
    assert abs(sizes["embeddings"] - (128256 * 2048 // 2 + 2 * 128256 * 32 * 2)) <= WEIGHTS_TOLERANCE_BYTES
    assert abs(sizes["head"] - 2048 * 2) <= WEIGHTS_TOLERANCE_BYTES


@pytest.mark.parametrize("run_name, context", [("q4_run", CONTEXT), ("bf16_run", 300)])
def test_kv_cache_holds_the_context_in_steps_of_256(run_name, context, request):
    plan, result, _ = request.getfixturevalue(run_name)
    (device,) = result.devices
    slots = -(-context // 256) * 256
    assert plan.kv_cache_bytes == device.planned_kv_cache == slots * KV_BYTES_PER_TOKEN   # the plan counts the slots
    assert result.kv_tokens == context
    assert result.kv_cache_tokens_bytes == context * KV_BYTES_PER_TOKEN  # the tokens held
    assert result.kv_slots == slots
    assert device.kv_cache == plan.kv_cache_bytes                        # what mlx-lm allocates: the plan
    # the allocator agrees: after the decode mlx holds the weights and the cache's buffers
    assert abs(device.resident - (device.weights + device.kv_cache)) <= WEIGHTS_TOLERANCE_BYTES, device


def test_float32_checkpoint_rehearses_with_float32_scales():
    """A config that says float32 (the imported default model does) keeps float32 scales and
    biases in q8, as mlx_lm.convert does; the rehearsal used to end in a TypeError there."""
    from dataclasses import replace

    from runner.budget import make_plan
    from runner.hardware import detect_machine
    from runner.model import load_spec
    from runner_mlx.rehearse import rehearse

    spec = replace(load_spec(MODEL).with_layers(1), dtype="float32")
    plan = make_plan(spec, detect_machine(), "q8", CONTEXT, backend="mlx")
    result = rehearse(plan, decode_tokens=DECODE)
    (device,) = result.devices
    assert abs(device.weights - plan.weights_bytes) <= WEIGHTS_TOLERANCE_BYTES, device
    elements = 2048 * 2048 * 2 + 512 * 2048 * 2 + 3 * 8192 * 2048
    expected = elements + 2 * (elements // 64) * 4 + 2 * 2048 * 4      # 8-bit codes, float32 scales, biases, norms
    assert abs(result.measured_layer_bytes - expected) <= WEIGHTS_TOLERANCE_BYTES


def test_prefill_and_decode_ran(q4_run):
    _, result, progress = q4_run
    assert result.prefill_tokens == CONTEXT - DECODE and len(result.decode_step_seconds) == DECODE
    assert result.decode_tokens_per_s > 0 and result.prefill_tokens_per_s > 0
    stages = [p.stage.split(" on ")[0] for p in progress]
    assert stages[:4] == ["embeddings", "layer 0", "layer 1", "head"]


def test_human_output(bf16_run):
    from runner.commands.rehearse import render

    plan, result, _ = bf16_run
    out = render(plan, result)
    assert "mx.get_active_memory" in out and "weights plan" in out
    assert "300 tokens held" in out and "512 slots" in out
    assert "roofline" in out and "mlx-lm" in out


def test_cli_json(capsys):
    code = main(["rehearse", "--backend", "mlx", MODEL, "--quant", "bf16", "--layers", "1", "--context", "16",
                 "--decode-tokens", "2", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["plan"]["quant"] == "bf16" and result["plan"]["num_layers"] == 1
    (device,) = result["rehearsal"]["devices"]
    assert abs(device["weights"] - result["plan"]["weights_bytes"]) <= WEIGHTS_TOLERANCE_BYTES
    assert "layer 0 on cpu" in captured.err


def test_refuses_a_plan_that_does_not_fit_before_allocating(capsys):
    # 8B in bf16 (16 GB) on a hypothetical 1 GB CPU-only machine
    code = main(["rehearse", "--backend", "mlx", "meta-llama/Llama-3.1-8B-Instruct", "--quant", "bf16",
                 "--machine", "cpu-1GB"])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit" in err and "--force" in err and "nothing was allocated" in err
    assert len(err.strip().splitlines()) == 1


def test_force_rehearses_anyway(capsys):
    # 4 bf16 layers of the 1B (1.0 GB of weights) on a hypothetical 1 GB CPU-only machine
    arguments = ["rehearse", "--backend", "mlx", MODEL, "--layers", "4", "--quant", "bf16", "--context", "8",
                 "--decode-tokens", "1", "--machine", "cpu-1GB"]
    assert plan_for("bf16", layers=4, context=8, machine="cpu-1GB").verdict != "fits"
    assert main(arguments) == 2
    assert "does not fit" in capsys.readouterr().err
    code = main([*arguments, "--force", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["plan"]["verdict"] != "fits"
    (device,) = result["rehearsal"]["devices"]
    assert abs(device["weights"] - result["plan"]["weights_bytes"]) <= WEIGHTS_TOLERANCE_BYTES


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--layers", "0"], "--layers must be between 1 and 16"),
        (["--layers", "17"], "--layers must be between 1 and 16"),
        (["--quant", "nf4"], "--quant nf4 is not a mlx scheme; --backend mlx takes q4, q8, bf16"),
        (["--context", "8", "--decode-tokens", "8"], "must be smaller than --context"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, arguments, message):
    code = main(["rehearse", "--backend", "mlx", MODEL, *arguments])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_cuda_stays_the_default_and_refuses_mlx_quants(capsys):
    assert main(["rehearse", MODEL, "--backend", "cuda", "--quant", "q4"]) == 2
    assert "--quant q4 is not a cuda scheme" in capsys.readouterr().err

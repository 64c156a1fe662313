"""`runner rehearse` on a CUDA GPU (skipped without one): the allocator's bytes against the Plan,
and a real out-of-memory caught and reported with how far it got.

Run on the device machine by bench/rehearse_gpu.py; the big proof runs are in bench/RESULTS.md.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MODEL = "meta-llama/Llama-3.2-1B-Instruct"


def plan_for(quant: str, layers: int, context: int):
    from runner.budget import make_plan
    from runner.hardware import detect_machine
    from runner.model import load_spec

    return make_plan(load_spec(MODEL).with_layers(layers), detect_machine(), quant, context, backend="cuda")


def test_allocator_bytes_match_the_plan_within_3_percent():
    from runner_cuda.rehearse import rehearse

    plan = plan_for("nf4", layers=4, context=1024)
    result = rehearse(plan, decode_tokens=8)
    assert result.method == "allocator"
    cuda = [d for d in result.devices if d.device.startswith("cuda")]
    assert cuda
    for device in cuda:
        assert abs(device.weights - device.planned_weights) <= 0.03 * device.planned_weights, device
        assert device.kv_cache == device.planned_kv_cache, device          # the cache's tensors, exactly
        # the allocator holds weights + KV cache + cuBLAS' workspaces (32 MiB each on Hopper, one per
        # stream: the default one and the fast path's graph-capture stream) and little else (the
        # graphs' pool, RoPE tables, logits: ~1 MB here)
        assert 0 <= device.resident - device.weights - device.kv_cache <= 2 * 32 * 2**20 + 4 * 2**20, device
    assert abs(result.measured_layer_bytes - result.planned_layer_bytes) <= 0.03 * result.planned_layer_bytes


def test_out_of_memory_is_caught_and_says_how_far_it_got():
    from runner_cuda.rehearse import RehearsalOutOfMemory, rehearse

    plan = plan_for("bf16", layers=16, context=256)     # ~2.5 GB of bf16 weights
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.2e9 / total, 0)   # let the allocator have 1.2 GB
    try:
        with pytest.raises(RehearsalOutOfMemory) as error:
            rehearse(plan, decode_tokens=2)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    message = str(error.value)
    assert "out of memory on cuda:0 while materializing layer" in message
    assert "/16 layers materialized" in message and "GB in use" in message
    assert torch.cuda.memory_allocated(0) < 0.1e9    # the model was freed


def test_rehearsal_decodes_through_the_fast_path_as_a_session_does():
    """On one GPU a session decodes through runner's fast path: so does the rehearsal, its static
    cache exactly the planned KV cache, and faster than transformers' loop on the same plan."""
    from runner_cuda.rehearse import rehearse

    plan = plan_for("nf4", layers=4, context=1024)
    fast = rehearse(plan, decode_tokens=16)
    slow = rehearse(plan, decode_tokens=16, fast_decode=False)
    assert (fast.decode_path, slow.decode_path) == ("fast", "transformers")
    assert fast.warm_up_seconds > 0 and "fast path" in fast.notes[0]
    for device in fast.devices:
        assert device.kv_cache == device.planned_kv_cache, device
        assert device.peak <= device.planned_total, device
    assert fast.decode_tokens_per_s > 2 * slow.decode_tokens_per_s, (fast.decode_tokens_per_s, slow.decode_tokens_per_s)

"""The ordinary loop's quantized KV read (`--kv-bits 8|4`, runner_cuda.kv_cache: the CUDA backend
where its fast path does not run, on a CPU here) held against the plan's count of it
(CudaPlanRules.kv_read_bytes): what torch's CPU allocator hands out at the peak of one decode step
and of one prefill chunk's cache update, at a context of a few thousand tokens (more than one block
of KV_READ_BLOCK positions) on a tiny Llama with Llama 3's head size (128).

Measured with torch's profiler (alloc_helpers.peak_bytes): every CPU allocation and free, in order,
as the allocator saw them; their running sum's peak inside the measured window, above where it
started.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from alloc_helpers import decode_step_peak, filled_cache, peak_bytes  # noqa: E402

CONTEXT = 6000           # one block of KV_READ_BLOCK positions and a part
CHUNK = 2048             # budget.PREFILL_CHUNK

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def kv_model(request, long_llama_dir):
    """(model, quant): conftest's tiny Llama with a 32k context and heads of 128 values (4 heads,
    2 KV heads), random weights, in fp32 and in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((long_llama_dir / "config.json").read_text())
    config.update(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).to(DTYPES[request.param]).eval(), request.param


def _planned(model, quant, kv_bits):
    from runner.model import spec_from_config
    from runner_cuda.plan_rules import CudaPlanRules

    spec = spec_from_config(model.config.to_dict(), "kv-read-test", "memory")
    return CudaPlanRules().kv_read_bytes(spec, CONTEXT, 1, quant, kv_bits)


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_decode_step_holds_the_plans_kv_read(kv_model, kv_bits):
    """One decode step through the model at CONTEXT tokens: its peak above the cache's growth (one
    position's codes, scales and biases) is the plan's count of one layer's read, and at most
    64 KiB more: the step's own tensors alive during the read (one position's hidden state, queries
    and mask; measured 3.3 KiB in bf16, 6.5 in fp32), far below one block's temporaries."""
    model, quant = kv_model
    peak, cache = decode_step_peak(model, CONTEXT - 1, kv_bits)
    planned = _planned(model, quant, kv_bits)
    assert cache.get_seq_length() == CONTEXT
    assert planned <= peak <= planned + 64 * 1024


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_prefill_chunks_cache_update_is_the_plans_kv_read(kv_model, kv_bits):
    """A prefill chunk's K and V (CHUNK positions) appended to a layer that reaches CONTEXT: the
    update's peak (quantizing the chunk, then reading the layer back) above the cache's growth is
    exactly the plan's count. (The whole prefill chunk on a CPU peaks higher, in torch's CPU
    attention, which turns the boolean mask into a float one of CHUNK x CONTEXT: not a KV read.)"""
    model, quant = kv_model
    keys, values = (torch.randn(1, 2, CHUNK, 128).to(model.dtype) for _ in range(2))

    def setup():
        layer = filled_cache(model, CONTEXT - CHUNK, kv_bits).layers[0]
        return layer, layer.nbytes()

    peak, net, (layer, before) = peak_bytes(setup, lambda state: state[0].update(keys, values))
    growth = layer.nbytes() - before
    assert layer.get_seq_length() == CONTEXT
    assert net == growth + 2 * CONTEXT * 2 * 128 * model.dtype.itemsize     # the two copies it returned
    assert peak - growth == _planned(model, quant, kv_bits)


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_blocked_read_is_the_whole_dequantization_bit_for_bit(kv_bits):
    from runner_cuda.kv_cache import dequantize, dequantize_blocks, quantize

    x = (torch.randn(1, 2, CONTEXT, 128) * 3).to(torch.bfloat16)
    parts = quantize(x, kv_bits)
    assert torch.equal(dequantize_blocks(*parts, kv_bits), dequantize(*parts, kv_bits))

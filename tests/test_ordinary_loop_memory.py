"""The ordinary loop's attention scratch (CudaPlanRules.ordinary_loop_attention_bytes: the CUDA
backend where its fast path does not run, on a CPU here) held against what torch's CPU allocator
hands out: a prefill chunk of PREFILL_CHUNK tokens after thousands of cached ones, through the
model as a session runs it (session.forward_in_chunks), with a bf16/fp32 cache and a quantized one,
on a tiny Llama with grouped-query attention (4 heads, 2 KV heads of Llama 3's 128 values) and one
without (4 and 4); and a decode step's cache growth (torch.cat) in transformers' DynamicCache.

The peak of a prefill chunk, above the cache's growth, is the plan's count plus the chunk's own
tensors (hidden states, q/k/v, the attention's output), which do not depend on the context and
which the plan counts as activations (budget.activation_bytes), and torch's CPU attention kernel's
buffers, a few hundred KiB per thread (none on a GPU). So the test measures at two contexts: the
peak moves with the context exactly as the plan's count does (to the byte), and what is left at
either is within the plan's activations for the chunk and THREAD_BUFFERS per thread.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from alloc_helpers import decode_step_peak, filled_cache, peak_bytes, stored_bytes  # noqa: E402

CHUNK = 2048                       # budget.PREFILL_CHUNK
CONTEXTS = (4500, 6000)            # both past one KV_READ_BLOCK (4096), so the read's block is the same
THREAD_BUFFERS = 1 << 20           # torch's CPU flash attention: scratch per thread (0.88 MiB measured in bf16)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module", params=[("fp32", 2), ("bf16", 2), ("bf16", 4)],
                ids=["fp32-gqa", "bf16-gqa", "bf16-mha"])
def loop_model(request, long_llama_dir):
    """(model, quant): conftest's tiny Llama with heads of 128 values, 4 query heads and 2 (GQA) or 4
    KV heads, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    quant, kv_heads = request.param
    config = json.loads((long_llama_dir / "config.json").read_text())
    config.update(hidden_size=128, num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).to(DTYPES[quant]).eval(), quant


def _spec(model):
    from runner.model import spec_from_config

    return spec_from_config(model.config.to_dict(), "ordinary-loop-test", "memory")


def _planned(model, quant, context, kv_bits):
    """The plan's scratch for this model on a machine without a GPU (where the ordinary loop runs)."""
    from runner.hardware import parse_machine
    from runner_cuda.plan_rules import CudaPlanRules

    return CudaPlanRules().attention_scratch_bytes(_spec(model), parse_machine("cpu-64GB"), context, 1, quant, kv_bits)


def _chunk_peak(model, context, kv_bits) -> int:
    """The peak of one prefill chunk's forward (CHUNK tokens ending at `context`) above where it
    started, less what the cache grew by."""
    from runner_cuda.session import cache_argument, forward_in_chunks

    def setup():
        cache = filled_cache(model, context - CHUNK, kv_bits)
        return cache, stored_bytes(cache)

    def chunk(state):
        ids = torch.randint(0, model.config.vocab_size, (1, CHUNK))
        return forward_in_chunks(model, ids, state[0], CHUNK, cache_argument(model))

    peak, _, (cache, before) = peak_bytes(setup, chunk)
    assert cache.get_seq_length() == context
    return peak - (stored_bytes(cache) - before)


@pytest.mark.slow
@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_prefill_chunk_peak_is_the_plans_scratch_plus_the_chunks_activations(loop_model, kv_bits):
    from runner.budget import activation_bytes

    model, quant = loop_model
    left = {}
    for context in CONTEXTS:
        left[context] = _chunk_peak(model, context, kv_bits) - _planned(model, quant, context, kv_bits)
    low, high = (left[c] for c in CONTEXTS)
    assert low == high, f"the peak moves with the context by {high - low:+,} bytes more than the plan's count"
    activations = activation_bytes(_spec(model), CONTEXTS[0], 1, quant, "cuda")
    assert 0 <= low <= activations + torch.get_num_threads() * THREAD_BUFFERS


def test_decode_step_grows_the_dynamic_cache_with_the_old_values_alive(loop_model):
    """A decode step at 6,000 positions: above the cache's growth, its peak is one layer's V of the
    positions before it (torch.cat keeps the old tensor beside the new) and at most 64 KiB more (the
    step's own tensors); the plan's count covers it."""
    model, quant = loop_model
    context = CONTEXTS[-1]
    peak, _ = decode_step_peak(model, context - 1, None)
    old_values = (context - 1) * model.config.num_key_value_heads * 128 * model.dtype.itemsize
    assert old_values <= peak <= old_values + 64 * 1024
    assert old_values <= _planned(model, quant, context, None)


def test_the_plan_counts_the_ordinary_loops_scratch_only_where_it_runs():
    """Llama 3.1 8B at 128k: on a GPU the fast path runs (its scratch: the quantized read only); on a
    CPU, and for LLM.int8 on a GPU, the ordinary loop's (with the padded mask copy on a GPU), and a
    CPU plan's overhead is the chunk's activations, the logits and that."""
    from runner.budget import activation_bytes, logits_bytes, make_plan
    from runner.hardware import parse_machine
    from runner.model import load_spec
    from runner_cuda.plan_rules import CudaPlanRules

    spec, rules, context = load_spec("meta-llama/Llama-3.1-8B-Instruct"), CudaPlanRules(), 131072
    gpu, cpu = parse_machine("1xH200"), parse_machine("cpu-256GB")
    ordinary = rules.ordinary_loop_attention_bytes

    def scratch(machine, quant, kv_bits=None):
        return rules.attention_scratch_bytes(spec, machine, context, 1, quant, kv_bits)

    assert scratch(gpu, "bf16") == 0
    assert scratch(gpu, "bf16", 8) == rules.kv_read_bytes(spec, context, 1, "bf16", 8)
    assert scratch(gpu, "int8") == ordinary(spec, context, 1, "int8", None, True)
    assert scratch(cpu, "bf16") == ordinary(spec, context, 1, "bf16", None, False)
    # the mask (a byte per pair), K and V repeated to 32 heads, the additive mask (and its padded copy on a GPU)
    pairs, repeated = 2048 * context, 2 * 32 * 128 * context * 2
    assert ordinary(spec, context, 1, "bf16", None, False) == pairs * 3 + repeated
    assert ordinary(spec, context, 1, "bf16", None, True) == pairs * 5 + repeated
    plan = make_plan(spec, cpu, "bf16", context, backend="cuda")
    assert plan.overhead_bytes == (activation_bytes(spec, context, 1, "bf16", "cuda") + logits_bytes(spec, 1, "cuda")
                                   + pairs * 3 + repeated)

"""The peak of torch's CPU allocations inside a piece of code, read from torch's profiler
(`profile_memory=True`): every CPU allocation and free, in order, as the allocator saw them.
Process RSS would not do: glibc keeps freed blocks and maps large ones lazily. Used by the tests
that hold the plan's scratch counts against real allocation (test_kv_read_memory.py,
test_ordinary_loop_memory.py), with the caches and the decode step they measure."""

from __future__ import annotations


def peak_bytes(setup, measured):
    """(peak, net, state): the bytes of CPU allocations in `measured(state)` above what was
    allocated when it started, at their peak and at its end, `state` being `setup()`'s. Both run
    under one profiler, so every block `measured` frees was allocated while the profiler recorded
    (the allocator reports no size for a block allocated before). Reads torch's kineto results
    (checked against torch 2.13): its public event lists fold the allocations made inside an
    operator into that operator."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        state = setup()
        with record_function("measured"):
            kept = measured(state)
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == "measured")
    allocations = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    now = start = peak = 0
    for event in allocations:
        if event.start_ns() > window.end_ns():
            break
        now += event.nbytes()
        if event.start_ns() < window.start_ns():
            start = peak = now
        peak = max(peak, now)
    del kept
    return peak - start, now - start, state


def filled_cache(model, positions: int, kv_bits: int | None):
    """The CUDA session's cache for `kv_bits` (transformers' DynamicCache, or runner_cuda's quantized
    one) holding `positions` random positions in every layer of `model` (heads of 128 values)."""
    import torch
    from transformers import DynamicCache

    from runner_cuda.kv_cache import quantized_cache

    config = model.config
    cache = DynamicCache(config=config) if kv_bits is None else quantized_cache(config, kv_bits)
    for index in range(config.num_hidden_layers):
        keys, values = (torch.randn(1, config.num_key_value_heads, positions, 128).to(model.dtype) for _ in range(2))
        cache.update(keys, values, index)
    return cache


def stored_bytes(cache) -> int:
    """Bytes the cache's tensors hold (a quantized layer's codes, scales and biases; else K and V)."""
    return sum(layer.nbytes() if hasattr(layer, "stored") else layer.keys.nbytes + layer.values.nbytes
               for layer in cache.layers)


def decode_step_peak(model, positions: int, kv_bits: int | None):
    """(peak, cache): one decode step through `model` after a cache of `positions` positions, its
    peak allocation above the cache's growth (the new position), and the cache after it."""
    import torch

    from runner_cuda.session import cache_argument

    def setup():
        cache = filled_cache(model, positions, kv_bits)
        return cache, stored_bytes(cache)

    def step(state):
        with torch.inference_mode():
            return model(input_ids=torch.tensor([[5]]), use_cache=True, logits_to_keep=1,
                         **{cache_argument(model): state[0]}).logits

    peak, _, (cache, before) = peak_bytes(setup, step)
    return peak - (stored_bytes(cache) - before), cache

"""The peak of torch's CPU allocations inside a piece of code, read from torch's profiler
(`profile_memory=True`): every CPU allocation and free, in order, as the allocator saw them.
Process RSS would not do: glibc keeps freed blocks and maps large ones lazily. Used by the tests
that hold the plan's scratch counts against real allocation (test_kv_read_memory.py,
test_ordinary_loop_memory.py)."""

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

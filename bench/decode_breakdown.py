"""Where the 8B NF4 decode step's time goes inside its CUDA graph, on one GPU.

    PYTHONPATH=src:backends python3 bench/decode_breakdown.py [--out DIR] [--position 1024]

The step is captured with one kind of launch left out (each of the four NF4Mma launches of a layer by
its job, q/k/v's with RoPE and the KV write in it, the split-KV attention, its combine launch alone,
the lm_head, the greedy pick) and its graph is
replayed back to back at `--position`; the difference from the whole step is what that kind costs
there, the overlaps between launches counted (on Hopper each launch overlaps the one before, so a
profiler's per-kernel times count the overlaps twice). A step with a launch left out computes garbage:
timing only. The 8B shape's random NF4 weights are built on the GPU as `runner rehearse` builds them.
JSON under --out; a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_speed as cs          # noqa: E402  (puts src and backends on sys.path)
from nf4_variants import launch_kind  # noqa: E402

LEFT_OUT = [(), ("gate_up",), ("down",), ("qkv",), ("o",), ("qkv", "o", "gate_up", "down"), ("attention",),
            ("combine",), ("head",), ("pick",), ()]      # the whole step first and last: the run's drift


@contextlib.contextmanager
def leaving_out(kinds: set):
    """Launches of these kinds are not made while a decoder captures its graphs (their outputs: zeros,
    or what the buffer held)."""
    import torch

    from runner_cuda.fast import kv_kernels, pick, static_cache
    from runner_cuda.fast.decoder import FastDecoder
    from runner_cuda.fast.nf4_cuda import NF4Mma

    call, attend = NF4Mma.__call__, static_cache.decode_attention
    head_call, greedy_into = FastDecoder._head_call, pick.greedy_into
    spare: dict = {}

    def nf4_call(self, x, out=None, **kwargs):
        if launch_kind(self) not in kinds:
            return call(self, x, out, **kwargs)
        if out is None:
            out = spare.setdefault(id(self), torch.zeros(self.total, dtype=torch.bfloat16, device=x.device))
        return out if self.residual else out.view(*x.shape[:-1], self.total)

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def attention(q, keys, values, position, span, scale, bits=None):
        if "attention" in kinds:
            return torch.empty_like(q)
        if "combine" not in kinds:
            return attend(q, keys, values, position, span, scale, bits)
        combine, kv_kernels.combine = kv_kernels.combine, NoLaunch()
        try:
            return attend(q, keys, values, position, span, scale, bits)
        finally:
            kv_kernels.combine = combine

    def no_head(self):       # the head's output: zeros (the pick then takes id 0)
        zeros = torch.zeros(1, self.head.out_features, dtype=self.dtype, device=self.head.weight.device)
        return lambda x: zeros

    NF4Mma.__call__, static_cache.decode_attention = nf4_call, attention
    if "head" in kinds:
        FastDecoder._head_call = no_head
    if "pick" in kinds:      # (the position then stays where the host filled it: timing only)
        pick.greedy_into = lambda *args: None
    try:
        yield
    finally:
        NF4Mma.__call__, static_cache.decode_attention = call, attend
        FastDecoder._head_call, pick.greedy_into = head_call, greedy_into


def step_us(model, kinds: tuple, position: int) -> float:
    """µs of the step's graph at `position`, replayed back to back (best of 3), these kinds left out."""
    from runner_cuda.fast.decoder import FastDecoder

    with leaving_out(set(kinds)):
        decoder = FastDecoder(model, max_len=2 * position)
        decoder.warm_up()
        cs.decode_at(decoder, position, tokens=8)
        us = min(cs.graph_replay_us(decoder) for _ in range(3))
    del decoder
    cs.free()
    return us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--position", type=int, default=1024)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cs.SOURCE = "memory"
    cs.record("machine", copy_bandwidth_gb_s=cs.copy_bandwidth() / 1e9)
    model, _ = cs.load(None, "nf4")
    rows = []
    for kinds in LEFT_OUT:
        us = step_us(model, kinds, args.position)
        rows.append({"left_out": list(kinds), "graph_us": us})
        cs.log(f"{'+'.join(kinds) or 'nothing'} left out: {us:.1f} us a step")
    whole = min(r["graph_us"] for r in rows if not r["left_out"])
    for row in rows:
        row["cost_us"] = whole - row["graph_us"]
    (args.out / "decode_breakdown.json").write_text(json.dumps({"position": args.position, **cs.RESULTS, "rows": rows},
                                                               indent=2))
    print(f"\n| left out (at {args.position}) | graph µs | its cost, µs a token |\n| --- | --- | --- |")
    for row in rows:
        print(f"| {'+'.join(row['left_out']) or 'nothing'} | {row['graph_us']:,.1f} | {row['cost_us']:,.1f} |")


if __name__ == "__main__":
    main()

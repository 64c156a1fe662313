"""The greedy pick at the end of a graphed decode step, on the device, in Triton.

A decode step ends with the head's output for the vocabulary. The session used to copy it into the
float32 logits, pick the largest (`session.greedy`: four small launches), copy the id to the
step's input and refill the step's position from the host: eight launches and copies between two
graphs, each waiting for the one before (~50 us of an 8B's token on an H200, bench/RESULTS.md).
Here the step's own graph ends with two launches: `parts` writes the float32 logits and finds the
largest of each part of the vocabulary (its first index), `finish` finds the largest of the parts,
writes its id where the next step reads its token and into the host's pinned memory at the step's
position (read there without a copy after the step: a copy between two graphs waited ~8 us on each
side), and moves the step's position on by one. The id is the first index of the largest value,
as torch.argmax gives for finite logits.

    greedy_into(out, logits, picked, position, host_ids)   # out [vocab] -> logits, picked [1],
                                                            # host_ids[position], position += 1
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:
    import torch

PARTS = 128          # programs of `parts` (a power of two: `finish` reads them in one range)
BLOCK = 1024         # values a program reads a step


@triton.jit
def parts(out_ptr, logits_ptr, best_ptr, where_ptr, N, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program p: values p * CHUNK ... (p + 1) * CHUNK - 1 as float32 into the logits, and the
    largest of them with its first index."""
    first = tl.program_id(0) * CHUNK
    best = float("-inf")
    where = first
    for start in range(first, first + CHUNK, BLOCK):
        at = start + tl.arange(0, BLOCK)
        inside = at < N
        values = tl.load(out_ptr + at, mask=inside, other=float("-inf")).to(tl.float32)
        tl.store(logits_ptr + at, values, mask=inside)
        largest = tl.max(values, axis=0)
        first_at = tl.min(tl.where(values == largest, at, 2147483647), axis=0)
        better = largest > best            # an equal value further on is not the first
        where = tl.where(better, first_at, where)
        best = tl.where(better, largest, best)
    tl.store(best_ptr + tl.program_id(0), best)
    tl.store(where_ptr + tl.program_id(0), where)


@triton.jit
def finish(best_ptr, where_ptr, picked_ptr, host_ptr, position_ptr, PARTS: tl.constexpr):
    """The largest of the parts' (the first index among equals), into `picked` and host_ptr[position];
    the position + 1."""
    index = tl.arange(0, PARTS)
    best = tl.load(best_ptr + index)
    where = tl.load(where_ptr + index)
    largest = tl.max(best, axis=0)
    picked = tl.min(tl.where(best == largest, where, 2147483647), axis=0).to(tl.int64)
    position = tl.load(position_ptr)
    tl.store(picked_ptr, picked)
    tl.store(host_ptr + position, picked)
    tl.store(position_ptr, position + 1)


def greedy_into(out: "torch.Tensor", logits: "torch.Tensor", picked: "torch.Tensor", position: "torch.Tensor",
                host_ids: "torch.Tensor") -> None:
    """out [vocab] (the head's output, any float dtype) into logits [vocab] float32; its first
    largest's id into picked ([1] int64) and host_ids[position] (int64, pinned memory: one a
    position of the cache); position ([1] int64) + 1. On one device, in two launches (the decoder
    does the same with torch's operations on a CPU)."""
    import torch

    if out.numel() != logits.numel() or logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError(f"greedy_into writes {out.numel()} values into contiguous float32 logits, "
                         f"not {tuple(logits.shape)} {logits.dtype}")
    if host_ids.dtype != torch.long or not (host_ids.is_pinned() or host_ids.device == out.device):
        raise ValueError("greedy_into writes the ids into int64 pinned host memory (or on the logits' device)")
    count = out.numel()
    chunk = triton.cdiv(triton.cdiv(count, PARTS), BLOCK) * BLOCK
    best = torch.empty(PARTS, dtype=torch.float32, device=out.device)
    where = torch.empty(PARTS, dtype=torch.int32, device=out.device)
    parts[(PARTS,)](out.contiguous(), logits, best, where, count, CHUNK=chunk, BLOCK=BLOCK, num_warps=4)
    finish[(1,)](best, where, picked, host_ids, position, PARTS=PARTS, num_warps=4)

"""Decode-step attention split over the KV cache (flash-decoding), in Triton.

A decode step has one query per head. torch's SDPA kernels spread their work over (batch, heads,
query tiles): with the `rep` query heads of a KV head as one tile that is 8 thread blocks for a
Llama-3 model, each walking the whole cache alone. On an H200 a 405B step at 122k positions spent
~3 ms a layer in attention (2.3 tokens/s, the weights alone allow ~10).

Here each KV head's cache is cut into `splits` parts, one thread block each: it keeps the running
maximum, the sum of exponentials and the weighted sum of values of its part (scores in float32 from
bf16 products, the probabilities rounded to bf16 for the values' product, as flash attention does),
and a second small kernel combines the parts. Positions after the step's position (read from a
device tensor, so the launch can be captured in a CUDA graph) are masked.

    out = decode_attention(q, keys, values, position, span, scale)   # q [kv_heads, rep, head_dim]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BLOCK = 64           # cache positions per inner step
SPLITS = 64          # parts per KV head at long spans (a part has at least BLOCK positions)

_KERNELS: dict = {}


def _kernels():
    """The two Triton kernels, defined on first use (Triton is imported only on CUDA)."""
    if _KERNELS:
        return _KERNELS["part"], _KERNELS["combine"]
    import triton
    import triton.language as tl

    @triton.jit
    def part(q_ptr, k_ptr, v_ptr, position_ptr, out_ptr, max_ptr, sum_ptr, cache_stride, scale,
             REP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        head = tl.program_id(0)
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        position = tl.load(position_ptr)
        rows = tl.arange(0, ROWS)
        dims = tl.arange(0, DIM)
        q = tl.load(q_ptr + (head * REP + rows)[:, None] * DIM + dims[None, :], mask=(rows < REP)[:, None], other=0.0)
        best = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM], tl.float32)
        start = split * CHUNK
        for offset in range(0, CHUNK, BLOCK):
            positions = start + offset + tl.arange(0, BLOCK)
            visible = positions <= position
            at = head * cache_stride + positions[:, None] * DIM + dims[None, :]
            k = tl.load(k_ptr + at, mask=visible[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(visible[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)
            weights = tl.exp(scores - safe[:, None])
            shrink = tl.exp(best - safe)
            total = total * shrink + tl.sum(weights, 1)
            v = tl.load(v_ptr + at, mask=visible[:, None], other=0.0)
            acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v)
            best = new_best
        slot = head * splits + split
        tl.store(out_ptr + (slot * ROWS + rows)[:, None] * DIM + dims[None, :], acc)
        tl.store(max_ptr + slot * ROWS + rows, best)
        tl.store(sum_ptr + slot * ROWS + rows, total)

    @triton.jit
    def combine(out_ptr, max_ptr, sum_ptr, result_ptr, REP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr,
                SPLITS: tl.constexpr):
        head = tl.program_id(0)
        row = tl.program_id(1)
        parts = tl.arange(0, SPLITS)
        dims = tl.arange(0, DIM)
        slots = head * SPLITS + parts
        best = tl.load(max_ptr + slots * ROWS + row)
        overall = tl.max(best, 0)
        scale = tl.where(best == float("-inf"), 0.0, tl.exp(best - overall))
        total = tl.sum(tl.load(sum_ptr + slots * ROWS + row) * scale, 0)
        acc = tl.load(out_ptr + (slots * ROWS + row)[:, None] * DIM + dims[None, :])
        value = tl.sum(acc * scale[:, None], 0) / total
        tl.store(result_ptr + (head * REP + row) * DIM + dims, value.to(result_ptr.dtype.element_ty))

    _KERNELS.update(part=part, combine=combine)
    return part, combine


def attention_takes(head_dim: int) -> bool:
    """The kernels' head dims: a power of two (Triton's ranges) of 16 or more (its matrix products)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def splits_for(span: int) -> int:
    """Parts per KV head: SPLITS, fewer where a part would hold under BLOCK positions (a power of
    two, as the combine kernel's range needs)."""
    splits = SPLITS
    while splits > 1 and splits * BLOCK > span:
        splits //= 2
    return splits


def decode_attention(q: "torch.Tensor", keys: "torch.Tensor", values: "torch.Tensor", position: "torch.Tensor",
                     span: int, scale: float) -> "torch.Tensor":
    """Attention of one step's queries q [kv_heads, rep, head_dim] (query head g * rep + r reads
    KV head g) over the first `span` positions of keys and values [kv_heads, capacity, head_dim],
    those after `position` ([1] int64 on the device) masked; [kv_heads, rep, head_dim] in q's dtype."""
    import torch

    kv_heads, rep, dim = q.shape
    if keys.stride(2) != 1 or keys.stride(1) != dim or keys.stride() != values.stride() or not q.is_contiguous():
        raise ValueError("decode_attention takes a [kv_heads, capacity, head_dim] cache and contiguous queries")
    splits = splits_for(span)
    chunk = -(-span // (splits * BLOCK)) * BLOCK
    rows = max(16, 1 << (rep - 1).bit_length())     # a power of two, and tl.dot needs 16 rows at least
    out = torch.empty(kv_heads, splits, rows, dim, dtype=torch.float32, device=q.device)
    best = torch.empty(kv_heads, splits, rows, dtype=torch.float32, device=q.device)
    total = torch.empty(kv_heads, splits, rows, dtype=torch.float32, device=q.device)
    result = torch.empty_like(q)
    part, combine = _kernels()
    part[(kv_heads, splits)](q, keys, values, position, out, best, total, keys.stride(0), scale,
                             REP=rep, ROWS=rows, DIM=dim, BLOCK=BLOCK, CHUNK=chunk)
    combine[(kv_heads, rep)](out, best, total, result, REP=rep, ROWS=rows, DIM=dim, SPLITS=splits)
    return result

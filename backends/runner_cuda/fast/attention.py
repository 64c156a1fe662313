"""Decode-step attention split over the KV cache (flash-decoding), in Triton.

A decode step has one query per head. torch's SDPA kernels spread their work over (batch, heads,
query tiles): with the `rep` query heads of a KV head as one tile that is 8 thread blocks for a
Llama-3 model, each walking the whole cache alone. On an H200 a 405B step at 122k positions spent
~3 ms a layer in attention (2.3 tokens/s, the weights alone allow ~10).

Here each KV head's cache is cut into `splits` parts, one thread block each: it keeps the running
maximum, the sum of exponentials and the weighted sum of values of its part (scores in float32 from
bf16 products, the probabilities rounded to bf16 for the values' product, as flash attention does),
and a second small kernel combines the parts. Positions after the step's position (read from a
device tensor, so the launch can be captured in a CUDA graph) are masked. On Hopper and later both
launches overlap the kernel before them (compat.overlapping_launches).

A quantized cache (`--kv-bits 8|4`, static_cache.QuantizedLayer: codes, and a scale and a bias
per 64 values) is read as it is stored: each block of codes is dequantized in registers (code x
scale + bias in float32, rounded to the compute dtype: the values runner_cuda.kv_cache.dequantize
gives), so a step reads 1/2 (kv8) or 1/4 (kv4) of the bf16 cache's bytes and makes no copy of it.

    out = decode_attention(q, keys, values, position, span, scale)   # q [kv_heads, rep, head_dim]
    out = decode_attention(q, (k_codes, k_scales, k_biases), (v_codes, v_scales, v_biases),
                           position, span, scale, bits=8)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GROUP = 64           # values per scale and bias of a quantized cache (budget.KV_GROUP_SIZE)
# per cache (bits; None: the compute dtype's): cache positions per inner step, warps, software
# pipeline stages, and parts per KV head at long spans (a part has a block of positions at least).
# kv8/kv4: the fastest of a sweep on an H200 (bench/kv_decode_gpu.py --sweep, bench/RESULTS.md)
LAUNCH = {None: (64, 4, 3, 64), 8: (128, 4, 3, 64), 4: (128, 4, 3, 64)}


def attention_takes(head_dim: int) -> bool:
    """The kernels' head dims: a power of two (Triton's ranges) of 16 or more (its matrix products)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def splits_for(span: int, block: int, most: int) -> int:
    """Parts per KV head: `most`, fewer where a part would hold under `block` positions (a power
    of two, as the combine kernel's range needs)."""
    splits = most
    while splits > 1 and splits * block > span:
        splits //= 2
    return splits


def decode_attention(q: "torch.Tensor", keys, values, position: "torch.Tensor", span: int, scale: float,
                     bits: int | None = None) -> "torch.Tensor":
    """Attention of one step's queries q [kv_heads, rep, head_dim] (query head g * rep + r reads
    KV head g) over the first `span` positions of keys and values [kv_heads, capacity, head_dim]
    (with `bits`, each the codes, scales and biases of static_cache.QuantizedLayer), those after
    `position` ([1] int64 on the device) masked; [kv_heads, rep, head_dim] in q's dtype."""
    import torch

    kv_heads, rep, dim = q.shape
    if bits is None:
        codes = scales = biases = (keys, values)          # scales and biases not read
        shapes = {codes: dim}
    elif bits in (8, 4) and dim % GROUP == 0:
        codes, scales, biases = zip(keys, values)
        shapes = {codes: dim * bits // 8, scales: dim // GROUP, biases: dim // GROUP}
    else:
        raise ValueError(f"decode_attention reads 8- or 4-bit caches in groups of {GROUP}, not {bits} bits of {dim}")
    capacity = keys[0].shape[1] if bits else keys.shape[1]
    if not q.is_contiguous() or any(t.shape != (kv_heads, capacity, width) or not t.is_contiguous()
                                    or t.dtype != (torch.uint8 if bits and pair is codes else q.dtype)
                                    for pair, width in shapes.items() for t in pair):
        raise ValueError("decode_attention takes contiguous queries and caches as static_cache's layers hold them")
    block, warps, stages, most = LAUNCH[bits]
    splits = splits_for(span, block, most)
    chunk = -(-span // (splits * block)) * block
    rows = max(16, 1 << (rep - 1).bit_length())     # a power of two, and tl.dot needs 16 rows at least
    out = torch.empty(kv_heads, splits, rows, dim, dtype=torch.float32, device=q.device)
    best = torch.empty(kv_heads, splits, rows, dtype=torch.float32, device=q.device)
    total = torch.empty(kv_heads, splits, rows, dtype=torch.float32, device=q.device)
    result = torch.empty_like(q)
    from runner_cuda import compat
    from runner_cuda.fast.kv_kernels import combine, part

    pdl = compat.overlapping_launches(q.device)
    part[(kv_heads, splits)](q, *codes, scales[0], biases[0], scales[1], biases[1], position, out, best, total,
                             capacity, scale,
                             REP=rep, ROWS=rows, DIM=dim, BLOCK=block, CHUNK=chunk, BITS=bits or 16, GROUP=GROUP,
                             PDL=pdl, num_warps=warps, num_stages=stages, launch_pdl=pdl)
    combine[(kv_heads, rep)](out, best, total, result, REP=rep, ROWS=rows, DIM=dim, SPLITS=splits, PDL=pdl,
                             launch_pdl=pdl)
    return result

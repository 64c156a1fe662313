"""The Triton kernels of the fast decoder's KV cache, in a module of their own because it imports
Triton (attention.py and static_cache.py import it where a kernel runs): the split-KV decode
attention over a plain or quantized cache (attention.py says how it works), the quantized write
of one step's K and V (static_cache.QuantizedLayer.write_at), and RoPE on a step's q and k with
its k and v written into a plain cache, in one launch (`rope_and_write`, for the decoder).

A cache's strides come from its capacity (positions per head): Triton knows a power-of-two factor
of what it is given, so capacity x values per position keeps the loads of codes 16 bytes wide and
those of scales and biases one position's pair wide, whatever the capacity.
"""

import triton
import triton.language as tl

from runner_cuda import compat


@triton.jit
def wait_for_input(PDL: tl.constexpr):
    """With PDL (the launch overlaps the kernel before, as NF4Mma's do where
    compat.overlapping_launches): first let the kernel after this one start (an NF4Mma loads its
    weights, then waits for this kernel to finish; each of these kernels waits for the one before),
    then wait for the kernel before's output. So o's weights stream in while the attention runs."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def load_block(c_ptr, s_ptr, b_ptr, head, positions, visible, capacity,
               DIM: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr):
    """[BLOCK, DIM] values of the cache at `positions` of `head`, in the compute dtype (s_ptr's, or
    c_ptr's for a plain cache, BITS 16); zero where not visible. A quantized block is dequantized
    as runner_cuda.kv_cache.dequantize does: code x scale + bias in float32, then rounded."""
    if BITS == 16:
        dims = tl.arange(0, DIM)
        return tl.load(c_ptr + (head * capacity + positions)[:, None] * DIM + dims[None, :],
                       mask=visible[:, None], other=0.0)
    else:
        GROUPS: tl.constexpr = DIM // GROUP
        WIDTH: tl.constexpr = GROUP * BITS // 8          # bytes of one group's codes
        rows = head * capacity + positions
        groups = tl.arange(0, GROUPS)
        at = rows[:, None] * GROUPS + groups[None, :]                                   # [BLOCK, GROUPS]
        scales = tl.load(s_ptr + at, mask=visible[:, None], other=0.0).to(tl.float32)[:, :, None]
        biases = tl.load(b_ptr + at, mask=visible[:, None], other=0.0).to(tl.float32)[:, :, None]
        within = tl.arange(0, WIDTH)
        codes = tl.load(c_ptr + at[:, :, None] * WIDTH + within[None, None, :],
                        mask=visible[:, None, None], other=0)                         # [BLOCK, GROUPS, WIDTH]
        if BITS == 4:       # value 2j in the low nibble of byte j, 2j + 1 in the high one
            codes = tl.reshape(tl.join(codes & 15, codes >> 4), (codes.shape[0], GROUPS, GROUP))
        values = codes.to(tl.float32) * scales + biases
        return tl.reshape(values, (codes.shape[0], DIM)).to(s_ptr.dtype.element_ty)


@triton.jit
def part(q_ptr, k_ptr, v_ptr, ks_ptr, kb_ptr, vs_ptr, vb_ptr, position_ptr, out_ptr, max_ptr, sum_ptr, capacity, scale,
         REP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
         BITS: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr):
    """One part (CHUNK positions) of one KV head: its running maximum, sum of exponentials and
    weighted sum of values, for the combine kernel."""
    wait_for_input(PDL)
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
        k = load_block(k_ptr, ks_ptr, kb_ptr, head, positions, visible, capacity, DIM, BITS, GROUP)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(visible[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        safe = tl.where(new_best == float("-inf"), 0.0, new_best)
        weights = tl.exp(scores - safe[:, None])
        shrink = tl.exp(best - safe)
        total = total * shrink + tl.sum(weights, 1)
        v = load_block(v_ptr, vs_ptr, vb_ptr, head, positions, visible, capacity, DIM, BITS, GROUP)
        acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v)
        best = new_best
    slot = head * splits + split
    real = rows < REP           # the rows past REP (tl.dot's 16 at least) are not the combine's
    tl.store(out_ptr + (slot * ROWS + rows)[:, None] * DIM + dims[None, :], acc, mask=real[:, None])
    tl.store(max_ptr + slot * ROWS + rows, best, mask=real)
    tl.store(sum_ptr + slot * ROWS + rows, total, mask=real)


@triton.jit
def combine(out_ptr, max_ptr, sum_ptr, result_ptr, REP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr,
            SPLITS: tl.constexpr, PDL: tl.constexpr):
    """The parts of one query head's attention combined: its output row."""
    wait_for_input(PDL)
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


@triton.jit
def quantize_group(x_ptr, c_ptr, s_ptr, b_ptr, row, group, GROUPS: tl.constexpr, BITS: tl.constexpr,
                   GROUP: tl.constexpr):
    """One group of GROUP values of x (row `row` of [kv_heads, head_dim]) into cache row `row`
    (head x capacity + position) as runner_cuda.kv_cache.quantize does, to the bit: the scale
    (range / levels) and the bias (the minimum) rounded to the cache's dtype first, codes
    round-half-even of (x - bias) / scale, clamped. Divisions rounded as IEEE's (div_rn: Triton's
    `/` is approximate), and round-half-even by adding and taking away 2^23, exact for 0..2^23."""
    HALF: tl.constexpr = GROUP // 2
    LEVELS: tl.constexpr = 2**BITS - 1
    pairs = tl.arange(0, HALF)
    even = tl.load(x_ptr + group * GROUP + 2 * pairs).to(tl.float32)
    odd = tl.load(x_ptr + group * GROUP + 2 * pairs + 1).to(tl.float32)
    low = tl.minimum(tl.min(even, 0), tl.min(odd, 0))
    high = tl.maximum(tl.max(even, 0), tl.max(odd, 0))
    scale = tl.math.div_rn(high - low, LEVELS * 1.0).to(s_ptr.dtype.element_ty)
    bias = low.to(s_ptr.dtype.element_ty)
    step = tl.maximum(scale.to(tl.float32), 1.1754943508222875e-38)     # float32's smallest normal
    base = bias.to(tl.float32)
    even = tl.minimum(tl.maximum(tl.math.div_rn(even - base, step), 0.0), LEVELS * 1.0)
    odd = tl.minimum(tl.maximum(tl.math.div_rn(odd - base, step), 0.0), LEVELS * 1.0)
    even = ((even + 8388608.0) - 8388608.0).to(tl.uint8)
    odd = ((odd + 8388608.0) - 8388608.0).to(tl.uint8)
    tl.store(s_ptr + row * GROUPS + group, scale)
    tl.store(b_ptr + row * GROUPS + group, bias)
    if BITS == 8:
        tl.store(c_ptr + row * (GROUPS * GROUP) + group * GROUP + 2 * pairs, even)
        tl.store(c_ptr + row * (GROUPS * GROUP) + group * GROUP + 2 * pairs + 1, odd)
    else:
        tl.store(c_ptr + row * (GROUPS * HALF) + group * HALF + pairs, even | (odd << 4))


@triton.jit
def quantized_write(k_ptr, v_ptr, kc_ptr, ks_ptr, kb_ptr, vc_ptr, vs_ptr, vb_ptr, position_ptr, capacity,
                    GROUPS: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr):
    """One step's K (program_id(1) 0) or V (1) of one KV head's group, quantized into the cache
    at the step's position (read on the device: a graphed step writes where it is)."""
    head = tl.program_id(0) // GROUPS
    group = tl.program_id(0) % GROUPS
    row = head * capacity + tl.load(position_ptr)
    if tl.program_id(1) == 0:
        quantize_group(k_ptr + head * (GROUPS * GROUP), kc_ptr, ks_ptr, kb_ptr, row, group, GROUPS, BITS, GROUP)
    else:
        quantize_group(v_ptr + head * (GROUPS * GROUP), vc_ptr, vs_ptr, vb_ptr, row, group, GROUPS, BITS, GROUP)


@triton.jit
def round_bf16(x):
    """float32 x rounded to the nearest bf16 (ties to even), still float32. In integer operations:
    on the GPU the compiler dropped a float32 -> bf16 -> float32 round trip written with `.to()`."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def rotate(x_ptr, row, cos, sin, dims, DIM: tl.constexpr):
    """RoPE of one head's row as transformers' Llama applies it in bf16: x * cos and
    rotate_half(x) * sin each rounded to bf16, then their sum (float32 products and sum, as torch's
    bf16 operations compute and round them); float32 holding bf16 values, so the store's conversion
    is exact (the interpreter's truncates)."""
    HALF: tl.constexpr = DIM // 2
    x = tl.load(x_ptr + row * DIM + dims).to(tl.float32)
    partner = tl.load(x_ptr + row * DIM + (dims + HALF) % DIM).to(tl.float32)
    rotated = tl.where(dims < HALF, -partner, partner)
    return round_bf16(round_bf16(x * cos) + round_bf16(rotated * sin))


@triton.jit
def rope_write(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, keys_ptr, values_ptr, position_ptr, capacity,
               HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, PDL: tl.constexpr):
    """Program h < HEADS: query head h rotated into q_out; then each KV head's k rotated, and its v,
    into the cache at the step's position (read on the device: a graphed step writes where it is,
    with the RoPE tables' row there)."""
    wait_for_input(PDL)
    head = tl.program_id(0)
    position = tl.load(position_ptr)
    dims = tl.arange(0, DIM)
    cos = tl.load(cos_ptr + position * DIM + dims).to(tl.float32)
    sin = tl.load(sin_ptr + position * DIM + dims).to(tl.float32)
    if head < HEADS:
        tl.store(q_out_ptr + head * DIM + dims, rotate(q_ptr, head, cos, sin, dims, DIM))
    elif head < HEADS + KV_HEADS:
        kv = head - HEADS
        tl.store(keys_ptr + (kv * capacity + position) * DIM + dims, rotate(k_ptr, kv, cos, sin, dims, DIM))
    else:
        kv = head - HEADS - KV_HEADS
        tl.store(values_ptr + (kv * capacity + position) * DIM + dims, tl.load(v_ptr + kv * DIM + dims))


def rope_and_write(q, k, v, cos, sin, keys, values, position):
    """A decode step's bf16 q [heads * head_dim] rotated (returned, [heads, head_dim]), and its k
    rotated and v written into keys and values [kv_heads, capacity, head_dim] at `position` ([1] on
    the device), by the rows of the RoPE tables cos and sin [capacity, head_dim] there: what `_rope`
    on q and k and a PlainLayer's write_at do, in one launch. bf16 only: in float32 the GPU's
    compiler fuses x * cos + rotated * sin into one FMA, which eager torch rounds twice."""
    import torch

    if q.dtype != torch.bfloat16:
        raise ValueError(f"rope_and_write rounds as torch does in bf16, not {q.dtype}")
    kv_heads, capacity, dim = keys.shape
    if any(table.shape != (capacity, dim) or not table.is_contiguous() for table in (cos, sin)):
        raise ValueError(f"rope_and_write reads contiguous RoPE tables of [{capacity}, {dim}], not {tuple(cos.shape)}")
    heads = q.numel() // dim
    q_out = torch.empty(heads, dim, dtype=q.dtype, device=q.device)
    pdl = compat.overlapping_launches(q.device)
    rope_write[(heads + 2 * kv_heads,)](q.contiguous(), k.contiguous(), v.contiguous(), cos, sin, q_out, keys, values,
                                        position, capacity, HEADS=heads, KV_HEADS=kv_heads, DIM=dim, PDL=pdl,
                                        launch_pdl=pdl)
    return q_out

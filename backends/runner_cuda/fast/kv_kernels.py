"""The Triton kernels of the fast decoder's KV cache, in a module of their own because it imports
Triton (attention.py and static_cache.py import it where a kernel runs): the split-KV decode
attention over a plain or quantized cache (attention.py says how it works) and the quantized write
of one step's K and V (static_cache.QuantizedLayer.write_at).

A cache's strides come from its capacity (positions per head): Triton knows a power-of-two factor
of what it is given, so capacity x values per position keeps the loads of codes 16 bytes wide and
those of scales and biases one position's pair wide, whatever the capacity.
"""

import triton
import triton.language as tl


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
         BITS: tl.constexpr, GROUP: tl.constexpr):
    """One part (CHUNK positions) of one KV head: its running maximum, sum of exponentials and
    weighted sum of values, for the combine kernel."""
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
    tl.store(out_ptr + (slot * ROWS + rows)[:, None] * DIM + dims[None, :], acc)
    tl.store(max_ptr + slot * ROWS + rows, best)
    tl.store(sum_ptr + slot * ROWS + rows, total)


@triton.jit
def load_codes(c_ptr, cache_rows, visible, cols, DIM: tl.constexpr, BITS: tl.constexpr, dtype: tl.constexpr):
    """The codes of `cache_rows` as two [BLOCK, DIM / 2] halves, in `dtype` (exact: codes are
    integers to 255): kv8 the first and the second half of each row's values, kv4 its even values
    (low nibbles) and odd ones (high nibbles); zero where not visible."""
    HALF: tl.constexpr = DIM // 2
    if BITS == 8:
        at = c_ptr + cache_rows[:, None] * DIM + cols[None, :]
        first = tl.load(at, mask=visible[:, None], other=0)
        second = tl.load(at + HALF, mask=visible[:, None], other=0)
    else:
        packed = tl.load(c_ptr + cache_rows[:, None] * HALF + cols[None, :], mask=visible[:, None], other=0)
        first = packed & 15
        second = packed >> 4
    return first.to(dtype), second.to(dtype)


@triton.jit
def part_codes(q_ptr, k_ptr, v_ptr, ks_ptr, kb_ptr, vs_ptr, vb_ptr, position_ptr, out_ptr, max_ptr, sum_ptr, capacity,
               scale, REP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
               CHUNK: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr):
    """`part` over a quantized cache without dequantizing it: with x = code x scale + bias per
    group, q.k = sum over groups of scale x (q_g . codes_g) + bias x sum(q_g), and the weighted sum
    of values is, per group, (weights x scale) . codes + (weights . bias). The matrix products take
    the codes as they are (integers in the compute dtype) and the scales and biases apply to
    [rows, BLOCK] tiles, not to every value. A head's values are taken in two halves (load_codes),
    each with its own accumulator, stored back in place at the end."""
    GROUPS: tl.constexpr = DIM // GROUP
    HALF: tl.constexpr = DIM // 2
    dtype: tl.constexpr = q_ptr.dtype.element_ty
    head = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    position = tl.load(position_ptr)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, HALF)
    if BITS == 8:
        dims_first, dims_second = cols, cols + HALF
    else:
        dims_first, dims_second = 2 * cols, 2 * cols + 1
    group_first, group_second = dims_first // GROUP, dims_second // GROUP
    queries = q_ptr + (head * REP + rows)[:, None] * DIM
    q_first = tl.load(queries + dims_first[None, :], mask=(rows < REP)[:, None], other=0.0)
    q_second = tl.load(queries + dims_second[None, :], mask=(rows < REP)[:, None], other=0.0)
    best = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc_first = tl.zeros([ROWS, HALF], tl.float32)
    acc_second = tl.zeros([ROWS, HALF], tl.float32)
    start = split * CHUNK
    for offset in range(0, CHUNK, BLOCK):
        positions = start + offset + tl.arange(0, BLOCK)
        visible = positions <= position
        cache_rows = head * capacity + positions
        k_first, k_second = load_codes(k_ptr, cache_rows, visible, cols, DIM, BITS, dtype)
        scores = tl.zeros([ROWS, BLOCK], tl.float32)
        for g in tl.static_range(GROUPS):
            group_scale = tl.load(ks_ptr + cache_rows * GROUPS + g, mask=visible, other=0.0).to(tl.float32)
            group_bias = tl.load(kb_ptr + cache_rows * GROUPS + g, mask=visible, other=0.0).to(tl.float32)
            products = tl.zeros([ROWS, BLOCK], tl.float32)
            q_sum = tl.zeros([ROWS], tl.float32)
            # kv8's halves hold whole groups (but for one group of 64): a group is in one half
            if BITS == 4 or GROUPS == 1 or g < GROUPS // 2:
                q_g = tl.where((group_first == g)[None, :], q_first, 0.0).to(dtype)
                products = tl.dot(q_g, tl.trans(k_first), products)
                q_sum += tl.sum(q_g.to(tl.float32), 1)
            if BITS == 4 or GROUPS == 1 or g >= GROUPS // 2:
                q_g = tl.where((group_second == g)[None, :], q_second, 0.0).to(dtype)
                products = tl.dot(q_g, tl.trans(k_second), products)
                q_sum += tl.sum(q_g.to(tl.float32), 1)
            scores += products * group_scale[None, :] + q_sum[:, None] * group_bias[None, :]
        scores = tl.where(visible[None, :], scores * scale, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        safe = tl.where(new_best == float("-inf"), 0.0, new_best)
        weights = tl.exp(scores - safe[:, None])
        shrink = tl.exp(best - safe)
        total = total * shrink + tl.sum(weights, 1)
        v_first, v_second = load_codes(v_ptr, cache_rows, visible, cols, DIM, BITS, dtype)
        acc_first = acc_first * shrink[:, None]
        acc_second = acc_second * shrink[:, None]
        for g in tl.static_range(GROUPS):
            group_scale = tl.load(vs_ptr + cache_rows * GROUPS + g, mask=visible, other=0.0).to(tl.float32)
            group_bias = tl.load(vb_ptr + cache_rows * GROUPS + g, mask=visible, other=0.0).to(tl.float32)
            scaled = (weights * group_scale[None, :]).to(dtype)
            shift = tl.sum(weights * group_bias[None, :], 1)[:, None]
            if BITS == 4 or GROUPS == 1 or g < GROUPS // 2:
                acc_first += tl.where((group_first == g)[None, :], tl.dot(scaled, v_first) + shift, 0.0)
            if BITS == 4 or GROUPS == 1 or g >= GROUPS // 2:
                acc_second += tl.where((group_second == g)[None, :], tl.dot(scaled, v_second) + shift, 0.0)
        best = new_best
    slot = head * splits + split
    out = out_ptr + (slot * ROWS + rows)[:, None] * DIM
    tl.store(out + dims_first[None, :], acc_first)
    tl.store(out + dims_second[None, :], acc_second)
    tl.store(max_ptr + slot * ROWS + rows, best)
    tl.store(sum_ptr + slot * ROWS + rows, total)


@triton.jit
def combine(out_ptr, max_ptr, sum_ptr, result_ptr, REP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr,
            SPLITS: tl.constexpr):
    """The parts of one query head's attention combined: its output row."""
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

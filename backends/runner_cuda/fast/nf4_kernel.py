"""The Triton kernel behind `nf4.nf4_gemv` (imported only on use: it imports triton): up to three NF4 weights that read the same input
(q/k/v, gate/up): one launch, each program computing BLOCK_N outputs of one weight.

A program walks K in chunks of BLOCK_K elements. The packed weight is read as int32 words
(8 weights each; byte m of a word holds weight 2m in its high nibble, 2m + 1 in its low one),
laid out [BLOCK_N, quant blocks in the chunk, words per quant block], so each quant block's
64 products are summed before its one scale is applied. A weight's NF4 value is a load from
the 16-entry code table (64 bytes: one cache line for the whole warp).

ROUND_BNB False ("exact"): float32 codes and products, the scale applied per quant block.
ROUND_BNB True ("bnb"): bitsandbytes' own batch-1 kernel (gemm_4bit_simt) reproduced: the
codes as bf16, the scale rounded to bf16, each weight (code × scale) and each product
(x × weight) rounded to bf16, summed in float32."""

import triton
import triton.language as tl


@triton.jit
def rows_of_one_weight(
    x_ptr, code_ptr, words_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, bias_ptr,
    out_ptr, tile, N,
    K: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_BNB: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)                       # [BN]
    row_ok = rows < N
    BLOCKS: tl.constexpr = BLOCK_K // BLOCKSIZE                         # quant blocks per chunk
    WORDS: tl.constexpr = BLOCKSIZE // 8                                # int32 words per quant block
    b = tl.arange(0, BLOCKS)
    j = tl.arange(0, WORDS)
    row_word = rows.to(tl.int64) * (K // 8)                             # first word of each row
    x_at = b[:, None] * BLOCKSIZE + j[None, :] * 8                      # [NB, W]: each word's first x
    acc = tl.zeros([BLOCK_N, BLOCKS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        word = tl.load(words_ptr + row_word[:, None, None] + k0 // 8 + b[None, :, None] * WORDS + j[None, None, :],
                       mask=row_ok[:, None, None], other=0, eviction_policy="evict_first")   # [BN, NB, W]
        block = row_word[:, None] * 8 // BLOCKSIZE + k0 // BLOCKSIZE + b[None, :]              # [BN, NB]
        if NESTED:
            a8 = tl.load(absmax_ptr + block, mask=row_ok[:, None], other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + a8) * tl.load(
                nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=row_ok[:, None], other=0.0
            ) + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=row_ok[:, None], other=0.0)
        if ROUND_BNB:
            s = scale.to(tl.bfloat16).to(tl.float32)[:, :, None]
        part = tl.zeros([BLOCK_N, BLOCKS, WORDS], dtype=tl.float32)
        for m in tl.static_range(8):                                    # weight m of each word
            shift = (m // 2) * 8 + (1 - m % 2) * 4                        # high nibble first
            w = tl.load(code_ptr + ((word >> shift) & 15))
            xv = tl.load(x_ptr + k0 + x_at + m).to(tl.float32)[None, :, :]
            if ROUND_BNB:
                w = (w * s).to(tl.bfloat16).to(tl.float32)
                part += (w * xv).to(tl.bfloat16).to(tl.float32)
            else:
                part += w * xv
        if ROUND_BNB:
            acc += tl.sum(part, axis=2)
        else:
            acc += tl.sum(part, axis=2) * scale
    total = tl.sum(acc, axis=1)
    if HAS_BIAS:
        total += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)

@triton.jit
def nf4_gemv_kernel(
    x_ptr, code_ptr, out_ptr,
    w0, a0, nc0, na0, o0, bias0, N0,
    w1, a1, nc1, na1, o1, bias1, N1,
    w2, a2, nc2, na2, o2, bias2, N2,
    K: tl.constexpr, WEIGHTS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROUND_BNB: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles0 = tl.cdiv(N0, BLOCK_N)
    tiles1 = tl.cdiv(N1, BLOCK_N)
    if pid < tiles0:
        rows_of_one_weight(x_ptr, code_ptr, w0, a0, nc0, na0, o0, bias0, out_ptr, pid, N0,
                           K, NESTED, HAS_BIAS, ROUND_BNB, BLOCKSIZE, NESTED_BLOCKSIZE, BLOCK_N, BLOCK_K)
    elif WEIGHTS == 2:
        rows_of_one_weight(x_ptr, code_ptr, w1, a1, nc1, na1, o1, bias1, out_ptr + N0, pid - tiles0, N1,
                           K, NESTED, HAS_BIAS, ROUND_BNB, BLOCKSIZE, NESTED_BLOCKSIZE, BLOCK_N, BLOCK_K)
    elif WEIGHTS == 3:
        if pid < tiles0 + tiles1:
            rows_of_one_weight(x_ptr, code_ptr, w1, a1, nc1, na1, o1, bias1, out_ptr + N0, pid - tiles0, N1,
                               K, NESTED, HAS_BIAS, ROUND_BNB, BLOCKSIZE, NESTED_BLOCKSIZE, BLOCK_N, BLOCK_K)
        else:
            rows_of_one_weight(x_ptr, code_ptr, w2, a2, nc2, na2, o2, bias2, out_ptr + N0 + N1,
                               pid - tiles0 - tiles1, N2,
                               K, NESTED, HAS_BIAS, ROUND_BNB, BLOCKSIZE, NESTED_BLOCKSIZE, BLOCK_N, BLOCK_K)

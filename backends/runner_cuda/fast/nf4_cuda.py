"""Batch-1 NF4 GEMVs in CUDA C++, compiled at run time by NVRTC (which ships with torch's CUDA
wheels: no compiler needed on the user's machine; `runner_cuda.compat`). Both read
bitsandbytes' packed weights and double-quant state as they are (see `nf4.py` for the layout).

`NF4Mma` (the default) runs on the tensor cores: a warp computes a tile of 16 rows with
`mma.sync m16n8k16` (bf16 inputs, float32 sums), several warps splitting K. Each byte of packed
weights (two weights) becomes a bf16 pair by one shared-memory load from a 256-entry table that
every lane has its own copy of (no bank conflicts): about one instruction per weight where a
lookup per nibble and a float32 FMA per weight took four, and on an H200 the SIMT kernel was
issue-bound, not memory-bound. Each lane's 32 weights lie in one 64-weight quant block and the
B operand puts the two blocks of a k16 step in two columns, so the float32 scale multiplies the
block's sum. It can also do the work around the GEMV that would be kernels of their own: the
RMSNorm of its input (`norm`), the residual add of its output (`residual`), and SiLU(gate) × up
(`glu`, the tile's rows 0-7 from gate_proj and 8-15 from up_proj).

    qkv = NF4Mma.for_weights([q, k, v], norm=input_layernorm.weight, eps=eps)   # None where it does not apply
    y = qkv(hidden)                                    # RMSNorm(hidden) @ [q; k; v].T, bf16 [1, sum of outputs]
    NF4Mma.for_weights([o], residual=True)(attention, out=hidden)      # hidden += attention @ o.T

The NF4 values are rounded to bf16 (as bitsandbytes' own kernels and its dequantize do); products
and sums are float32 and the scale is float32: within bf16 rounding of the float32 reference.

`NF4Gemv` is the SIMT kernel, for weights NF4Mma does not take (out_features not a multiple of 16,
in_features not of 128) and for rounding as bitsandbytes does. One warp computes ROWS outputs:
each lane takes 32 consecutive weights of a row at a time (one 16-byte load per row; 32 weights
lie inside one 64-weight quant block), the matching 32 inputs (64 bytes, shared by the warp's ROWS
rows), looks each nibble up in the 16-entry NF4 table held in shared memory (conflict-free: 16
words in 16 banks), sums the 32 products in float32, scales the sum once, and the warp reduces
with shuffles. Up to three weights that read the same input (q/k/v, gate/up) run in one launch,
their outputs side by side.

    kernel = NF4Gemv.for_weights([q, k, v])       # None where it does not apply (then bitsandbytes)
    y = kernel(x)                                  # bf16 [1, sum of outputs]

Its products and sums are float32 with the scale applied per 32 weights: within bf16 rounding of
the float32 reference, closer to it than bitsandbytes' own kernel (which rounds each product to
bf16). With rounding="bitsandbytes" it rounds as that kernel does, and its outputs were
bit-identical to bitsandbytes' on every Llama-8B shape measured (bench/RESULTS.md), at some of the speed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from runner_cuda import compat
from runner_cuda.fast.nf4 import NF4Weight

if TYPE_CHECKING:
    import torch

SOURCE = r"""
// ROWS: outputs per warp; BLOCKSIZE, NESTED_BLOCKSIZE: bitsandbytes' quant block sizes (compile-time,
// so block indices are shifts, not 64-bit divisions); NESTED: double quantization; BNB_ROUNDING:
// round as bitsandbytes' kernel does (else float32 products, the scale applied per 32 weights)
__device__ __forceinline__ float bf16_to_float(unsigned int bits) { return __uint_as_float(bits << 16); }

__device__ __forceinline__ unsigned short float_to_bf16(float value) {
    unsigned int bits = __float_as_uint(value);
    bits += 0x7FFFu + ((bits >> 16) & 1u);                      // round to nearest even
    return (unsigned short)(bits >> 16);
}

__device__ __forceinline__ float scale_of(const void* absmax, const float* ncode, const float* nabs, float shift,
                                          unsigned int block) {
#if NESTED
    return ncode[((const unsigned char*)absmax)[block]] * nabs[block / NESTED_BLOCKSIZE] + shift;
#else
    return ((const float*)absmax)[block];
#endif
}

// sum over 32 weights (one 16-byte word group) times their inputs (4 x 16 bytes of bf16)
__device__ __forceinline__ float dot32(const float* table, uint4 w, const uint4* xs) {
    const unsigned int ws[4] = {w.x, w.y, w.z, w.w};
    float sum = 0.0f;
    #pragma unroll
    for (int h = 0; h < 4; ++h) {
        const unsigned int xw[4] = {xs[h].x, xs[h].y, xs[h].z, xs[h].w};
        #pragma unroll
        for (int b = 0; b < 4; ++b) {
            const unsigned int byte = (ws[h] >> (8 * b)) & 0xFFu;      // weight 2i high nibble, 2i+1 low
            const unsigned int pair = xw[b];                             // inputs 2i (low half), 2i+1
            sum = fmaf(table[byte >> 4], __uint_as_float(pair << 16), sum);
            sum = fmaf(table[byte & 15u], __uint_as_float(pair & 0xFFFF0000u), sum);
        }
    }
    return sum;
}

// bitsandbytes' batch-1 kernel's rounding: the scale rounded to bf16, each weight (code x scale)
// and each product (input x weight) rounded to bf16, two at a time (fma.rn.bf16x2 with a -0 addend
// is one rounding of the product, as bitsandbytes' bf16 multiplies), summed in float32
__device__ __forceinline__ unsigned int mul_bf16x2(unsigned int a, unsigned int b) {
    unsigned int d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}

__device__ __forceinline__ float sum32_rounded(const unsigned int* bits, uint4 w, const uint4* xs, float scale) {
    unsigned int s = float_to_bf16(scale);
    s |= s << 16;
    const unsigned int ws[4] = {w.x, w.y, w.z, w.w};
    float sum = 0.0f;
    #pragma unroll
    for (int h = 0; h < 4; ++h) {
        const unsigned int xw[4] = {xs[h].x, xs[h].y, xs[h].z, xs[h].w};
        #pragma unroll
        for (int b = 0; b < 4; ++b) {
            const unsigned int byte = (ws[h] >> (8 * b)) & 0xFFu;
            const unsigned int weights = bits[byte >> 4] | (bits[byte & 15u] << 16);   // weight 2i low, 2i+1 high
            const unsigned int products = mul_bf16x2(mul_bf16x2(weights, s), xw[b]);
            sum += __uint_as_float(products << 16);
            sum += __uint_as_float(products & 0xFFFF0000u);
        }
    }
    return sum;
}

#if BNB_ROUNDING
#define ADD_CHUNK(acc, w, xs, scale) acc += sum32_rounded(bits, w, xs, scale)
#else
#define ADD_CHUNK(acc, w, xs, scale) acc = fmaf(dot32(table, w, xs), scale, acc)
#endif

extern "C" __global__ void nf4_gemv(
    const unsigned short* __restrict__ x, const float* __restrict__ code, unsigned short* __restrict__ out,
    const uint4* p0, const void* a0, const float* nc0, const float* na0, const float* o0, const unsigned short* b0, int n0,
    const uint4* p1, const void* a1, const float* nc1, const float* na1, const float* o1, const unsigned short* b1, int n1,
    const uint4* p2, const void* a2, const float* nc2, const float* na2, const float* o2, const unsigned short* b2, int n2,
    int K, int has_bias)
{
#if BNB_ROUNDING
    __shared__ unsigned int bits[16];                                    // the NF4 values' bf16 bits
    if (threadIdx.x < 16) bits[threadIdx.x] = __float_as_uint(code[threadIdx.x]) >> 16;
#else
    __shared__ float table[16];                                          // the NF4 values
    if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
#endif
    __syncthreads();

    const int lane = threadIdx.x & 31;
    int row = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * ROWS;   // over all weights
    const int out_row = row;
    const uint4* packed; const void* absmax; const float* ncode; const float* nabs; const float* offset;
    const unsigned short* bias;
    if (row < n0) {
        packed = p0; absmax = a0; ncode = nc0; nabs = na0; offset = o0; bias = b0;
    } else if (row < n0 + n1) {
        row -= n0; packed = p1; absmax = a1; ncode = nc1; nabs = na1; offset = o1; bias = b1;
    } else if (row < n0 + n1 + n2) {
        row -= n0 + n1; packed = p2; absmax = a2; ncode = nc2; nabs = na2; offset = o2; bias = b2;
    } else {
        return;                                                          // past the last row
    }
    const float shift = NESTED ? offset[0] : 0.0f;
    const unsigned int chunks = K >> 5;                                  // 32 weights a chunk
    const uint4* rows_packed = packed + (size_t)row * chunks;
    const unsigned int first_block = (unsigned int)(((size_t)row * K) / BLOCKSIZE);
    const unsigned int blocks_per_row = K / BLOCKSIZE;
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    float acc[ROWS];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;

    unsigned int c = lane;
    for (; c + 32 < chunks; c += 64) {                     // two chunks a lane: all loads first
        uint4 w0[ROWS], w1[ROWS];
        float s0[ROWS], s1[ROWS];
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            w0[r] = __ldcs(rows_packed + r * chunks + c);               // streamed: read once
            w1[r] = __ldcs(rows_packed + r * chunks + c + 32);
            s0[r] = scale_of(absmax, ncode, nabs, shift, first_block + r * blocks_per_row + (c * 32) / BLOCKSIZE);
            s1[r] = scale_of(absmax, ncode, nabs, shift, first_block + r * blocks_per_row + ((c + 32) * 32) / BLOCKSIZE);
        }
        uint4 x0[4], x1[4];
        #pragma unroll
        for (int q = 0; q < 4; ++q) { x0[q] = xv[c * 4 + q]; x1[q] = xv[(c + 32) * 4 + q]; }
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            ADD_CHUNK(acc[r], w0[r], x0, s0[r]);
            ADD_CHUNK(acc[r], w1[r], x1, s1[r]);
        }
    }
    if (c < chunks) {                                      // an odd chunk left
        uint4 x0[4];
        #pragma unroll
        for (int q = 0; q < 4; ++q) x0[q] = xv[c * 4 + q];
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const uint4 w0 = __ldcs(rows_packed + r * chunks + c);
            const float s0 = scale_of(absmax, ncode, nabs, shift, first_block + r * blocks_per_row + (c * 32) / BLOCKSIZE);
            ADD_CHUNK(acc[r], w0, x0, s0);
        }
    }
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        float v = acc[r];
        #pragma unroll
        for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, m);
        if (lane == 0) {
            if (has_bias) v += bf16_to_float(bias[row + r]);
            out[out_row + r] = float_to_bf16(v);
        }
    }
}
"""

MMA_SOURCE = r"""
// Batch-1 NF4 GEMV on the tensor cores (mma.sync m16n8k16, bf16 in, float32 accumulate).
// Compile-time: K (input features), BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, WARPS (per block), SPLIT (warps
// sharing one 16-row tile, each over a slice of K), GLU (tile rows g: gate, g + 8: up of the same output;
// writes silu(gate) * up), NORM (the input is RMSNorm(x) * norm weight, computed in the prologue),
// RESIDUAL (out = out + result: the residual stream updated in place), L2_HINT (each weight load also
// brings the rest of its 256 bytes of the row into L2: the warp's next three steps), CHUNKED_SCALES
// (nested 64-weight blocks, K a multiple of 512: a lane loads its row's 8 code bytes of 4 steps at once),
// OVERLAP (Hopper: launched to start while the kernel before it finishes; the weights, scales and table
// are loaded before waiting for that kernel, the input after), AHEAD (1, 2, 4 or 8: the steps whose loads a
// warp keeps in flight; its first AHEAD are loaded before the wait, so a short launch's weights, all of them
// with AHEAD = its steps, stream in while the kernel before runs), STAGED (the steps in flight are copied into
// shared memory by cp.async, a ring of SLOTS > AHEAD steps a warp, instead of into registers: more bytes in
// flight for no registers; with SLOTS a power of two the unrolled loop's slots are constants), WIDE_TABLE (the
// lookup table's entries 256 bytes apart, 64 KB: one PRMT makes a lookup's address), ROPE (q, k, v of
// heads of ROPE_DIM: a q or k tile's rows g and g + 8 are rows j and j + ROPE_DIM / 2 of one head, RoPE's
// pairs, so the tile rotates them at the step's position (transformers' bf16 rounding) and writes q in
// its order, k and v into the KV cache at that position: the step's RoPE launch done here), X_SHARED (no
// NORM: the input copied into shared memory after the wait, so that each step reads it from there, not L1).
#define NIT (K / 128)
#define TILES (WARPS / SPLIT)
#define STEPS ((NIT + SPLIT - 1) / SPLIT)        // a warp's steps (one fewer for some where SPLIT does not divide NIT)
#define EVEN (NIT % SPLIT == 0)
static_assert(8 % AHEAD == 0, "the loop, unrolled by 8, keeps its steps in flight in registers");
static_assert(!(ROPE && GLU), "RoPE's pairs are q's and k's rows");
#if ROPE
#define ROPE_PARAMS , const unsigned short* __restrict__ rope_cos, const unsigned short* __restrict__ rope_sin, \
    const long long* __restrict__ position, unsigned short* __restrict__ keys, unsigned short* __restrict__ values, int capacity
#else
#define ROPE_PARAMS
#endif
static_assert(!STAGED || SLOTS > AHEAD, "a slot is refilled only after the step it held was read");
#define RING_BYTES (STAGED ? WARPS * SLOTS * 1024 : 0)
#define TABLE_BYTES (WIDE_TABLE ? 65536 : 32768)

__device__ __forceinline__ float bf16_to_float(unsigned int bits) { return __uint_as_float(bits << 16); }

__device__ __forceinline__ unsigned int float_to_bf16(float value) {
    unsigned short bits;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(value));
    return bits;
}

__device__ __forceinline__ unsigned int mul_bf16x2(unsigned int a, unsigned int b) {
    unsigned int d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}

__device__ __forceinline__ void mma(float* c, unsigned int a0, unsigned int a1, unsigned int a2, unsigned int a3,
                                    unsigned int b0, unsigned int b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned int word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

extern __shared__ __align__(16) unsigned char smem[];      // the table first

// one bf16 pair (the two weights of one packed byte) from the lane's own copy of the 256-entry table at the
// start of shared memory: the byte (one PRMT), times 128 plus the lane's column (one IMAD), one load;
// WIDE_TABLE: the byte times 256 plus the lane's column in one PRMT (lane4 < 256 fills the low byte)
__device__ __forceinline__ unsigned int lut(unsigned int lane4, unsigned int w, int b) {
#if WIDE_TABLE
    return *(const unsigned int*)(smem + __byte_perm(w, lane4, 0x5504 + (b << 4)));
#else
    return *(const unsigned int*)(smem + lane4 + (__byte_perm(w, 0, 0x4440 + b) << 7));
#endif
}

struct Rows {                    // one A-fragment row of the tile: its weight, and where its blocks start
    const uint4* packed;         // the row's first 16 bytes
    const void* absmax;
    const float* ncode;
    const float* nabs;
    float shift;
    unsigned long long block0;   // index of the row's first quant block
};

__device__ __forceinline__ Rows rows_of(int row, const uint4* p, const void* a, const float* nc, const float* na, const float* o) {
    Rows r;
    r.packed = p + (size_t)row * (K / 32);
    r.absmax = a; r.ncode = nc; r.nabs = na;
    r.shift = NESTED ? o[0] : 0.0f;
    r.block0 = (unsigned long long)row * (K / BLOCKSIZE);
    return r;
}

struct Step {                    // one step's loads: 32 weights of rows g and g + 8, the lane's scale
    uint4 wa, wb;
    unsigned int code;
    float scale;
};

struct Scales {                  // where the lane's scales are: row g (t < 2) or g + 8, first or second block of 128
    const void* absmax;
    const float* nabs;
    unsigned long long block0;   // the lane's first block; with CHUNKED_SCALES its row's (a Chunk holds both)
};

__device__ __forceinline__ uint4 load_weights(const uint4* address) {
#if L2_HINT
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(address));
    return v;
#else
    return __ldcs(address);
#endif
}

// STAGED: one 16-byte copy from global to shared memory, not through registers
__device__ __forceinline__ void copy_async(uint4* destination, const uint4* source) {
    const unsigned int to = (unsigned int)__cvta_generic_to_shared(destination);
#if L2_HINT
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" :: "r"(to), "l"(source) : "memory");
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(to), "l"(source) : "memory");
#endif
}

// STAGED: the lane's two 16-byte words (rows g and g + 8) of one slot of its warp's ring
__device__ __forceinline__ uint4* slot_of(uint4* ring, int warp, int slot, int lane) {
    return ring + ((warp * SLOTS + slot) * 2) * 32 + lane;
}

__device__ __forceinline__ Step load_step(const Rows& ra, const Rows& rb, const Scales& sc, int t, int it, uint4* slot) {
    Step s;
#if STAGED
    copy_async(slot, ra.packed + it * 4 + t);
    copy_async(slot + 32, rb.packed + it * 4 + t);
#else
    s.wa = load_weights(ra.packed + it * 4 + t);
    s.wb = load_weights(rb.packed + it * 4 + t);
#endif
#if CHUNKED_SCALES
    s.code = 0; s.scale = 0.0f;                                      // from the lane's Chunk instead
#elif NESTED
    const unsigned long long block = sc.block0 + (it * 128u) / BLOCKSIZE;
    s.code = __ldg((const unsigned char*)sc.absmax + block);
    s.scale = __ldg(sc.nabs + block / NESTED_BLOCKSIZE);
#else
    s.code = 0;
    s.scale = __ldg((const float*)sc.absmax + sc.block0 + (it * 128u) / BLOCKSIZE);
#endif
    return s;
}

// the quant-block codes of the lane's row for the 4 steps from (it & ~3): 8 bytes, one aligned load where one
// byte a step took 16 scattered rows' lines a step; the 8 blocks lie in one nested block of 256, so one scale
// (CHUNKED_SCALES only)
struct Chunk {
    unsigned long long codes;
    float nabs;
};

__device__ __forceinline__ Chunk load_chunk(const Scales& sc, int it) {
    const unsigned long long block = sc.block0 + 2u * (unsigned int)(it & ~3);
    Chunk c;
    c.codes = __ldg((const unsigned long long*)((const unsigned char*)sc.absmax + block));
    c.nabs = __ldg(sc.nabs + block / NESTED_BLOCKSIZE);
    return c;
}

// the float32 scale of the lane's quant block in step `it`
__device__ __forceinline__ float step_scale(const Step& now, const Chunk& chunk, int it, int t, const float* ncode,
                                            float shift) {
#if CHUNKED_SCALES
    const unsigned int code = (unsigned int)(chunk.codes >> (8 * (2 * (it & 3) + (t & 1)))) & 0xFFu;
    return __ldg(ncode + code) * chunk.nabs + shift;
#elif NESTED
    return __ldg(ncode + now.code) * now.scale + shift;
#else
    return now.scale;
#endif
}

// one step: the tile's 16 rows times 128 inputs on the tensor cores; row g's sum into acc_a, row g + 8's into
// acc_b, each block's sum times its scale. B operand: column 0 holds the inputs of lanes t = 0, 1 (one quant
// block), column 1 those of t = 2, 3 (the next block); the lanes that hold other columns (`data` false)
// load nothing and keep the zeros `xq` starts with
__device__ __forceinline__ void accumulate(const Step& now, float scale, const uint4* xin, int it, int t, bool data,
                                           unsigned int lane4, uint4 (&xq)[4], float& acc_a, float& acc_b) {
    const uint4 wa = now.wa, wb = now.wb;                                // 32 weights of rows g and g + 8
    if (data) {                            // 8 lanes load (a quarter of the loads' shared-memory or L1 wavefronts)
        #pragma unroll
        for (int q = 0; q < 4; ++q) xq[q] = xin[(it * 4 + t) * 4 + q];
    }
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    #pragma unroll
    for (int s = 0; s < 8; ++s) {          // k16 step s: bytes 2s, 2s + 1 of each lane's 16
        const unsigned int wA = word_of(wa, s >> 1), wB = word_of(wb, s >> 1);
        const int p = (s & 1) * 2;
        const unsigned int xa = (s & 1) ? xq[s >> 1].z : xq[s >> 1].x;
        const unsigned int xb = (s & 1) ? xq[s >> 1].w : xq[s >> 1].y;
        mma((s & 1) ? d : c, lut(lane4, wA, p), lut(lane4, wB, p), lut(lane4, wA, p + 1), lut(lane4, wB, p + 1), xa, xb);
    }
    const float s1 = __shfl_down_sync(0xFFFFFFFFu, scale, 1);
    const float s2 = __shfl_down_sync(0xFFFFFFFFu, scale, 2);
    const float s3 = __shfl_down_sync(0xFFFFFFFFu, scale, 3);
    acc_a = fmaf(c[0] + d[0], scale, fmaf(c[1] + d[1], s1, acc_a));
    acc_b = fmaf(c[2] + d[2], s2, fmaf(c[3] + d[3], s3, acc_b));
}

#if ROPE
// One output of a ROPE tile (tile row r of `local`, output row `row`, its sum v before the bias): q and k
// rotated as transformers' Llama does in bf16 (x * cos and rotate_half(x) * sin each rounded, then their
// sum; the products and sum unfused), q into `out` in its order, k and v into the cache at the position.
__device__ __forceinline__ void rope_store(float v, const float* partial, int local, int r, int row, int n0, int n1,
                                           int has_bias, const unsigned short* b0, const unsigned short* b1,
                                           const unsigned short* b2, unsigned short* out, const unsigned short* rope_cos,
                                           const unsigned short* rope_sin, const long long* position,
                                           unsigned short* keys, unsigned short* values, int capacity) {
    const long long at = *position;
    if (row >= n0 + n1) {                                                // v: as it is, into the cache
        const int local_row = row - n0 - n1, head = local_row / ROPE_DIM;
        if (has_bias) v += bf16_to_float(b2[local_row]);
        values[((long long)head * capacity + at) * ROPE_DIM + local_row % ROPE_DIM] = float_to_bf16(v);
        return;
    }
    const bool is_k = row >= n0;
    const int base = (is_k ? row - n0 : row) - r;                        // the tile's first row in q or k
    const int head = base / ROPE_DIM, d = (base % ROPE_DIM) / 2 + (r & 7) + (r < 8 ? 0 : ROPE_DIM / 2);
    float w = 0.0f;                                                      // its pair's sum: the tile's other half
    #pragma unroll
    for (int s = 0; s < SPLIT; ++s) w += partial[(local * SPLIT + s) * 16 + (r ^ 8)];
    if (has_bias) {
        const unsigned short* bias = is_k ? b1 : b0;
        const int pair = d < ROPE_DIM / 2 ? d + ROPE_DIM / 2 : d - ROPE_DIM / 2;
        v += bf16_to_float(bias[head * ROPE_DIM + d]);
        w += bf16_to_float(bias[head * ROPE_DIM + pair]);
    }
    const float x = bf16_to_float(float_to_bf16(v)), partner = bf16_to_float(float_to_bf16(w));
    const float rotated = d < ROPE_DIM / 2 ? -partner : partner;
    const float c = bf16_to_float(rope_cos[at * ROPE_DIM + d]), s = bf16_to_float(rope_sin[at * ROPE_DIM + d]);
    const unsigned int value = float_to_bf16(bf16_to_float(float_to_bf16(__fmul_rn(x, c)))
                                             + bf16_to_float(float_to_bf16(__fmul_rn(rotated, s))));
    if (is_k) keys[((long long)head * capacity + at) * ROPE_DIM + d] = value;
    else out[head * ROPE_DIM + d] = value;
}
#endif

extern "C" __global__ void __launch_bounds__(WARPS * 32) nf4_mma(
    const unsigned int* __restrict__ pairs, const uint4* __restrict__ x, unsigned short* __restrict__ out, const uint4* __restrict__ norm_weight, double eps,
    const uint4* p0, const void* a0, const float* nc0, const float* na0, const float* o0, const unsigned short* b0, int n0,
    const uint4* p1, const void* a1, const float* nc1, const float* na1, const float* o1, const unsigned short* b1, int n1,
    const uint4* p2, const void* a2, const float* nc2, const float* na2, const float* o2, const unsigned short* b2, int n2,
    int has_bias ROPE_PARAMS)
{
    unsigned char* table_bytes = smem;      // [256][32] words: entry e, lane l at e*128 + l*4 (WIDE_TABLE: e*256 + l*4)
    uint4* ring = (uint4*)(smem + TABLE_BYTES);                       // STAGED: [WARPS][SLOTS][2][32] 16-byte words
    float* partial = (float*)(smem + TABLE_BYTES + RING_BYTES);       // [WARPS][16]
#if NORM || X_SHARED
    float* reduce = partial + WARPS * 16;                             // [WARPS]
    uint4* xs = (uint4*)(reduce + 32);                                // [K / 8] the (normalized) input
#endif
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const unsigned int lane4 = lane * 4;

    // this warp's tile and slice of K, and its first weights and scale, loaded before the table and
    // the input are prepared so that the loads' latency overlaps that work
    const int tile = blockIdx.x * TILES + warp / SPLIT, split = warp % SPLIT;
#if GLU
    const int tiles = n0 / 8;
#else
    const int tiles = (n0 + n1 + n2) / 16;
#endif
    const bool valid = tile < tiles;
    const int out_row = valid ? tile * (GLU ? 8 : 16) : 0;       // a warp past the last tile reads tile 0
    Rows ra, rb;
#if GLU
    ra = rows_of(out_row + g, p0, a0, nc0, na0, o0);
    rb = rows_of(out_row + g, p1, a1, nc1, na1, o1);
#else
#if ROPE
    if (out_row < n0 + n1) {        // q or k: rows j and j + ROPE_DIM / 2 of one head
        const int local = out_row < n0 ? out_row : out_row - n0;
        const int j = (local / ROPE_DIM) * ROPE_DIM + (local % ROPE_DIM) / 2 + g;
        if (out_row < n0) { ra = rows_of(j, p0, a0, nc0, na0, o0); rb = rows_of(j + ROPE_DIM / 2, p0, a0, nc0, na0, o0); }
        else { ra = rows_of(j, p1, a1, nc1, na1, o1); rb = rows_of(j + ROPE_DIM / 2, p1, a1, nc1, na1, o1); }
    } else
#endif
    if (out_row < n0) {
        ra = rows_of(out_row + g, p0, a0, nc0, na0, o0); rb = rows_of(out_row + g + 8, p0, a0, nc0, na0, o0);
    } else if (out_row < n0 + n1) {
        ra = rows_of(out_row - n0 + g, p1, a1, nc1, na1, o1); rb = rows_of(out_row - n0 + g + 8, p1, a1, nc1, na1, o1);
    } else {
        ra = rows_of(out_row - n0 - n1 + g, p2, a2, nc2, na2, o2); rb = rows_of(out_row - n0 - n1 + g + 8, p2, a2, nc2, na2, o2);
    }
#endif
    const bool data = g == (t >> 1);                                     // holds a column of B (accumulate)
    // the scale this lane looks up: rows g (t < 2) or g + 8, first or second block of the 128
    const bool second = t >> 1;
#if CHUNKED_SCALES
    const Scales sc = {second ? rb.absmax : ra.absmax, second ? rb.nabs : ra.nabs, second ? rb.block0 : ra.block0};
#else
    const Scales sc = {second ? rb.absmax : ra.absmax, second ? rb.nabs : ra.nabs,
                       (second ? rb.block0 : ra.block0) + ((t & 1) * 64u) / BLOCKSIZE};
#endif
    const float* s_ncode = second ? rb.ncode : ra.ncode;
    const float s_shift = second ? rb.shift : ra.shift;
#if EVEN
    const int first = split * STEPS, last = first + STEPS;
#else
    const int first = split * NIT / SPLIT, last = (split + 1) * NIT / SPLIT;
#endif
    Step ahead[AHEAD];                                                   // the next AHEAD steps' loads, in flight
    #pragma unroll
    for (int j = 0; j < AHEAD; ++j) {
        if (first + j < last) ahead[j] = load_step(ra, rb, sc, t, first + j, slot_of(ring, warp, j, lane));
#if STAGED
        asm volatile("cp.async.commit_group;" ::: "memory");             // one group a step, loaded or not
#endif
    }
    Chunk chunk = {0, 0.0f};                                             // this chunk of 4 steps' scales
#if CHUNKED_SCALES
    Chunk chunk_next = {0, 0.0f};                                        // the next one's
    if (first < last) chunk = chunk_next = load_chunk(sc, first);
    if ((first | 3) + 1 < last) chunk_next = load_chunk(sc, (first | 3) + 1);
#endif

    // the table, one copy per lane (entry e: 8 x 16 bytes); a warp's lanes fill 512 consecutive bytes at a
    // time (filling an entry per lane put all 32 lanes' stores in one bank)
    for (int u = tid; u < 256 * 8; u += WARPS * 32) {
        const unsigned int v = __ldg(pairs + u / 8);
        ((uint4*)table_bytes)[WIDE_TABLE ? (u / 8) * 16 + u % 8 : u] = make_uint4(v, v, v, v);
    }
#if OVERLAP
    asm volatile("griddepcontrol.wait;" ::: "memory");                 // the kernel before: its output is x
#endif
#if NORM
    {   // x = bf16(weight * bf16(x * rsqrt(mean(x^2) + eps))), as transformers' RMSNorm rounds
        float sum = 0.0f;
        for (int i = tid; i < K / 8; i += WARPS * 32) {
            const uint4 v = __ldg(x + i);
            const unsigned int ws[4] = {v.x, v.y, v.z, v.w};
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float lo = __uint_as_float(ws[j] << 16), hi = __uint_as_float(ws[j] & 0xFFFF0000u);
                sum = fmaf(lo, lo, sum);
                sum = fmaf(hi, hi, sum);
            }
        }
        #pragma unroll
        for (int m = 16; m > 0; m >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, m);
        if (lane == 0) reduce[warp] = sum;
        __syncthreads();
        float total = 0.0f;
        #pragma unroll
        for (int w = 0; w < WARPS; ++w) total += reduce[w];
        const float r = rsqrtf(total / K + (float)eps);
        for (int i = tid; i < K / 8; i += WARPS * 32) {
            const uint4 v = __ldg(x + i), nw = __ldg(norm_weight + i);
            unsigned int ws[4] = {v.x, v.y, v.z, v.w};
            const unsigned int ns[4] = {nw.x, nw.y, nw.z, nw.w};
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
                const unsigned int scaled = float_to_bf16(__uint_as_float(ws[j] << 16) * r)
                                          | (float_to_bf16(__uint_as_float(ws[j] & 0xFFFF0000u) * r) << 16);
                ws[j] = mul_bf16x2(scaled, ns[j]);
            }
            xs[i] = make_uint4(ws[0], ws[1], ws[2], ws[3]);
        }
    }
    const uint4* xin = xs;
#elif X_SHARED
    for (int i = tid; i < K / 8; i += WARPS * 32) xs[i] = __ldg(x + i);
    const uint4* xin = xs;
#else
    const uint4* xin = x;
#endif
    __syncthreads();

    float acc_a = 0.0f, acc_b = 0.0f;
    uint4 xq[4];                                                         // the B operand: zeros but in `data` lanes
    #pragma unroll
    for (int q = 0; q < 4; ++q) xq[q] = make_uint4(0, 0, 0, 0);
    #pragma unroll 8
    for (int i = 0; i < STEPS; ++i) {
        const int it = first + i;
        if (!EVEN && it >= last) break;
        Step now = ahead[i % AHEAD];
#if STAGED
        asm volatile("cp.async.wait_group %0;" :: "n"(AHEAD - 1) : "memory");   // step it's copies have landed
        const uint4* slot = slot_of(ring, warp, i % SLOTS, lane);
        now.wa = slot[0];
        now.wb = slot[32];
        // the slot read a step ago is free: its words went into that step's mma
        if (it + AHEAD < last) ahead[i % AHEAD] = load_step(ra, rb, sc, t, it + AHEAD, slot_of(ring, warp, (i + AHEAD) % SLOTS, lane));
        asm volatile("cp.async.commit_group;" ::: "memory");
#else
        if (it + AHEAD < last) ahead[i % AHEAD] = load_step(ra, rb, sc, t, it + AHEAD, nullptr);
#endif
#if CHUNKED_SCALES
        if ((it & 3) == 0 && it != first) {
            chunk = chunk_next;
            if (it + 4 < last) chunk_next = load_chunk(sc, it + 4);
        }
#endif
        accumulate(now, step_scale(now, chunk, it, t, s_ncode, s_shift), xin, it, t, data, lane4, xq, acc_a, acc_b);
    }
#if STAGED
    asm volatile("cp.async.wait_all;" ::: "memory");                     // none left in flight where a warp broke off
#endif
#if OVERLAP
    asm volatile("griddepcontrol.launch_dependents;");                  // its weights may start loading
#endif
    if (!valid) acc_a = acc_b = 0.0f;
    if (t == 0) {
        partial[warp * 16 + g] = acc_a;
        partial[warp * 16 + g + 8] = acc_b;
    }
    __syncthreads();
#if GLU
    if (tid < TILES * 8) {
        const int local = tid / 8, r = tid % 8, row = (blockIdx.x * TILES + local) * 8 + r;
        if (row < n0) {
            float gate = 0.0f, up = 0.0f;
            #pragma unroll
            for (int s = 0; s < SPLIT; ++s) {
                gate += partial[(local * SPLIT + s) * 16 + r];
                up += partial[(local * SPLIT + s) * 16 + r + 8];
            }
            if (has_bias) { gate += bf16_to_float(b0[row]); up += bf16_to_float(b1[row]); }
            const float gb = bf16_to_float(float_to_bf16(gate)), ub = bf16_to_float(float_to_bf16(up));
            const float silu = bf16_to_float(float_to_bf16(gb / (1.0f + __expf(-gb))));
            out[row] = float_to_bf16(silu * ub);
        }
    }
#else
    if (tid < TILES * 16) {
        const int local = tid / 16, r = tid % 16, row = (blockIdx.x * TILES + local) * 16 + r;
        if (row < n0 + n1 + n2) {
            float v = 0.0f;
            #pragma unroll
            for (int s = 0; s < SPLIT; ++s) v += partial[(local * SPLIT + s) * 16 + r];
#if ROPE
            rope_store(v, partial, local, r, row, n0, n1, has_bias, b0, b1, b2, out, rope_cos, rope_sin, position,
                       keys, values, capacity);
#else
            if (has_bias) {
                const unsigned short* bias = row < n0 ? b0 + row : row < n0 + n1 ? b1 + row - n0 : b2 + row - n0 - n1;
                v += bf16_to_float(*bias);
            }
#if RESIDUAL
            out[row] = float_to_bf16(bf16_to_float(out[row]) + bf16_to_float(float_to_bf16(v)));
#else
            out[row] = float_to_bf16(v);
#endif
#endif
        }
    }
#endif
}
"""

_COMPILED: dict = {}


def available() -> bool:
    """Whether this torch can compile CUDA C++ at run time (NVRTC) and a GPU is there."""
    return compat.can_compile_kernels()


def compiled(rows: int, blocksize: int, nested_blocksize: int, nested: bool, bnb_rounding: bool):
    """The kernel for ROWS outputs per warp, these quant blocks and this rounding, compiled once
    per process."""
    import torch

    key = (rows, blocksize, nested_blocksize, nested, bnb_rounding, torch.cuda.current_device())
    if key not in _COMPILED:
        options = [f"-DROWS={rows}", f"-DBLOCKSIZE={blocksize}", f"-DNESTED_BLOCKSIZE={nested_blocksize}",
                   f"-DNESTED={int(nested)}", f"-DBNB_ROUNDING={int(bnb_rounding)}", "-std=c++17"]
        _COMPILED[key] = compat.compile_kernel(SOURCE, "nf4_gemv", options)
    return _COMPILED[key]


def fits(weights: Sequence[NF4Weight], x_dtype=None) -> bool:
    """The kernel reads these weights: NF4 blocks of a multiple of 32 weights, an input size of a
    multiple of 32, 16-byte aligned packed data, bf16 bias (if any), and at most three of them
    with the same input size, blocks and bias."""
    import torch

    first = weights[0]
    return (
        1 <= len(weights) <= 3
        and first.in_features % 32 == 0 and first.blocksize % 32 == 0
        and all((w.in_features, w.blocksize, w.nested, w.nested_blocksize, w.bias is None)
                == (first.in_features, first.blocksize, first.nested, first.nested_blocksize, first.bias is None)
                for w in weights)
        and all(w.packed.data_ptr() % 16 == 0 and w.packed.is_cuda for w in weights)
        and all(w.bias is None or w.bias.dtype == torch.bfloat16 for w in weights)
        and (x_dtype is None or x_dtype == torch.bfloat16)
    )


def rows_per_warp(weights: Sequence[NF4Weight]) -> int:
    """Outputs per warp, as measured fastest on an H100 (bench/cuda_speed.py, bench/RESULTS.md):
    1 for small weights (more warps in flight), 2 for long rows (4096 x 14336) and mid sizes,
    4 where there are many outputs (each lane's inputs then serve four rows). A warp's rows must
    not straddle two weights: only a count that divides every weight's outputs."""
    total = sum(w.out_features for w in weights)
    if total <= 2048:
        wanted = 1
    elif weights[0].in_features > 8192 or total < 6144:
        wanted = 2
    else:
        wanted = 4
    return next(r for r in (4, 2, 1) if r <= wanted and all(w.out_features % r == 0 for w in weights))


def weight_arguments(weights: Sequence[NF4Weight]) -> list:
    """The kernels' three weight slots (packed, absmax, nested code, nested absmax, offset, bias,
    out_features each); unused slots repeat the first weight with no rows, and a tensor a weight
    lacks (no double quant, no bias) is stood in for by its absmax."""
    arguments = []
    for slot in range(3):
        w = weights[slot] if slot < len(weights) else weights[0]
        dummy = w.absmax
        arguments += [w.packed, w.absmax, w.nested_code if w.nested else dummy, w.nested_absmax if w.nested else dummy,
                      w.offset if w.nested else dummy, w.bias if w.bias is not None else dummy,
                      w.out_features if slot < len(weights) else 0]
    return arguments


def one_aligned_row(x: "torch.Tensor", features: int, kernel: str) -> "torch.Tensor":
    """`x` as the one contiguous, 16-byte aligned bf16 row of `features` values the kernels read."""
    import torch

    flat = x.reshape(-1)
    if flat.numel() != features or flat.dtype != torch.bfloat16:
        raise ValueError(f"{kernel} takes one bf16 row of {features} features, got {tuple(x.shape)} {x.dtype}")
    if not flat.is_contiguous() or flat.data_ptr() % 16:
        flat = flat.clone()
    return flat


class NF4Gemv:
    """One launch computing x @ W.T (+ bias) for one to three NF4 weights; callable inside a
    CUDA graph capture (the launch goes to the current stream)."""

    ROUNDINGS = ("float32", "bitsandbytes")

    def __init__(self, weights: Sequence[NF4Weight], rows: int | None = None, threads: int = 64,
                 rounding: str = "float32"):
        if rounding not in self.ROUNDINGS:
            raise ValueError(f"rounding {rounding!r}: one of {', '.join(self.ROUNDINGS)}")
        import torch

        self.weights = list(weights)
        self.rows = rows or rows_per_warp(self.weights)
        self.threads = threads
        self.total = sum(w.out_features for w in self.weights)
        first = self.weights[0]
        bnb_rounding = rounding == "bitsandbytes"
        self.kernel = compiled(self.rows, first.blocksize, max(first.nested_blocksize, 1), first.nested, bnb_rounding)
        warps = -(-self.total // self.rows)
        self.grid = (-(-warps // (threads // 32)), 1, 1)
        # bitsandbytes' kernel holds the NF4 values in bf16
        code = first.code.float()
        self.code = (code.to(torch.bfloat16).float() if bnb_rounding else code).contiguous()
        self.args = weight_arguments(self.weights)
        self.tail = [first.in_features, int(first.bias is not None)]

    @classmethod
    def for_weights(cls, weights: Sequence[NF4Weight], rounding: str = "float32", x_dtype=None) -> "NF4Gemv | None":
        """The launch for these weights and inputs of `x_dtype`, or None where the kernel does not apply."""
        if not available() or not fits(weights, x_dtype):
            return None
        return cls(weights, rounding=rounding)

    def __call__(self, x: "torch.Tensor", out: "torch.Tensor | None" = None) -> "torch.Tensor":
        import torch

        flat = one_aligned_row(x, self.weights[0].in_features, "NF4Gemv")
        if out is None:
            out = torch.empty(self.total, dtype=torch.bfloat16, device=x.device)
        self.kernel(grid=self.grid, block=(self.threads, 1, 1),
                    args=[flat, self.code, out, *self.args, *self.tail])
        return out.view(*x.shape[:-1], self.total)


def mma_compiled(k: int, blocksize: int, nested_blocksize: int, nested: bool, warps: int, split: int, glu: bool,
                 norm: bool, residual: bool, l2_hint: bool, chunked_scales: bool, overlap: bool, ahead: int,
                 staged: bool, slots: int, wide_table: bool, rope: int = 0, x_shared: bool = False):
    """The tensor-core kernel for these compile-time choices (`rope`: the head size, 0 for none),
    compiled once per process and GPU."""
    import torch

    key = ("mma", k, blocksize, nested_blocksize, nested, warps, split, glu, norm, residual, l2_hint, chunked_scales,
           overlap, ahead, staged, slots, wide_table, rope, x_shared, torch.cuda.current_device())
    if key not in _COMPILED:
        options = [f"-DK={k}", f"-DBLOCKSIZE={blocksize}", f"-DNESTED_BLOCKSIZE={nested_blocksize}", f"-DNESTED={int(nested)}",
                   f"-DWARPS={warps}", f"-DSPLIT={split}", f"-DGLU={int(glu)}", f"-DNORM={int(norm)}",
                   f"-DRESIDUAL={int(residual)}", f"-DL2_HINT={int(l2_hint)}", f"-DCHUNKED_SCALES={int(chunked_scales)}",
                   f"-DOVERLAP={int(overlap)}", f"-DAHEAD={ahead}", f"-DSTAGED={int(staged)}",
                   f"-DSLOTS={slots}", f"-DWIDE_TABLE={int(wide_table)}", f"-DROPE={int(rope > 0)}",
                   f"-DROPE_DIM={max(rope, 1)}", f"-DX_SHARED={int(x_shared)}", "-std=c++17"]
        _COMPILED[key] = compat.compile_kernel(MMA_SOURCE, "nf4_mma", options)
    return _COMPILED[key]


def rope_fits(weights: Sequence[NF4Weight], head: int) -> bool:
    """NF4Mma's RoPE reads q, k and v (three weights) of whole heads of `head` values, k and v of
    one size, the head a multiple of 16 (a tile's 8 pairs within one head)."""
    return (len(weights) == 3 and head % 16 == 0 and all(w.out_features % head == 0 for w in weights)
            and weights[1].out_features == weights[2].out_features)


def mma_fits(weights: Sequence[NF4Weight], glu: bool = False, norm=None, x_dtype=None) -> bool:
    """NF4Mma reads these weights: in_features a multiple of 128, quant blocks of a multiple of 64
    weights (nested blocks of 256), out_features a multiple of 16 (of 8 for gate/up with `glu`,
    which takes exactly two weights of one shape), one to three weights with the same input size,
    blocks and bias, 16-byte aligned, bf16 inputs and bias, a bf16 norm weight of in_features, and a
    block's shared memory at the default shape, unstaged, within the GPU's."""
    import torch

    first = weights[0]
    rows = 8 if glu else 16
    return (
        (len(weights) == 2 if glu else 1 <= len(weights) <= 3)
        and first.in_features % 128 == 0 and first.blocksize % 64 == 0
        and (not first.nested or first.nested_blocksize == 256)
        and all((w.in_features, w.blocksize, w.nested, w.nested_blocksize, w.bias is None)
                == (first.in_features, first.blocksize, first.nested, first.nested_blocksize, first.bias is None)
                for w in weights)
        and all(w.out_features % rows == 0 for w in weights)
        and (not glu or weights[0].out_features == weights[1].out_features)
        and all(w.packed.data_ptr() % 16 == 0 and w.packed.is_cuda for w in weights)
        and all(w.bias is None or w.bias.dtype == torch.bfloat16 for w in weights)
        and (x_dtype is None or x_dtype == torch.bfloat16)
        and (norm is None or (norm.dtype == torch.bfloat16 and norm.numel() == first.in_features
                              and norm.is_contiguous() and norm.data_ptr() % 16 == 0))
        and (mma_shared_bytes(first.in_features, mma_shape(weights, glu)[0], norm is not None)
             <= compat.max_shared_memory(first.packed.device))
    )


def mma_shape(weights: Sequence[NF4Weight], glu: bool) -> tuple[int, int]:
    """(warps per block, warps per 16-row tile), as measured fastest on an H200 (bench/cuda_speed.py,
    bench/RESULTS.md). Llama-8B: gate/up 14 and 1 (128 blocks of 14 tiles fill 132 SMs more evenly than
    224 of 8); o and down 16 and 8 (o in the decode step, with its 4 steps a warp loaded at once: 2,461 ->
    2,445 us a token; down with its input in shared memory and one step ahead: 2,031 -> 2,003 us);
    q/k/v 8 and 8. Inputs of 8192 and more (70B, 405B): gate/up, o and down 16 and 4 (bench/split_gpu.py
    kernels: 405B gate/up 656 -> 407 us, 70B down 84 -> 60 us; q/k/v stays, its best was within 10 %).
    Never more warps on a tile than it has steps of 128."""
    steps = weights[0].in_features // 128
    if wide_shape(weights) and (glu or len(weights) == 1):
        warps, split = 16, 4
    elif glu:
        warps, split = 14, 1
    elif len(weights) == 1:
        warps, split = 16, 8
    else:
        warps, split = 8, 8
    while split > 1 and split > steps:
        split //= 2
    return warps, split


def wide_shape(weights: Sequence[NF4Weight]) -> bool:
    """The 70B's and 405B's launches (8,192 inputs or more, over 4,096 outputs), measured apart from the 8B's."""
    return weights[0].in_features >= 8192 and sum(w.out_features for w in weights) > 4096


def mma_l2_hint(in_features: int, split: int) -> bool:
    """Whether the weight loads also bring the rest of the row's 256 bytes into L2: where each warp
    goes on along its rows for 8 steps of 128 or more (faster on an H200 for gate/up and down;
    slower for q/k/v and o, whose warps take 4 steps: bench/RESULTS.md)."""
    return in_features // 128 // split >= 8


def mma_chunked_scales(weights: Sequence[NF4Weight]) -> bool:
    """Whether a lane can load its row's quant-block codes 4 steps at a time (8 aligned bytes): nested
    blocks of 64 weights, rows of a multiple of 512, the codes 8-byte aligned."""
    first = weights[0]
    return (first.nested and first.blocksize == 64 and first.in_features % 512 == 0
            and all(w.absmax.data_ptr() % 8 == 0 for w in weights))


def mma_ahead(in_features: int, split: int, overlap: bool, x_shared: bool = False) -> int:
    """How many steps of 128 inputs a warp keeps loading ahead (1, 2, 4 or 8), as measured on an H200
    (bench/RESULTS.md): all of them where the launch overlaps the kernel before and they are 1, 2, 4 or
    8 (the 8B's q/k/v and o: their weights stream in before the wait); else 1 with the input in shared
    memory (the 8B's down: the step 2,013 -> 2,003 us a token) and 2 for the others (gate/up: 1 was
    slower, 4 and 8 no faster)."""
    steps = in_features // 128
    if overlap and steps % split == 0 and steps // split in (1, 2, 4, 8):
        return steps // split
    return 1 if x_shared else 2


def mma_shared_bytes(in_features: int, warps: int, norm: bool, ring_slots: int = 0, wide_table: bool = False) -> int:
    """A block's dynamic shared memory: the lookup table (32 KB, or 64 KB `wide`), a ring of
    `ring_slots` steps per warp for staged loads (1 KB each), the warps' partial sums and, with
    `norm`, the input (normalized, or copied: x_shared)."""
    return (65536 if wide_table else 32768) + warps * ring_slots * 1024 + warps * 64 + (128 + 2 * in_features if norm else 0)


def mma_slots(ahead: int, glu: bool, warps: int) -> int:
    """A staged warp's ring: its `ahead` steps in flight and the one being read, but 4 slots for 2
    ahead (a power of two makes the unrolled loop's slots constants) where that was faster with the
    wide table on an H200 (bench/RESULTS.md): gate/up (8B and 70B) and blocks of 8 warps (the 8B's
    down); the 70B's down and o, 16 warps a block, were faster at 3."""
    return 4 if ahead == 2 and (glu or warps <= 8) else ahead + 1


def mma_staging(in_features: int, warps: int, split: int, norm: bool, slots: int, limit: int,
                staged: bool | None, wide_table: bool | None) -> tuple[bool, bool]:
    """(staged, wide_table), each at its default where None: staged where mma_staged says so with
    either table; the wide table where staged and the block's shared memory still fits `limit`
    (faster for the 8B's staged gate/up and down on an H200, bench/RESULTS.md)."""
    def shared(wide: bool) -> int:
        return mma_shared_bytes(in_features, warps, norm, slots, wide)

    if staged is None:
        staged = any(mma_staged(in_features, split, shared(wide), limit)
                     for wide in ([True, False] if wide_table is None else [wide_table]))
    if wide_table is None:
        wide_table = staged and shared(True) <= limit
    return staged, wide_table


def mma_x_shared(weights: Sequence[NF4Weight], split: int, norm: bool) -> bool:
    """Whether a launch without RMSNorm copies its input into shared memory once, after its wait, for its
    steps to read from there rather than L1: where a warp goes on along its rows for more than 8 steps,
    but not in the wide shapes (bench/RESULTS.md, H200: the 8B's down, its session 2,031 -> 2,013 us a
    token on 16 warps, 2,003 one step ahead; the 8B's o, 4 steps a warp, the same either way; the 70B's o
    and down were faster alone but its rehearsal 0.99x in one round, so they keep L1)."""
    return not norm and weights[0].in_features // 128 // split > 8 and not wide_shape(weights)


def mma_staged(in_features: int, split: int, staged_bytes: int, limit: int) -> bool:
    """Whether a warp's steps in flight are copied into shared memory (cp.async) rather than loaded
    into registers: where it goes on along its rows for more than 8 steps of 128 and the ring fits the
    GPU's shared memory (`staged_bytes` of `limit` a block). The 8B's gate/up and down: a faster decode
    step on an H200; q/k/v and o, 4 steps a warp, were no faster (bench/RESULTS.md); up to 8,
    mma_ahead may load them all before the wait, in registers."""
    return in_features // 128 // split > 8 and staged_bytes <= limit


def nf4_pairs(code: "torch.Tensor") -> "torch.Tensor":
    """The 256-entry table of a packed byte's two weights as a bf16 pair: the high nibble's value
    in the low half (element 2i), the low nibble's in the high half (element 2i + 1)."""
    import torch

    bits = code.float().to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    byte = torch.arange(256, device=code.device)
    pairs = bits[byte >> 4] | (bits[byte & 15] << 16)
    return torch.where(pairs >= 1 << 31, pairs - (1 << 32), pairs).to(torch.int32).contiguous()


class NF4Mma:
    """One launch of the tensor-core kernel for one to three NF4 weights (q/k/v side by side),
    or gate/up with `glu`; `norm`: the input is RMSNorm(x) * norm (transformers' rounding);
    `residual`: the call adds its result into `out` (the residual stream) and returns it.
    Callable inside a CUDA graph capture (the launch goes to the current stream). On Hopper and
    later the launch overlaps the kernel before it (`overlap`): its blocks fill their table and
    issue their first `ahead` steps' weight loads while that kernel finishes, and read their input
    only after it has. With `staged`, the steps in flight land in shared memory (cp.async) instead of
    registers (mma_staged: where a warp's rows are long), in a ring of `slots` steps (mma_slots).
    `wide_table`: the lookups in a 64 KB table whose addresses take one instruction fewer (default: where
    staged); `x_shared`: the input copied into shared memory after the wait (mma_x_shared). The other
    options are the measured defaults' overrides, for tests and benchmarks."""

    def __init__(self, weights: Sequence[NF4Weight], *, glu: bool = False, norm: "torch.Tensor | None" = None,
                 eps: float = 1e-6, residual: bool = False, warps: int | None = None, split: int | None = None,
                 l2_hint: bool | None = None, chunked_scales: bool | None = None, overlap: bool | None = None,
                 ahead: int | None = None, staged: bool | None = None, slots: int | None = None,
                 wide_table: bool | None = None, rope: int = 0, x_shared: bool | None = None):
        import torch

        if not mma_fits(weights, glu, norm):
            raise ValueError("NF4Mma does not take these weights (see mma_fits)")
        if rope and not rope_fits(weights, rope):
            raise ValueError(f"RoPE in NF4Mma takes q, k and v of whole heads of {rope} (see rope_fits)")
        if glu and residual:
            raise ValueError("glu and residual do not go together")
        if chunked_scales and not mma_chunked_scales(weights):
            raise ValueError("these weights' scales cannot be read 4 steps at a time (see mma_chunked_scales)")
        self.weights = list(weights)
        first = self.weights[0]
        self.glu, self.residual, self.norm = glu, residual, norm
        default_warps, default_split = mma_shape(self.weights, glu)
        self.warps = warps or default_warps
        self.split = split or min(default_split, self.warps)
        if self.warps % self.split:
            raise ValueError(f"{self.warps} warps do not make tiles of {self.split}")
        self.total = first.out_features if glu else sum(w.out_features for w in self.weights)
        tiles = first.out_features // 8 if glu else self.total // 16
        self.grid = (-(-tiles // (self.warps // self.split)), 1, 1)
        k = first.in_features
        can_overlap = compat.overlapping_launches(first.packed.device)
        if overlap and not can_overlap:
            raise ValueError("overlapping launches need a GPU of compute capability 9.0 or later")
        self.overlap = can_overlap if overlap is None else overlap
        if ahead not in (None, 1, 2, 4, 8):
            raise ValueError(f"a warp keeps 1, 2, 4 or 8 steps in flight, not {ahead}")
        if x_shared and norm is not None:
            raise ValueError("with `norm` the input is in shared memory already")
        limit = compat.max_shared_memory(first.packed.device)
        if x_shared is None:               # the rule, where the table and the input fit the GPU's shared memory
            x_shared = (mma_x_shared(self.weights, self.split, norm is not None)
                        and mma_shared_bytes(k, self.warps, True) <= limit)
        self.x_shared = x_shared
        self.ahead = ahead or mma_ahead(k, self.split, self.overlap, self.x_shared)
        if slots is not None and slots <= self.ahead:
            raise ValueError(f"a ring of {slots} slots cannot hold {self.ahead} steps in flight and the one being read")
        self.slots = slots or mma_slots(self.ahead, glu, self.warps)
        in_shared = norm is not None or self.x_shared
        self.staged, self.wide_table = mma_staging(k, self.warps, self.split, in_shared, self.slots, limit,
                                                   staged, wide_table)
        self.shared = mma_shared_bytes(k, self.warps, in_shared, self.slots if self.staged else 0, self.wide_table)
        if self.shared > limit:
            raise ValueError(f"NF4Mma needs {self.shared:,} bytes of shared memory a block; this GPU has {limit:,}")
        self.kernel = mma_compiled(k, first.blocksize, max(first.nested_blocksize, 1), first.nested, self.warps, self.split,
                                   glu, norm is not None, residual,
                                   mma_l2_hint(k, self.split) if l2_hint is None else l2_hint,
                                   mma_chunked_scales(self.weights) if chunked_scales is None else chunked_scales,
                                   self.overlap, self.ahead, self.staged, self.slots, self.wide_table, rope, self.x_shared)
        self.rope = rope
        compat.reserve_shared_memory(self.kernel, self.shared)
        self.pairs = nf4_pairs(first.code)
        self.no_norm = torch.zeros(16, dtype=torch.int32, device=first.packed.device)      # the norm argument's stand-in
        self.eps = float(eps)
        self.args = weight_arguments(self.weights)
        self.has_bias = int(first.bias is not None)

    @classmethod
    def for_weights(cls, weights: Sequence[NF4Weight], *, glu: bool = False, norm: "torch.Tensor | None" = None,
                    eps: float = 1e-6, residual: bool = False, x_dtype=None, rope: int = 0) -> "NF4Mma | None":
        """The launch for these weights, or None where the kernel does not apply."""
        if not available() or not mma_fits(weights, glu, norm, x_dtype) or (rope and not rope_fits(weights, rope)):
            return None
        return cls(weights, glu=glu, norm=norm, eps=eps, residual=residual, rope=rope)

    def __call__(self, x: "torch.Tensor", out: "torch.Tensor | None" = None, rope: tuple = ()) -> "torch.Tensor":
        """x [..., in_features] -> [..., outputs]. With `rope` (an NF4Mma made with it): (cos, sin,
        position, keys, values), the RoPE tables [capacity, head], the step's position ([1] int64) and
        the layer's plain bf16 cache [kv_heads, capacity, head]: q comes back rotated, k and v go into
        the cache at the position (their part of the output is not written)."""
        import torch

        if bool(rope) != bool(self.rope):
            raise ValueError("RoPE's tables, position and cache go with an NF4Mma made with rope, and only there")
        flat = one_aligned_row(x, self.weights[0].in_features, "NF4Mma")
        if self.residual and (out is None or out.numel() != self.total or not out.is_contiguous()
                              or out.dtype != torch.bfloat16):
            raise ValueError(f"a residual NF4Mma adds into `out`: a contiguous bf16 tensor of {self.total}")
        if out is None:
            out = torch.empty(self.total, dtype=torch.bfloat16, device=x.device)
        norm = self.norm if self.norm is not None else self.no_norm
        args = [self.pairs, flat, out, norm, self.eps, *self.args, self.has_bias, *self._rope_arguments(rope)]
        if self.overlap:
            compat.launch_overlapping(self.kernel, self.grid, (self.warps * 32, 1, 1), args, self.shared)
        else:
            self.kernel(grid=self.grid, block=(self.warps * 32, 1, 1), shared_mem=self.shared, args=args)
        return out.view(*x.shape[:-1], self.total) if not self.residual else out

    def _rope_arguments(self, rope: tuple) -> list:
        """The kernel's RoPE arguments, checked: what it reads and writes at the position."""
        import torch

        if not rope:
            return []
        cos, sin, position, keys, values = rope
        kv_heads, capacity, head = keys.shape
        if (head != self.rope or kv_heads * head != self.weights[1].out_features or values.shape != keys.shape
                or any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in (cos, sin, keys, values))
                or cos.shape != (capacity, head) or sin.shape != cos.shape
                or position.dtype != torch.long or position.numel() != 1):
            raise ValueError(f"NF4Mma's RoPE takes bf16 tables [capacity, {self.rope}], an int64 position and a "
                             f"plain bf16 cache of {self.weights[1].out_features // self.rope} KV heads")
        return [cos, sin, position, keys, values, capacity]

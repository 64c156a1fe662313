"""A batch-1 NF4 GEMV in CUDA C++, compiled at run time by NVRTC (`torch.cuda._compile_kernel`,
which ships with torch's CUDA wheels: no compiler needed on the user's machine).

It reads bitsandbytes' packed weights and double-quant state as they are (see `nf4.py` for the
layout). One warp computes ROWS outputs: each lane takes 32 consecutive weights of a row at a
time (one 16-byte load per row; 32 weights lie inside one 64-weight quant block), the matching
32 inputs (64 bytes, shared by the warp's ROWS rows), looks each nibble up in the 16-entry NF4
table held in shared memory (conflict-free: 16 words in 16 banks), sums the 32 products in
float32, scales the sum once, and the warp reduces with shuffles. Up to three weights that read
the same input (q/k/v, gate/up) run in one launch, their outputs side by side.

    kernel = NF4Gemv.for_weights([q, k, v])       # None where it does not apply (then bitsandbytes)
    y = kernel(x)                                  # bf16 [1, sum of outputs]

Products and sums are float32 with the scale applied per 32 weights: within bf16 rounding of the
float32 reference, closer to it than bitsandbytes' own kernel (which rounds each product to bf16).
With rounding="bitsandbytes" it rounds as that kernel does, and its outputs were bit-identical to
bitsandbytes' on every Llama-8B shape measured (bench/RESULTS.md), at some of the speed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

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

_COMPILED: dict = {}


def available() -> bool:
    """Whether this torch can compile CUDA C++ at run time (NVRTC) and a GPU is there."""
    import torch

    return torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")


def compiled(rows: int, blocksize: int, nested_blocksize: int, nested: bool, bnb_rounding: bool):
    """The kernel for ROWS outputs per warp, these quant blocks and this rounding, compiled once
    per process."""
    import torch

    key = (rows, blocksize, nested_blocksize, nested, bnb_rounding, torch.cuda.current_device())
    if key not in _COMPILED:
        options = [f"-DROWS={rows}", f"-DBLOCKSIZE={blocksize}", f"-DNESTED_BLOCKSIZE={nested_blocksize}",
                   f"-DNESTED={int(nested)}", f"-DBNB_ROUNDING={int(bnb_rounding)}", "-std=c++17"]
        _COMPILED[key] = torch.cuda._compile_kernel(SOURCE, "nf4_gemv", nvcc_options=options)
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
        self.args = []
        for slot in range(3):          # unused slots repeat the first weight with no rows
            w = self.weights[slot] if slot < len(self.weights) else first
            dummy = w.absmax
            self.args += [w.packed, w.absmax, w.nested_code if w.nested else dummy, w.nested_absmax if w.nested else dummy,
                          w.offset if w.nested else dummy, w.bias if w.bias is not None else dummy,
                          w.out_features if slot < len(self.weights) else 0]
        self.tail = [first.in_features, int(first.bias is not None)]

    @classmethod
    def for_weights(cls, weights: Sequence[NF4Weight], rounding: str = "float32", x_dtype=None) -> "NF4Gemv | None":
        """The launch for these weights and inputs of `x_dtype`, or None where the kernel does not apply."""
        if not available() or not fits(weights, x_dtype):
            return None
        return cls(weights, rounding=rounding)

    def __call__(self, x: "torch.Tensor", out: "torch.Tensor | None" = None) -> "torch.Tensor":
        import torch

        flat = x.reshape(-1)
        if flat.numel() != self.weights[0].in_features or flat.dtype != torch.bfloat16:
            raise ValueError(f"NF4Gemv takes one bf16 row of {self.weights[0].in_features} features, got "
                             f"{tuple(x.shape)} {x.dtype}")
        if not flat.is_contiguous() or flat.data_ptr() % 16:
            flat = flat.clone()
        if out is None:
            out = torch.empty(self.total, dtype=torch.bfloat16, device=x.device)
        self.kernel(grid=self.grid, block=(self.threads, 1, 1),
                    args=[flat, self.code, out, *self.args, *self.tail])
        return out.view(*x.shape[:-1], self.total)

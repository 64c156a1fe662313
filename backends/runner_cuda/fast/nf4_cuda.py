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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from runner_cuda.fast.nf4 import NF4Weight

if TYPE_CHECKING:
    import torch

SOURCE = r"""
#ifndef ROWS
#define ROWS 4
#endif

__device__ __forceinline__ float bf16_to_float(unsigned int bits) { return __uint_as_float(bits << 16); }

__device__ __forceinline__ unsigned short float_to_bf16(float value) {
    unsigned int bits = __float_as_uint(value);
    bits += 0x7FFFu + ((bits >> 16) & 1u);                      // round to nearest even
    return (unsigned short)(bits >> 16);
}

extern "C" __global__ void nf4_gemv(
    const unsigned short* __restrict__ x, const float* __restrict__ code, unsigned short* __restrict__ out,
    const uint4* p0, const void* a0, const float* nc0, const float* na0, const float* o0, const unsigned short* b0, int n0,
    const uint4* p1, const void* a1, const float* nc1, const float* na1, const float* o1, const unsigned short* b1, int n1,
    const uint4* p2, const void* a2, const float* nc2, const float* na2, const float* o2, const unsigned short* b2, int n2,
    int K, int blocksize, int nested_blocksize, int nested, int has_bias)
{
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
    __syncthreads();

    const int lane = threadIdx.x & 31;
    int row = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * ROWS;   // over all weights
    int out_row = row;
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
    const float shift = nested ? offset[0] : 0.0f;
    const int chunks = K >> 5;                                           // 32 weights a chunk
    const long long row_chunk = (long long)row * chunks;
    float acc[ROWS];
    #pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;

    #pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
        float xf[32];
        const uint4* xv = reinterpret_cast<const uint4*>(x) + c * 4;
        #pragma unroll
        for (int q = 0; q < 4; ++q) {
            uint4 v = xv[q];
            unsigned int words[4] = {v.x, v.y, v.z, v.w};
            #pragma unroll
            for (int h = 0; h < 4; ++h) {
                xf[q * 8 + h * 2] = __uint_as_float(words[h] << 16);
                xf[q * 8 + h * 2 + 1] = __uint_as_float(words[h] & 0xFFFF0000u);
            }
        }
        uint4 w[ROWS];
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) w[r] = __ldcs(packed + row_chunk + (long long)r * chunks + c);   // streamed once
        #pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            unsigned int words[4] = {w[r].x, w[r].y, w[r].z, w[r].w};
            float sum = 0.0f;
            #pragma unroll
            for (int h = 0; h < 4; ++h) {
                #pragma unroll
                for (int b = 0; b < 4; ++b) {
                    unsigned int byte = (words[h] >> (8 * b)) & 0xFFu;   // weight 2i high nibble, 2i+1 low
                    sum = fmaf(table[byte >> 4], xf[h * 8 + b * 2], sum);
                    sum = fmaf(table[byte & 15u], xf[h * 8 + b * 2 + 1], sum);
                }
            }
            long long block = ((long long)(row + r) * K + (long long)c * 32) / blocksize;
            float scale = nested
                ? ncode[((const unsigned char*)absmax)[block]] * nabs[block / nested_blocksize] + shift
                : ((const float*)absmax)[block];
            acc[r] = fmaf(sum, scale, acc[r]);
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


def compiled(rows: int):
    """The kernel for ROWS outputs per warp, compiled once per process and device capability."""
    import torch

    key = (rows, torch.cuda.get_device_capability())
    if key not in _COMPILED:
        _COMPILED[key] = torch.cuda._compile_kernel(SOURCE, "nf4_gemv", nvcc_options=[f"-DROWS={rows}", "-std=c++17"])
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
    """The most rows per warp (4, 2 or 1) that divides every weight's outputs (a warp's rows must
    not straddle two weights)."""
    return next(r for r in (4, 2, 1) if all(w.out_features % r == 0 for w in weights))


class NF4Gemv:
    """One launch computing x @ W.T (+ bias) for one to three NF4 weights; callable inside a
    CUDA graph capture (the launch goes to the current stream)."""

    def __init__(self, weights: Sequence[NF4Weight], rows: int | None = None, threads: int = 128):
        self.weights = list(weights)
        self.rows = rows or rows_per_warp(self.weights)
        self.threads = threads
        self.total = sum(w.out_features for w in self.weights)
        self.kernel = compiled(self.rows)
        warps = -(-self.total // self.rows)
        self.grid = (-(-warps // (threads // 32)), 1, 1)
        first = self.weights[0]
        self.code = first.code.float().contiguous()
        self.args = []
        for slot in range(3):          # unused slots repeat the first weight with no rows
            w = self.weights[slot] if slot < len(self.weights) else first
            dummy = w.absmax
            self.args += [w.packed, w.absmax, w.nested_code if w.nested else dummy, w.nested_absmax if w.nested else dummy,
                          w.offset if w.nested else dummy, w.bias if w.bias is not None else dummy,
                          w.out_features if slot < len(self.weights) else 0]
        self.tail = [first.in_features, first.blocksize, max(first.nested_blocksize, 1), int(first.nested),
                     int(first.bias is not None)]

    @classmethod
    def for_weights(cls, weights: Sequence[NF4Weight]) -> "NF4Gemv | None":
        if not available() or not fits(weights):
            return None
        return cls(weights)

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

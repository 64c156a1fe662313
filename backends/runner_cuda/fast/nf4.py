"""NF4 weights as bitsandbytes stores them, read as they are: a reference dequantization in
plain torch (runs anywhere, checks the layout) and a fused dequantize-GEMV Triton kernel for
batch-1 decode on CUDA.

bitsandbytes' `Linear4bit.weight` is packed uint8 of shape [n*k/2, 1]: element 2i of the
flattened [n, k] weight in the high nibble of byte i, element 2i+1 in the low nibble. Each block
of `blocksize` (64) consecutive elements has one scale, `absmax`. With double quantization
(`nested`), `absmax` is itself uint8: scale = state2.code[absmax[b]] * state2.absmax[b // 256]
+ offset, in float32. The weight is code[nibble] * scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class NF4Weight:
    """Views of one Linear4bit's packed weight and quantization state (no copies)."""

    packed: "torch.Tensor"        # uint8 [n*k/2]
    code: "torch.Tensor"          # float32 [16], the NF4 table
    absmax: "torch.Tensor"        # uint8 [n*k/blocksize] when nested, else float32
    nested_code: "torch.Tensor | None"    # float32 [256]
    nested_absmax: "torch.Tensor | None"  # float32 [n*k/blocksize/nested_blocksize]
    offset: "torch.Tensor | None"         # float32 scalar
    blocksize: int
    nested_blocksize: int
    out_features: int
    in_features: int
    bias: "torch.Tensor | None"

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def nf4_weight_of(module) -> NF4Weight | None:
    """The NF4 weight of a bitsandbytes Linear4bit in the standard layout, or None if `module`
    is something else (plain Linear, FP4, or bitsandbytes' CPU-only repacked layout)."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or getattr(state, "packing_format_for_cpu", False):
        return None
    out_features, in_features = (int(n) for n in state.shape)
    if in_features % state.blocksize:
        return None
    nested = bool(state.nested)
    if nested and state.state2.blocksize != 256:
        return None
    return NF4Weight(
        packed=weight.data.view(-1),
        code=state.code,
        absmax=state.absmax,
        nested_code=state.state2.code if nested else None,
        nested_absmax=state.state2.absmax if nested else None,
        offset=state.offset if nested else None,
        blocksize=int(state.blocksize),
        nested_blocksize=int(state.state2.blocksize) if nested else 0,
        out_features=out_features,
        in_features=in_features,
        bias=module.bias,
    )


def block_scales(w: NF4Weight) -> "torch.Tensor":
    """float32 scale of every block, double quantization undone."""
    import torch

    if not w.nested:
        return w.absmax.float()
    blocks = w.absmax.numel()
    second = w.nested_absmax.repeat_interleave(w.nested_blocksize)[:blocks]
    return w.nested_code[w.absmax.long()] * second + w.offset.float()


def dequantize_reference(w: NF4Weight, dtype=None) -> "torch.Tensor":
    """The [out, in] weight, computed in float32 like bitsandbytes (then cast to `dtype`)."""
    import torch

    nibbles = torch.stack([w.packed >> 4, w.packed & 0xF], dim=1).view(-1).long()
    values = w.code[nibbles].view(-1, w.blocksize) * block_scales(w).view(-1, 1)
    weight = values.view(w.out_features, w.in_features)
    return weight if dtype is None else weight.to(dtype)


def linear_reference(x: "torch.Tensor", w: NF4Weight) -> "torch.Tensor":
    """x @ W.T (+ bias) in float32 from the packed weight; the kernel's reference."""
    import torch

    out = torch.nn.functional.linear(x.float(), dequantize_reference(w))
    if w.bias is not None:
        out = out + w.bias.float()
    return out.to(x.dtype)


# ---- the fused kernel (CUDA, Triton) ---------------------------------------------------------

_KERNEL = None


def _kernel():
    """Compile-on-first-use Triton kernel: one program computes BLOCK_N outputs, walking K in
    chunks of BLOCK_K elements, each chunk BLOCK_K/64 quantization blocks of 32 bytes. A byte
    (two weights) is decoded by one load from a 256-entry table of code pairs; products are
    accumulated per element and reduced once at the end.

    MODE 0 ("exact"): float32 codes, float32 products (the closest to the exact result).
    MODE 1 ("bf16-table"): the codes rounded to bf16 as bitsandbytes holds them, float32 math.
    MODE 2 ("bnb"): bitsandbytes' own batch-1 kernel (gemm_4bit_simt) reproduced: scale, each
    weight (code × scale) and each product (x × weight) rounded to bf16, summed in float32."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_gemv_kernel(
        x_ptr, packed_ptr, pairs_ptr, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
        bias_ptr, out_ptr, N, K: tl.constexpr,
        NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr, BLOCKSIZE: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)                  # [BN]
        row_ok = rows < N
        BLOCKS: tl.constexpr = BLOCK_K // BLOCKSIZE                   # quant blocks per chunk
        HALF: tl.constexpr = BLOCKSIZE // 2                          # bytes per quant block
        b = tl.arange(0, BLOCKS)                                     # [NB]
        j = tl.arange(0, HALF)                                       # [H]
        acc = tl.zeros([BLOCK_N, BLOCKS, HALF], dtype=tl.float32)
        row_start = rows.to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            # x: even and odd elements of each quant block, [NB, H]
            x_even = tl.load(x_ptr + k0 + b[:, None] * BLOCKSIZE + 2 * j[None, :]).to(tl.float32)
            x_odd = tl.load(x_ptr + k0 + b[:, None] * BLOCKSIZE + 2 * j[None, :] + 1).to(tl.float32)
            # packed bytes [BN, NB, H]; element 2i in the high nibble of byte i
            byte_index = (row_start[:, None, None] + k0 + b[None, :, None] * BLOCKSIZE) // 2 + j[None, None, :]
            q = tl.load(packed_ptr + byte_index, mask=row_ok[:, None, None], other=0, eviction_policy="evict_first")
            pair = tl.load(pairs_ptr + q.to(tl.int32))           # the two weights' codes
            if MODE != 0:                                        # int32: bf16 bits, high | low
                w_hi = (pair & -65536).to(tl.float32, bitcast=True)
                w_lo = (pair << 16).to(tl.float32, bitcast=True)
            else:                                                # int64: float32 bits, high | low
                w_hi = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
                w_lo = pair.to(tl.int32).to(tl.float32, bitcast=True)
            block = (row_start[:, None] + k0) // BLOCKSIZE + b[None, :]                 # [BN, NB]
            if NESTED:
                a8 = tl.load(absmax_ptr + block, mask=row_ok[:, None], other=0).to(tl.int32)
                scale = tl.load(nested_code_ptr + a8) * tl.load(
                    nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=row_ok[:, None], other=0.0
                ) + tl.load(offset_ptr)
            else:
                scale = tl.load(absmax_ptr + block, mask=row_ok[:, None], other=0.0)
            if MODE == 2:
                s = scale.to(tl.bfloat16).to(tl.float32)[:, :, None]
                b_hi = (w_hi * s).to(tl.bfloat16).to(tl.float32)
                b_lo = (w_lo * s).to(tl.bfloat16).to(tl.float32)
                acc += (b_hi * x_even[None, :, :]).to(tl.bfloat16).to(tl.float32) + (
                    b_lo * x_odd[None, :, :]
                ).to(tl.bfloat16).to(tl.float32)
            else:
                acc += (w_hi * x_even[None, :, :] + w_lo * x_odd[None, :, :]) * scale[:, :, None]
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
        if HAS_BIAS:
            total += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)

    _KERNEL = nf4_gemv_kernel
    return _KERNEL


_PAIRS: dict = {}


def pair_table(code: "torch.Tensor", bf16: bool) -> "torch.Tensor":
    """For each byte value, the codes of its two nibbles in one word: float32 bits in an int64
    (high nibble in the upper half), or with `bf16` the bf16 bits in an int32, the table that
    bitsandbytes' batch-1 kernel uses."""
    import torch

    key = (code.data_ptr(), code.device, bf16)
    table = _PAIRS.get(key)
    if table is None:
        byte = torch.arange(256, device=code.device)
        if bf16:
            bits = code.float().to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
            table = ((bits[byte >> 4] << 16) | bits[byte & 15]).to(torch.int32)
        else:
            bits = code.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
            table = (bits[byte >> 4] << 32) | bits[byte & 15]
        table = table.contiguous()
        _PAIRS[key] = table
    return table


def pick_tiles(out_features: int, in_features: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for batch-1 decode on an H100 (measured in bench/cuda_speed.py)."""
    block_k = next(size for size in (512, 256, 128, 64) if in_features % size == 0)
    if out_features >= 8192:
        return 16, 512, 8
    return (8, 512, 4) if in_features >= 8192 else (8, 1024, 8) if in_features % 1024 == 0 else (8, block_k, 4)


MODES = {"exact": 0, "bf16-table": 1, "bnb": 2}


def nf4_gemv(x: "torch.Tensor", w: NF4Weight, out: "torch.Tensor | None" = None, tiles=None,
             mode: str = "exact") -> "torch.Tensor":
    """y = x @ W.T + bias for one token (x: [..., in_features] with one row), on CUDA (or on
    CPU under TRITON_INTERPRET=1)."""
    import torch

    if x.numel() != w.in_features:
        raise ValueError(f"nf4_gemv takes one row of {w.in_features} features, got shape {tuple(x.shape)}")
    x_flat = x.reshape(-1)
    if not x_flat.is_contiguous():
        x_flat = x_flat.contiguous()
    if out is None:
        out = torch.empty(w.out_features, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = tiles or pick_tiles(w.out_features, w.in_features)
    grid = ((w.out_features + block_n - 1) // block_n,)
    dummy = w.absmax
    _kernel()[grid](
        x_flat, w.packed, pair_table(w.code, bf16=mode != "exact"), w.absmax,
        w.nested_code if w.nested else dummy, w.nested_absmax if w.nested else dummy,
        w.offset if w.nested else dummy, w.bias if w.bias is not None else dummy, out,
        w.out_features, w.in_features,
        NESTED=w.nested, HAS_BIAS=w.bias is not None, MODE=MODES[mode], BLOCKSIZE=w.blocksize,
        NESTED_BLOCKSIZE=max(w.nested_blocksize, 1), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return out.view(*x.shape[:-1], w.out_features)

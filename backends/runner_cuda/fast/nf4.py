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
from typing import TYPE_CHECKING, Sequence

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

_KERNELS: dict = {}


def _kernel():
    """The Triton kernel (runner_cuda/fast/nf4_kernel.py), compiled per shape on first use."""
    from runner_cuda.fast.nf4_kernel import nf4_gemv_kernel

    return nf4_gemv_kernel


def code_table(code: "torch.Tensor", bf16: bool) -> "torch.Tensor":
    """The 16 NF4 values as float32, or with `bf16` rounded to bf16 first (as bitsandbytes'
    batch-1 kernel holds them). Cached per code tensor."""
    import torch

    key = ("code", code.data_ptr(), code.device, bf16)
    table = _KERNELS.get(key)
    if table is None:
        table = code.float().to(torch.bfloat16).float() if bf16 else code.float().contiguous()
        _KERNELS[key] = table
    return table


def pick_tiles(out_features: int, in_features: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for batch-1 decode (measured on an H100 in bench/cuda_speed.py)."""
    block_k = next(size for size in (1024, 512, 256, 128, 64) if in_features % size == 0)
    return 4, block_k, 4


MODES = {"exact": False, "bnb": True}


def nf4_gemv(x: "torch.Tensor", w: "NF4Weight | Sequence[NF4Weight]", out: "torch.Tensor | None" = None,
             tiles=None, mode: str = "exact") -> "torch.Tensor":
    """y = x @ W.T + bias for one token (x: [..., in_features] with one row), on CUDA (or on
    CPU under TRITON_INTERPRET=1). Given several weights (at most three, same input size and
    quantization settings, e.g. q/k/v), one launch computes them all: their outputs side by side."""
    import torch

    weights = [w] if isinstance(w, NF4Weight) else list(w)
    first = weights[0]
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"nf4_gemv takes one to three weights, not {len(weights)}")
    if any((v.in_features, v.blocksize, v.nested, v.nested_blocksize, v.bias is None) !=
           (first.in_features, first.blocksize, first.nested, first.nested_blocksize, first.bias is None) for v in weights):
        raise ValueError("nf4_gemv: the weights of one launch need the same input size, blocks and bias")
    if x.numel() != first.in_features:
        raise ValueError(f"nf4_gemv takes one row of {first.in_features} features, got shape {tuple(x.shape)}")
    total = sum(v.out_features for v in weights)
    x_flat = x.reshape(-1)
    if not x_flat.is_contiguous():
        x_flat = x_flat.contiguous()
    if out is None:
        out = torch.empty(total, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = tiles or pick_tiles(max(v.out_features for v in weights), first.in_features)
    grid = (sum(-(-v.out_features // block_n) for v in weights),)
    args = []
    for v in (weights + [first] * 3)[:3]:
        dummy = v.absmax
        args += [v.packed.view(torch.int32), v.absmax, v.nested_code if v.nested else dummy,
                 v.nested_absmax if v.nested else dummy, v.offset if v.nested else dummy,
                 v.bias if v.bias is not None else dummy, v.out_features]
    _kernel()[grid](
        x_flat, code_table(first.code, bf16=MODES[mode]), out, *args,
        K=first.in_features, WEIGHTS=len(weights), NESTED=first.nested, HAS_BIAS=first.bias is not None,
        ROUND_BNB=MODES[mode], BLOCKSIZE=first.blocksize, NESTED_BLOCKSIZE=max(first.nested_blocksize, 1),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return out.view(*x.shape[:-1], total)

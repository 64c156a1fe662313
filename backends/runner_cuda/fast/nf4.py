"""NF4 weights as bitsandbytes stores them, read as they are, and a reference dequantization in
plain torch (runs anywhere, checks the layout); the batch-1 decode kernel that reads them on CUDA
is `nf4_cuda.py`.

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

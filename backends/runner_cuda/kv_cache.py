"""A quantized KV cache for the CUDA backend's ordinary loop (`--kv-bits 8|4`).

Each layer stores K and V as `bits`-bit codes with a scale and a bias per group of
`budget.KV_GROUP_SIZE` values along the head dimension, in the compute dtype: the layout of
mlx-lm's QuantizedKVCache, so the plan's bytes per token are the same formula on both backends
(`budget.kv_dtype_bytes`). Attention gets the layer's K and V back dequantized into the compute
dtype, one layer at a time and KV_READ_BLOCK positions at a time (`dequantize_blocks`): beyond the
two copies a read holds one block's float32 values, as the fast path's static cache does, which is
what the plan counts for it (plan_rules.CudaPlanRules.kv_read_bytes).

Why not transformers' own `QuantizedCache`: its quanto backend has no 8-bit, its layers keep a
window of up to 128 tokens unquantized and re-quantize the whole cache whenever the window fills
(so its bytes per token are not one number), and it cannot be cropped, which the kept cache between
replies needs (`CudaSession.trim_cache`). Built on transformers' public `Cache` and `DynamicLayer`
(checked against transformers 5.24).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from runner.budget import KV_GROUP_SIZE
from runner_cuda.plan_rules import KV_READ_BLOCK

if TYPE_CHECKING:
    import torch


def quantize(x: "torch.Tensor", bits: int) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(codes uint8, scales, biases) of `x` (..., head_dim): affine per group of KV_GROUP_SIZE
    values, x ≈ code × scale + bias; 4-bit codes two to a byte. Scales and biases are rounded to
    x's dtype before the codes are computed, so dequantizing reproduces what was meant."""
    import torch

    groups = x.float().unflatten(-1, (-1, KV_GROUP_SIZE))
    low, high = groups.amin(-1), groups.amax(-1)
    levels = 2**bits - 1
    scales = ((high - low) / levels).to(x.dtype)
    biases = low.to(x.dtype)
    step = scales.float().clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    codes = ((groups - biases.float()[..., None]) / step).round_().clamp_(0, levels).to(torch.uint8).flatten(-2)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scales, biases


def dequantize(codes: "torch.Tensor", scales: "torch.Tensor", biases: "torch.Tensor", bits: int) -> "torch.Tensor":
    """x back from `quantize`'s parts, in the scales' dtype: code x scale + bias, in float32. The
    fast decoder's static cache (fast/static_cache.py) calls this too, inside a CUDA graph: device
    operations only, no host synchronisation."""
    import torch

    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
    # a new float32 tensor, scaled in place: one float32 copy of the values alive at a time, not three
    groups = codes.unflatten(-1, (-1, KV_GROUP_SIZE)).float()
    groups.mul_(scales.float()[..., None]).add_(biases.float()[..., None])
    return groups.flatten(-2).to(scales.dtype)


def dequantize_blocks(codes: "torch.Tensor", scales: "torch.Tensor", biases: "torch.Tensor", bits: int) -> "torch.Tensor":
    """`dequantize` of parts laid out (..., positions, values) into one new tensor, KV_READ_BLOCK
    positions at a time: the same values, with one block's float32 temporaries alive instead of
    the whole span's (the attention of a decode step and of a prefill chunk reads the layer so)."""
    import torch

    span = codes.shape[-2]
    out = torch.empty(*codes.shape[:-1], scales.shape[-1] * KV_GROUP_SIZE, dtype=scales.dtype, device=codes.device)
    for start in range(0, span, KV_READ_BLOCK):
        block = slice(start, min(span, start + KV_READ_BLOCK))
        out[..., block, :] = dequantize(codes[..., block, :], scales[..., block, :], biases[..., block, :], bits)
    return out


@functools.cache
def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class QuantizedLayer(DynamicLayer):
        """One layer's K and V as codes, scales and biases (`quantize`), grown by concatenation
        along the sequence like transformers' DynamicLayer; `crop` cuts all six back."""

        is_sliding = False
        is_croppable = True

        def __init__(self, bits: int):
            super().__init__()
            self.bits = bits
            self.stored: list | None = None    # [codes, scales, biases] of K, then of V

        def lazy_initialization(self, key_states, value_states) -> None:
            self.device = key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.append(key_states, value_states)
            return dequantize_blocks(*self.stored[:3], self.bits), dequantize_blocks(*self.stored[3:], self.bits)

        def append(self, key_states, value_states) -> None:
            """The new positions quantized onto `stored` (a method of its own, so that the new
            parts are freed before the read: they are in `stored` already)."""
            import torch

            new = [*quantize(key_states, self.bits), *quantize(value_states, self.bits)]
            self.stored = new if self.stored is None else [torch.cat([old, part], dim=-2)
                                                           for old, part in zip(self.stored, new)]

        def get_seq_length(self) -> int:
            return 0 if self.stored is None else self.stored[0].shape[-2]

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0 and self.stored is not None:
                self.stored = [part[..., :tokens_to_remove, :] for part in self.stored]

        def reset(self) -> None:
            self.stored = None
            self.is_initialized = False

        def nbytes(self) -> int:
            return sum(part.numel() * part.element_size() for part in self.stored or ())

    return QuantizedLayer


def quantized_cache(config, bits: int):
    """A transformers Cache of quantized layers, one per decoder layer of `config`."""
    from transformers.cache_utils import Cache

    layer = _layer_class()
    text = config.get_text_config(decoder=True)
    return Cache(layers=[layer(bits) for _ in range(text.num_hidden_layers)])

"""The fast decoder's static KV cache: one layer's K and V, preallocated for every position.

    layer = static_layer(kv_heads, capacity, head_dim, dtype, device, kv_bits, kernels)
    layer.write(start, k, v)              # prefill: k, v [kv_heads, T, head_dim] at start..start+T-1
    layer.write_at(position, k, v)        # a decode step: position a [1] device tensor (graph-safe)
    out = layer.attend(q, position, span, scale)    # a decode step's split-KV attention (attention.py)
    keys, values = layer.read(span)       # [kv_heads, span, head_dim] in the compute dtype
    layer.tensors                         # what it holds: its bytes are the plan's (budget.kv_cache_bytes)

`PlainLayer` holds K and V in the compute dtype; `read` returns views. `QuantizedLayer`
(`--kv-bits 8|4`) holds each as codes, scales and biases in the format of the ordinary loop's cache
(runner_cuda.kv_cache.quantize: a scale and a bias per 64 values, in the compute dtype), quantized
as they are written. A decode step's attention (`attend`) reads the codes as they are stored and
dequantizes them in registers, so it copies nothing; `read` dequantizes a span into a new tensor
(prefill, and the SDPA fallback), the values the ordinary loop's attention sees, KV_READ_BLOCK
positions at a time (what the plan counts for it: plan_rules.CudaPlanRules.kv_read_bytes). With `kernels`
(the decoder's split-KV attention, CUDA) a step's K and V are quantized and written by one Triton
launch (kv_kernels.quantized_write, the same codes as `quantize`), else by torch's operations.
Every operation is a device kernel (no host synchronisation), so a decode step with it can be
captured in a CUDA graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner.budget import KV_GROUP_SIZE
from runner_cuda.fast.attention import decode_attention
from runner_cuda.kv_cache import dequantize_blocks, quantize

if TYPE_CHECKING:
    import torch


class PlainLayer:
    def __init__(self, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        import torch

        shape = (kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def device(self):
        return self.keys.device

    @property
    def tensors(self) -> list["torch.Tensor"]:
        return [self.keys, self.values]

    def write(self, start: int, k: "torch.Tensor", v: "torch.Tensor") -> None:
        end = start + k.shape[1]
        self.keys[:, start:end].copy_(k)
        self.values[:, start:end].copy_(v)

    def write_at(self, position: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor") -> None:
        self.keys.index_copy_(1, position, k)
        self.values.index_copy_(1, position, v)

    def attend(self, q: "torch.Tensor", position: "torch.Tensor", span: int, scale: float) -> "torch.Tensor":
        return decode_attention(q, self.keys, self.values, position, span, scale)

    def read(self, span: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        return self.keys[:, :span], self.values[:, :span]


class QuantizedLayer:
    def __init__(self, kv_heads: int, capacity: int, head_dim: int, dtype, device, bits: int, kernels: bool = False):
        import torch

        self.bits = bits
        self.kernels = kernels
        groups = head_dim // KV_GROUP_SIZE

        def parts():     # codes, scales, biases
            return [torch.zeros(kv_heads, capacity, head_dim * bits // 8, dtype=torch.uint8, device=device),
                    torch.zeros(kv_heads, capacity, groups, dtype=dtype, device=device),
                    torch.zeros(kv_heads, capacity, groups, dtype=dtype, device=device)]

        self.keys, self.values = parts(), parts()

    @property
    def device(self):
        return self.keys[0].device

    @property
    def tensors(self) -> list["torch.Tensor"]:
        return self.keys + self.values

    def write(self, start: int, k: "torch.Tensor", v: "torch.Tensor") -> None:
        end = start + k.shape[1]
        for stored, x in ((self.keys, k), (self.values, v)):
            for part, new in zip(stored, quantize(x, self.bits)):
                part[:, start:end].copy_(new)

    def write_at(self, position: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor") -> None:
        if not self.kernels:
            for stored, x in ((self.keys, k), (self.values, v)):
                for part, new in zip(stored, quantize(x, self.bits)):
                    part.index_copy_(1, position, new)
            return
        from runner_cuda.fast.kv_kernels import quantized_write

        kv_heads, capacity, groups = self.keys[1].shape          # the scales' shape
        quantized_write[(kv_heads * groups, 2)](k.contiguous(), v.contiguous(), *self.keys, *self.values, position, capacity,
                                                GROUPS=groups, BITS=self.bits, GROUP=KV_GROUP_SIZE)

    def attend(self, q: "torch.Tensor", position: "torch.Tensor", span: int, scale: float) -> "torch.Tensor":
        return decode_attention(q, self.keys, self.values, position, span, scale, self.bits)

    def read(self, span: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """K and V of the first `span` positions dequantized into a new tensor each, KV_READ_BLOCK
        positions at a time: beyond the two results a read holds one block's temporaries
        (plan_rules.kv_read_bytes counts both)."""
        return tuple(dequantize_blocks(*(part[:, :span] for part in parts), self.bits)
                     for parts in (self.keys, self.values))


def static_layer(kv_heads: int, capacity: int, head_dim: int, dtype, device, kv_bits: int | None = None,
                 kernels: bool = False):
    """One layer's static cache: in the compute dtype, or quantized to `kv_bits` (8 or 4), written
    by a Triton kernel with `kernels`."""
    if kv_bits is None:
        return PlainLayer(kv_heads, capacity, head_dim, dtype, device)
    return QuantizedLayer(kv_heads, capacity, head_dim, dtype, device, kv_bits, kernels)

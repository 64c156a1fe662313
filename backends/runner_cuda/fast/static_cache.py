"""The fast decoder's static KV cache: one layer's K and V, preallocated for every position.

    layer = static_layer(kv_heads, capacity, head_dim, dtype, device, kv_bits)
    layer.write(start, k, v)              # prefill: k, v [kv_heads, T, head_dim] at start..start+T-1
    layer.write_at(position, k, v)        # a decode step: position a [1] device tensor (graph-safe)
    keys, values = layer.read(span)       # [kv_heads, span, head_dim] in the compute dtype
    layer.tensors                         # what it holds: its bytes are the plan's (budget.kv_cache_bytes)

`PlainLayer` holds K and V in the compute dtype; `read` returns views. `QuantizedLayer`
(`--kv-bits 8|4`) holds each as codes, scales and biases in the format of the ordinary loop's cache
(runner_cuda.kv_cache.quantize: a scale and a bias per 64 values, in the compute dtype): K/V are
quantized as they are written, and `read` dequantizes the positions a step attends over, so the
attention sees exactly the values the ordinary loop's attention sees. Every operation is a device
kernel (no host synchronisation), so a decode step with it can be captured in a CUDA graph.

Next step on the GPU: the split-KV Triton kernel (attention.py) could read the codes directly,
instead of attending over a dequantized copy of the span (that copy is scratch memory of about
6 bytes a cached value per layer while it lives, and reads the cache twice).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner_cuda.kv_cache import dequantize, quantize

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

    def read(self, span: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        return self.keys[:, :span], self.values[:, :span]


class QuantizedLayer:
    def __init__(self, kv_heads: int, capacity: int, head_dim: int, dtype, device, bits: int):
        import torch

        from runner.budget import KV_GROUP_SIZE

        self.bits = bits
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
        for stored, x in ((self.keys, k), (self.values, v)):
            for part, new in zip(stored, quantize(x, self.bits)):
                part.index_copy_(1, position, new)

    def read(self, span: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        return (dequantize(*(part[:, :span] for part in self.keys), self.bits),
                dequantize(*(part[:, :span] for part in self.values), self.bits))


def static_layer(kv_heads: int, capacity: int, head_dim: int, dtype, device, kv_bits: int | None = None):
    """One layer's static cache: in the compute dtype, or quantized to `kv_bits` (8 or 4)."""
    if kv_bits is None:
        return PlainLayer(kv_heads, capacity, head_dim, dtype, device)
    return QuantizedLayer(kv_heads, capacity, head_dim, dtype, device, kv_bits)

"""Fast paths for the CUDA backend: a static KV cache with CUDA-graph decode steps, a fused NF4
dequantize-GEMV Triton kernel, and the NF4 reload cache. Each switches on only where CUDA is
present; on CPU the ordinary loop runs. Nothing heavy is imported here.

The Session asks once, after loading:

    decoder = fast.decoder_for(model, max_len=context)   # a FastDecoder, or None
"""

from __future__ import annotations

import os


def enabled() -> bool:
    """False when RUNNER_FAST=0 (to measure or debug the ordinary loop)."""
    return os.environ.get("RUNNER_FAST", "1") != "0"


def decoder_for(model, max_len: int):
    """A FastDecoder for `model` (static cache, CUDA graphs, fused NF4 GEMV), or None where the
    fast path does not apply: no CUDA, a model spread over devices, an architecture it does not
    know, or RUNNER_FAST=0."""
    if not enabled():
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    from runner_cuda.fast.decoder import FastDecoder, Unsupported

    try:
        decoder = FastDecoder(model, max_len)
    except Unsupported:
        return None
    if decoder.device.type != "cuda":
        return None
    return decoder

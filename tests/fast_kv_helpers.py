"""What the fast path's quantized-KV tests share (tests/test_cuda_fast_kv.py on the CPU,
tests/test_cuda_fast_kv_gpu.py on a GPU): a tiny Llama whose heads are one KV quantization group,
and greedy decoding through the ordinary loop's quantized cache and through the fast decoder; and
for the Triton kernels' CPU tests, the check that Triton's interpreter runs them."""

from __future__ import annotations

import json
from pathlib import Path


def write_kv_llama(tiny_llama_dir: Path, folder: Path) -> Path:
    """conftest's tiny random Llama (2 layers, SmolLM2's vocabulary and tokenizer) with heads of 64
    values (one quantization group) and grouped-query attention (4 heads, 2 KV heads), float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.update(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32).eval().save_pretrained(str(folder), safe_serialization=True)
    for item in tiny_llama_dir.iterdir():
        if not (folder / item.name).exists():
            (folder / item.name).symlink_to(item.resolve())
    return folder


def prompt(count: int, vocab: int, seed: int = 0) -> list[int]:
    import torch

    return torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def plain_greedy(model, ids: list[int], steps: int, kv_bits: int | None, chunk: int = 16):
    """The ordinary loop (session.forward_in_chunks over runner_cuda.kv_cache's quantized cache, or
    transformers' DynamicCache): the prefill's and each greedy step's float32 logits, and the tokens."""
    import torch
    from transformers import DynamicCache

    from runner_cuda.kv_cache import quantized_cache
    from runner_cuda.session import cache_argument, forward_in_chunks

    cache = DynamicCache(config=model.config) if kv_bits is None else quantized_cache(model.config, kv_bits)
    name = cache_argument(model)
    device = model.lm_head.weight.device
    logits = [forward_in_chunks(model, torch.tensor([ids], device=device), cache, chunk, name)[0, -1].float()]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(forward_in_chunks(model, torch.tensor([[tokens[-1]]], device=device), cache, chunk, name)[0, -1].float())
    return torch.stack(logits), tokens


def fast_greedy(decoder, ids: list[int], steps: int):
    """The same through a FastDecoder (from its current length: after `trim`, appended)."""
    import torch

    logits = [decoder.prefill(ids).clone()]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(decoder.step(tokens[-1]).clone())
    return torch.stack(logits), tokens


def skip_unless_interpreted(compiled_tests: str) -> None:
    """Without a GPU the Triton kernels run in Triton's interpreter (conftest.py sets
    TRITON_INTERPRET before anything imports Triton); with one, `compiled_tests` test them compiled."""
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip(f"on a GPU the compiled kernels are tested ({compiled_tests})")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        pytest.skip("Triton was imported before TRITON_INTERPRET was set: run this file on its own")


def check_rope_and_write(device: str, dtype, heads: int = 32, kv_heads: int = 8, dim: int = 128, capacity: int = 333):
    """kv_kernels.rope_and_write against what it replaces in a decode step, bit for bit: the
    decoder's RoPE (transformers' rounding) on q and k, and a PlainLayer's write_at of k and v at a
    position read on the device; nothing else in the cache written."""
    import torch

    from runner_cuda.fast.decoder import _rope
    from runner_cuda.fast.kv_kernels import rope_and_write
    from runner_cuda.fast.static_cache import PlainLayer

    generator = torch.Generator(device=device).manual_seed(dim)
    layer = PlainLayer(kv_heads, capacity, dim, dtype, device)
    for tensor in layer.tensors:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, device=device))
    angles = torch.rand(capacity, dim // 2, generator=generator, device=device) * 6.3
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    for position in (0, 7, capacity - 1):
        before = [tensor.clone() for tensor in layer.tensors]
        qkv = (torch.randn(1, (heads + 2 * kv_heads) * dim, generator=generator, device=device) * 2).to(dtype)
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        c, s = cos[position:position + 1], sin[position:position + 1]      # [1, dim]: the kernel reads the row
        rotated = rope_and_write(q, k, v, cos, sin, layer.keys, layer.values, torch.tensor([position], device=device))
        assert torch.equal(rotated, _rope(q.view(heads, dim), c, s))
        assert torch.equal(layer.keys[:, position], _rope(k.view(kv_heads, dim), c, s))
        assert torch.equal(layer.values[:, position], v.view(kv_heads, dim))
        for tensor, old in zip(layer.tensors, before):
            assert torch.equal(tensor[:, :position], old[:, :position])
            assert torch.equal(tensor[:, position + 1:], old[:, position + 1:])

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

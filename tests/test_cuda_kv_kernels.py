"""The fast path's Triton KV kernels (runner_cuda.fast.kv_kernels) on the CPU, run by Triton's
interpreter (TRITON_INTERPRET=1): the split-KV decode attention reading a quantized cache's codes
(kv8, kv4) against a float64 reference on random data, over spans that are and are not multiples
of its block, for the 8B's grouped-query shape (8 KV heads of 128, 4 query heads each) and a
head of 64 (one quantization group); the quantized write of a step's K and V against
runner_cuda.kv_cache.quantize, bit for bit; RoPE with the plain cache's write in one launch against
the two it replaces, bit for bit (alone and in a bf16 decoder); and a decoder using the split-KV
kernels against the SDPA path.

The interpreter computes in numpy: float16 here (its bfloat16 products and roundings are not the
GPU's), so these check the indexing, masking and arithmetic; tests/test_cuda_attention_gpu.py and
test_cuda_fast_kv_gpu.py check the compiled kernels in bfloat16 on a GPU."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fast_kv_helpers import skip_unless_interpreted  # noqa: E402
from runner_cuda.kv_cache import dequantize, quantize  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    skip_unless_interpreted("test_cuda_attention_gpu.py, test_cuda_fast_kv_gpu.py")


def quantized_cache(kv_heads, capacity, dim, bits, generator, position):
    """Codes, scales and biases of random K or V; the positions after `position` hold what the
    attention must not read (NaN scales and biases, random codes)."""
    codes, scales, biases = quantize(torch.randn(kv_heads, capacity, dim, generator=generator).half(), bits)
    scales[:, position + 1:] = float("nan")
    biases[:, position + 1:] = float("nan")
    return [codes.contiguous(), scales.contiguous(), biases.contiguous()]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kv_heads,rep,dim", [(8, 4, 128), (2, 16, 64)])
@pytest.mark.parametrize("capacity,span,position", [
    (300, 256, 0), (300, 256, 200),
    pytest.param(1000, 1000, 999, marks=pytest.mark.slow), pytest.param(1100, 1024, 517, marks=pytest.mark.slow)])
def test_attention_over_codes_matches_float64_reference(monkeypatch, bits, kv_heads, rep, dim, capacity, span, position):
    """Within float16 rounding of a float64 reference over the dequantized values, and exactly
    the plain cache's kernel's numbers over a dequantized copy, launched alike (the same values,
    the same sums)."""
    from runner_cuda.fast import attention
    from runner_cuda.fast.attention import decode_attention

    monkeypatch.setitem(attention.LAUNCH, None, attention.LAUNCH[bits])

    generator = torch.Generator().manual_seed(capacity + position + bits + dim)
    q = torch.randn(kv_heads, rep, dim, generator=generator).half()
    keys = quantized_cache(kv_heads, capacity, dim, bits, generator, position)
    values = quantized_cache(kv_heads, capacity, dim, bits, generator, position)
    scale = dim**-0.5
    got = decode_attention(q, keys, values, torch.tensor([position]), span, scale, bits)
    assert got.shape == q.shape and got.dtype == torch.float16 and not got.isnan().any()
    k, v = (dequantize(*(part[:, :position + 1] for part in parts), bits).double() for parts in (keys, values))
    reference = torch.softmax(q.double() @ k.transpose(1, 2) * scale, -1) @ v
    assert ((got.double() - reference).norm() / reference.norm()).item() < 2e-3      # float16: ~3e-4 measured
    plain = [torch.nan_to_num(dequantize(*part, bits)) for part in (keys, values)]
    assert torch.equal(decode_attention(q, *plain, torch.tensor([position]), span, scale), got)


def test_attention_refuses_a_cache_it_cannot_read():
    from runner_cuda.fast.attention import decode_attention

    q = torch.zeros(2, 4, 128, dtype=torch.float16)
    keys = quantize(torch.zeros(2, 64, 128, dtype=torch.float16), 8)
    with pytest.raises(ValueError, match="8- or 4-bit"):
        decode_attention(q, keys, keys, torch.tensor([0]), 64, 1.0, 2)
    with pytest.raises(ValueError, match="as static_cache's layers hold them"):
        decode_attention(q, keys, keys, torch.tensor([0]), 64, 1.0, 4)       # 8-bit codes read as 4-bit
    with pytest.raises(ValueError, match="as static_cache's layers hold them"):
        decode_attention(q.float(), keys, keys, torch.tensor([0]), 64, 1.0, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_write_is_quantize_bit_for_bit(dtype, bits):
    """A step's K and V written at a position read on the device: the codes, scales and biases
    of kv_cache.quantize (a constant group too: scale 0), and nothing else in the cache changed."""
    from runner_cuda.fast.static_cache import QuantizedLayer

    layer = QuantizedLayer(8, 37, 128, dtype, "cpu", bits, kernels=True)
    generator = torch.Generator().manual_seed(bits)
    for part in layer.tensors:
        part.copy_(torch.randint(0, 200, part.shape, generator=generator))
    for position in (0, 5, 36):
        before = [part.clone() for part in layer.tensors]
        k = (torch.randn(8, 1, 128, generator=generator) * 3).to(dtype)
        v = torch.randn(8, 1, 128, generator=generator).to(dtype)
        k[0, 0, :64] = 1.5
        layer.write_at(torch.tensor([position]), k, v)
        expected = [*quantize(k, bits), *quantize(v, bits)]
        for part, old, new in zip(layer.tensors, before, expected):
            assert torch.equal(part[:, position:position + 1], new)
            assert torch.equal(part[:, :position], old[:, :position]) and torch.equal(part[:, position + 1:], old[:, position + 1:])


def test_rope_and_write_is_rope_then_write_at_bit_for_bit():
    from fast_kv_helpers import check_rope_and_write

    check_rope_and_write("cpu", torch.bfloat16)
    check_rope_and_write("cpu", torch.bfloat16, heads=4, kv_heads=2, dim=64, capacity=9)


@pytest.mark.slow
@pytest.mark.parametrize("kv_bits", [8, 4])
def test_decoder_with_the_kernels_is_the_sdpa_path(kv_llama_dir, kv_bits):
    """A float16 tiny Llama (heads of 64, grouped-query attention) decoded eagerly with the split-KV
    attention and the quantized write (interpreted) and with SDPA over the dequantized span: the
    same greedy tokens, logits within float16 rounding (and what that moves across a code's
    boundary)."""
    from transformers import AutoModelForCausalLM

    from fast_kv_helpers import fast_greedy, prompt
    from runner_cuda.fast.decoder import FastDecoder

    model = AutoModelForCausalLM.from_pretrained(str(kv_llama_dir), dtype=torch.float16).eval()
    ids = prompt(70, model.config.vocab_size, seed=5)

    def decoder(split_kv):
        return FastDecoder(model, max_len=300, use_graphs=False, compile_ops=False, prefill_chunk=32, kv_bits=kv_bits,
                           split_kv=split_kv)

    kernels = decoder(True)
    assert kernels.cache[0].kernels
    got, tokens = fast_greedy(kernels, ids, 12)
    expected, expected_tokens = fast_greedy(decoder(False), ids, 12)
    assert tokens == expected_tokens
    # measured 7e-3 (kv4): the two attentions round their sums apart, and a K or V one float16
    # step apart in the next layer or step can land across a 4-bit code's boundary (1/15 of its range)
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.slow
def test_decoder_gives_the_same_logits_wherever_rope_runs(kv_llama_dir):
    """A bf16 tiny Llama with a plain cache decoded with RoPE and the cache write in one launch (the
    default) and apart (both interpreted, split-KV attention): the same logits, bit for bit.
    (Against SDPA in bf16 the interpreter's attention is not the GPU's: tests/test_cuda_fast_kv_gpu.py.)
    In q/k/v's NF4 launch ("qkv") it needs that CUDA kernel: tests/test_cuda_fast_gpu.py."""
    from transformers import AutoModelForCausalLM

    from fast_kv_helpers import fast_greedy, prompt
    from runner_cuda.fast.decoder import FastDecoder

    model = AutoModelForCausalLM.from_pretrained(str(kv_llama_dir), dtype=torch.bfloat16).eval()
    with pytest.raises(ValueError, match="fused NF4 kernels"):
        FastDecoder(model, max_len=300, use_graphs=False, compile_ops=False, split_kv=True, rope="qkv")
    ids = prompt(70, model.config.vocab_size, seed=5)
    runs = []
    for place in ("write", "apart"):
        decoder = FastDecoder(model, max_len=300, use_graphs=False, compile_ops=False, prefill_chunk=32, split_kv=True,
                              rope=None if place == "write" else place)
        assert decoder.rope == place
        runs.append(fast_greedy(decoder, ids, 12))
    for logits, tokens in runs[1:]:
        assert tokens == runs[0][1]
        assert torch.equal(logits, runs[0][0])


@pytest.fixture(scope="module")
def kv_llama_dir(tiny_llama_dir, tmp_path_factory):
    from fast_kv_helpers import write_kv_llama

    return write_kv_llama(tiny_llama_dir, tmp_path_factory.mktemp("kv-llama"))

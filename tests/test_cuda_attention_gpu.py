"""The split-KV decode attention (runner_cuda.fast.attention) on the GPU: within bf16 rounding of a
float64 reference, as close to it as torch's SDPA, at short and long spans, positions inside a
bucket masked, for Llama-3 70B/405B (16 query heads per KV head) and 8B (4); and over a quantized
cache (kv8, kv4) read as stored. Run with `pytest -m gpu`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("rep", [16, 4])
@pytest.mark.parametrize("capacity,span,position", [(512, 256, 0), (512, 256, 255), (8192, 8192, 5000),
                                                    (122624, 122624, 122447), (131072, 65536, 40000)])
def test_split_kv_attention_matches_reference(rep, capacity, span, position):
    from runner_cuda.fast.attention import decode_attention

    generator = torch.Generator(device="cuda").manual_seed(capacity + position + rep)
    kv, dim = 8, 128
    q = torch.randn(kv, rep, dim, device="cuda", generator=generator).to(torch.bfloat16)
    keys = torch.randn(kv, capacity, dim, device="cuda", generator=generator).to(torch.bfloat16)
    values = torch.randn(kv, capacity, dim, device="cuda", generator=generator).to(torch.bfloat16)
    # positions after `position` hold garbage that must not count
    keys[:, position + 1:] = 1e4
    values[:, position + 1:] = float("nan")
    scale = dim**-0.5
    got = decode_attention(q, keys, values, torch.tensor([position], device="cuda"), span, scale)
    assert got.shape == q.shape and got.dtype == torch.bfloat16 and not got.isnan().any()
    k, v = keys[:, :position + 1].double(), values[:, :position + 1].double()
    reference = torch.softmax(q.double() @ k.transpose(1, 2) * scale, -1) @ v
    visible = torch.arange(span, device="cuda") <= position
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q[None], keys[None, :, :span], torch.nan_to_num(values[None, :, :span]), attn_mask=visible.view(1, 1, 1, span),
        scale=scale)[0]

    def relative(a):
        return ((a.double() - reference).norm() / reference.norm()).item()

    print("split-KV", relative(got), "SDPA", relative(sdpa))
    assert relative(got) < 1e-2
    assert relative(got) <= 2 * relative(sdpa) + 1e-3


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("capacity,span,position", [(512, 256, 255), (8192, 8192, 5000), (10000, 8192, 8100),
                                                    (122624, 122624, 122447), (131072, 65536, 40000)])
def test_split_kv_attention_over_codes_matches_reference(bits, capacity, span, position):
    """A quantized cache (--kv-bits) read as stored: within bf16 rounding of a float64 reference
    over its exact values (code x scale + bias), as close to it as SDPA over a dequantized bf16
    copy; positions after `position` hold NaN scales and biases that must not count."""
    from runner_cuda.fast import attention
    from runner_cuda.kv_cache import dequantize, quantize

    generator = torch.Generator(device="cuda").manual_seed(capacity + position + bits)
    kv, rep, dim = 8, 4, 128
    q = torch.randn(kv, rep, dim, device="cuda", generator=generator).to(torch.bfloat16)
    keys, values = (list(quantize(torch.randn(kv, capacity, dim, device="cuda", generator=generator).to(torch.bfloat16),
                                  bits)) for _ in range(2))
    for part in keys[1:] + values[1:]:
        part[:, position + 1:] = float("nan")
    scale = dim**-0.5
    got = attention.decode_attention(q, keys, values, torch.tensor([position], device="cuda"), span, scale, bits)
    assert got.shape == q.shape and got.dtype == torch.bfloat16 and not got.isnan().any()
    k, v = (dequantize(parts[0][:, :position + 1], parts[1][:, :position + 1].double(), parts[2][:, :position + 1].double(),
                       bits) for parts in (keys, values))
    reference = torch.softmax(q.double() @ k.transpose(1, 2) * scale, -1) @ v
    k, v = (torch.nan_to_num(dequantize(*(part[:, :span] for part in parts), bits)) for parts in (keys, values))
    visible = torch.arange(span, device="cuda") <= position
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=visible.view(1, 1, 1, span), scale=scale)[0]

    def relative(a):
        return ((a.double() - reference).norm() / reference.norm()).item()

    print(f"kv{bits} split-KV", relative(got), "SDPA", relative(sdpa))
    assert relative(got) < 1e-2
    assert relative(got) <= 2 * relative(sdpa) + 1e-3

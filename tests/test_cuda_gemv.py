"""The fast path's batch-1 Triton GEMV for BF16/FP16 weights (runner_cuda.fast.gemv) on the CPU, run
by Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py without a GPU): every configuration
against a float64 reference on random data, over shapes whose rows and columns are and are not
multiples of its blocks, into a poisoned output with guards on both sides; its refusals; and a
float16 decoder using it for each layer's q/k/v, o, gate/up and down in its decode steps (and not in
its prefill) with the same tokens and logits as cuBLAS's (here torch's) projections.

The interpreter computes in numpy: float16 is exact enough to hold the kernel to its rounding,
bfloat16 only loosely (its bf16 roundings are not the GPU's); tests/test_cuda_gemv_gpu.py checks the
compiled kernel in bf16, inside CUDA graphs, and the sweep that picks it over cuBLAS."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fast_kv_helpers import fast_greedy, skip_unless_interpreted  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    skip_unless_interpreted("test_cuda_gemv_gpu.py")


def relative(got, reference) -> float:
    return ((got.double() - reference).norm() / reference.norm()).item()


def from_gemv():
    from runner_cuda.fast import gemv

    return gemv


# (N, K): one row; rows and columns under one block; odd both; a K just past a block; many programs
SHAPES = [(1, 7), (37, 513), (130, 1030), (64, 64), (200, 1024), (19, 2048)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_every_configuration_matches_float64(shape, bias):
    """Within float16 rounding of x @ W.T + b in float64 (of the same float16 values), every output
    written, nothing beside the output touched."""
    gemv = from_gemv()
    n, k = shape
    generator = torch.Generator().manual_seed(n * k + bias)
    weight = (torch.randn(n, k, generator=generator) * 0.05).half()
    x = torch.randn(1, k, generator=generator).half()
    b = torch.randn(n, generator=generator).half() if bias else None
    reference = x.double() @ weight.double().T + (b.double() if bias else 0)
    for config in gemv.CONFIGS:
        buffer = torch.full((n + 2,), float("nan"), dtype=torch.float16)
        got = gemv.gemv(weight, x, b, config, out=buffer[1:-1])
        assert got.data_ptr() == buffer[1:-1].data_ptr() and got.dtype == torch.float16
        assert not got.isnan().any() and buffer[0].isnan() and buffer[-1].isnan(), config
        # the output's own rounding: 2^-11 of each value at most, ~3e-4 of the norm
        assert relative(got.view(1, n), reference) < 6e-4, (config, relative(got.view(1, n), reference))


@pytest.mark.parametrize("shape", [(37, 513), (64, 64)])
def test_bfloat16_in_and_out(shape):
    """A bf16 weight and row give a bf16 row near the float64 product (the interpreter's bf16 is
    looser than the GPU's: 5e-3 seen; test_cuda_gemv_gpu.py holds the compiled kernel to cuBLAS's)."""
    gemv = from_gemv()
    n, k = shape
    generator = torch.Generator().manual_seed(n + k)
    weight = (torch.randn(n, k, generator=generator) * 0.05).bfloat16()
    x = torch.randn(k, generator=generator).bfloat16()
    got = gemv.gemv(weight, x)
    assert got.shape == (1, n) and got.dtype == torch.bfloat16
    assert relative(got, x.double() @ weight.double().T) < 1.5e-2


def test_refuses_what_it_cannot_read():
    gemv = from_gemv()
    weight = torch.randn(32, 64).half()
    x = torch.randn(1, 64).half()
    assert gemv.takes(weight, torch.float16)
    for other, dtype in ((weight.float(), torch.float32), (weight, torch.bfloat16), (weight.t(), torch.float16)):
        assert not gemv.takes(other, dtype)
    with pytest.raises(ValueError, match="gemv takes"):
        gemv.gemv(weight.float(), x.float())
    with pytest.raises(ValueError, match="gemv takes"):
        gemv.gemv(weight, x.bfloat16())
    with pytest.raises(ValueError, match="gemv takes"):
        gemv.gemv(weight, torch.randn(1, 63).half())
    with pytest.raises(ValueError, match="gemv takes"):
        gemv.gemv(weight, torch.randn(64, 2).half()[:, 0])          # not contiguous


@pytest.fixture(scope="module")
def half_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float16).eval()


def decoder(model, **options):
    from runner_cuda.fast.decoder import FastDecoder

    return FastDecoder(model, max_len=96, use_graphs=False, compile_ops=False, fuse_dense=True, prefill_chunk=16,
                       **options)


def test_decoder_runs_its_projections_through_the_gemv(half_model, monkeypatch):
    """Every decode step calls the kernel once for each layer's fused q/k/v, o, fused gate/up and
    down, on those weights, and the prefill not at all; the tokens and logits are those of the same
    decoder with torch's projections (cuBLAS on a GPU)."""
    gemv = from_gemv()
    calls = []
    kernel = gemv.gemv

    def counted(weight, x, bias=None, config=gemv.DEFAULT, out=None):
        calls.append((weight.data_ptr(), tuple(weight.shape), config))
        return kernel(weight, x, bias, config, out)

    monkeypatch.setattr(gemv, "gemv", counted)
    ids = torch.randint(3, half_model.config.vocab_size, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    expected, expected_tokens = fast_greedy(decoder(half_model, gemv=False), ids, 10)
    assert not calls
    mine = decoder(half_model, gemv=True)
    assert mine.gemv_choice == {group: "8x512x4" for group in ("qkv", "o", "gate_up", "down")}
    mine.prefill(ids)
    assert not calls                                          # prefill keeps torch's projections
    mine.reset()
    got, tokens = fast_greedy(mine, ids, 10)
    layers = mine.layers
    config = half_model.config
    qkv_rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    per_step = []
    for index, layer in enumerate(layers):
        per_step += [(mine.qkv[index][0].data_ptr(), (qkv_rows, config.hidden_size)),
                     (layer.self_attn.o_proj.weight.data_ptr(), (config.hidden_size, config.hidden_size)),
                     (mine.gate_up[index][0].data_ptr(), (2 * config.intermediate_size, config.hidden_size)),
                     (layer.mlp.down_proj.weight.data_ptr(), (config.hidden_size, config.intermediate_size))]
    assert [call[:2] for call in calls] == per_step * 10 and {call[2] for call in calls} == {gemv.DEFAULT}
    assert tokens == expected_tokens
    assert relative(got, expected.double()) < 2e-3          # float16 sums in another order: ~1e-4 seen


def test_decoder_keeps_torchs_projections_where_the_gemv_does_not_apply(tiny_llama_dir, half_model):
    """Off on the CPU by default, off when asked, off without fused q/k/v and gate/up, and for a
    float32 model (the kernel reads BF16 and FP16 weights)."""
    from transformers import AutoModelForCausalLM

    assert decoder(half_model).gemv is None and decoder(half_model).gemv_choice == {}
    assert decoder(half_model, gemv=False).gemv is None
    from runner_cuda.fast.decoder import FastDecoder

    assert FastDecoder(half_model, max_len=96, use_graphs=False, compile_ops=False, fuse_dense=False, gemv=True).gemv is None
    full = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    assert decoder(full, gemv=True).gemv is None

"""The fast decoder split into segments on the GPU: cut on one GPU (one graph per segment on the same
device), and over two GPUs where two are visible (accelerate's device map, as a load of a model
bigger than one GPU places it), NF4 (runner's kernels and bitsandbytes') and BF16: the same greedy
tokens and logits as the unsplit decoder on one GPU. Skipped without CUDA; run with `pytest -m gpu`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

STEPS = 300           # after a 300-token prompt: crosses the 512 -> 1024 graph bucket


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 4-layer Llama (hidden 512, 8 heads, 2 KV heads) saved in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("split-llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048, initializer_range=0.05)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(folder))
    return folder


def load(folder, quant: str, device_map):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = None
    if quant == "nf4":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=quantization, dtype=torch.bfloat16,
                                                device_map=device_map).eval()


TWO_GPUS = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
            "model.layers.3": 1, "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}


def greedy(decoder, prompt: list[int], steps: int = STEPS):
    logits = [decoder.prefill(prompt).clone()]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(decoder.step(tokens[-1]).clone())
    return torch.stack(logits).cpu(), tokens


def prompt(count: int = 300, seed: int = 1) -> list[int]:
    return torch.randint(0, 4096, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_same_reply(split, whole):
    """Identical greedy tokens and logits within bf16 rounding (a compiled norm that starts a segment
    may sum in another order than the add + norm it replaces)."""
    (got, tokens), (expected, expected_tokens) = split, whole
    difference = ((got - expected).norm() / expected.norm()).item()
    print("split vs unsplit: relative logits difference", difference, "bit-identical", torch.equal(got, expected))
    assert tokens == expected_tokens
    assert difference < 1e-3


@pytest.mark.parametrize("quant,kernel", [("nf4", "cuda"), ("nf4", "bitsandbytes"), ("bf16", None)])
def test_split_on_one_gpu_equals_the_unsplit_decoder(checkpoint, quant, kernel):
    from runner_cuda.fast.decoder import FastDecoder

    model = load(checkpoint, quant, "cuda:0")
    ids = prompt()
    whole = FastDecoder(model, max_len=1024, nf4_kernel=kernel, prefill_chunk=128)
    expected = greedy(whole, ids)
    del whole
    split = FastDecoder(model, max_len=1024, nf4_kernel=kernel, prefill_chunk=128, split_at=(2, "head"))
    assert split.use_graphs and len(split.segments) == 3 and split.devices == [torch.device("cuda:0")]
    assert all(len(segment.graphs) == 0 for segment in split.segments)
    assert_same_reply(greedy(split, ids), expected)
    assert all(set(segment.graphs) == {512, 1024} for segment in split.segments)   # positions 301-600


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("quant,kernel", [("nf4", "cuda"), ("nf4", "bitsandbytes"), ("bf16", None)])
def test_split_over_two_gpus_equals_one_gpu(checkpoint, quant, kernel):
    """Layers 0-1 on cuda:0 and 2-3 with the head on cuda:1: decoder_for takes it (one segment per
    GPU, each layer's KV cache on its GPU) and answers as the same weights on one GPU do."""
    from runner_cuda.fast import decoder_for

    one = load(checkpoint, quant, "cuda:0")
    ids = prompt(seed=2)
    whole = decoder_for(one, 1024, kernel)
    expected = greedy(whole, ids)
    del whole, one
    two = load(checkpoint, quant, TWO_GPUS)
    split = decoder_for(two, 1024, kernel)
    assert split is not None and split.devices == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert [segment.layers for segment in split.segments] == [[0, 1], [2, 3]]
    assert [str(k.device) for k in split.keys] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert split.logits.device == torch.device("cuda:1")
    assert_same_reply(greedy(split, ids), expected)


@pytest.mark.parametrize("mode", ["glu", "residual"])
def test_mma_kernel_at_70b_widths_matches_reference(mode):
    """The tensor-core kernel in the shape it takes for inputs of 8192 and more (16 warps, 4 on a
    tile): gate/up (RMSNorm, SiLU x up inside) and down-like residual launches within bf16 rounding
    of the float32 reference, every output written."""
    import bitsandbytes as bnb

    from runner_cuda.fast.nf4 import linear_reference, nf4_weight_of
    from runner_cuda.fast.nf4_cuda import NF4Mma, mma_shape

    def layer(n, k, seed):
        torch.manual_seed(seed)
        dense = torch.empty(n, k, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
        linear = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
        linear.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=True)
        return nf4_weight_of(linear.cuda())

    def relative(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    k = 8192
    if mode == "glu":
        pair = [layer(4096, k, 1), layer(4096, k, 2)]
        assert mma_shape(pair, True) == (16, 4)
        norm = (1 + 0.1 * torch.randn(k, device="cuda")).to(torch.bfloat16)
        hidden = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        variance = hidden.float().pow(2).mean(-1, keepdim=True)
        normed = norm * (hidden.float() * torch.rsqrt(variance + 1e-5)).to(torch.bfloat16)
        gate, up = (linear_reference(normed, w) for w in pair)
        expected = torch.nn.functional.silu(gate.float()) * up.float()
        out = torch.full((4096,), float("nan"), device="cuda", dtype=torch.bfloat16)
        got = NF4Mma.for_weights(pair, glu=True, norm=norm, eps=1e-5)(hidden, out=out)
    else:
        weight = layer(8192, 28672 // 2, 3)
        assert mma_shape([weight], False) == (16, 4)
        x = torch.randn(1, weight.in_features, device="cuda", dtype=torch.bfloat16)
        residual = torch.randn(8192, device="cuda", dtype=torch.bfloat16)
        expected = residual.float() + linear_reference(x, weight)[0].float()
        got = NF4Mma.for_weights([weight], residual=True)(x, out=residual)
    assert not got.isnan().any()
    assert relative(got, expected) < 5e-3

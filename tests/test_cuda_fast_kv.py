"""The fast decoder's quantized static KV cache (`--kv-bits 8|4`), for real on the CPU: a tiny Llama
(heads of 64 values, grouped-query attention) decoded eagerly by the FastDecoder with kv_bits gives
the ordinary loop's numbers with its quantized cache (runner_cuda.kv_cache: the same quantize and
dequantize, on the same K/V); the static cache's tensors are the plan's KV bytes; a kept, trimmed
cache answers as a fresh one. The CUDA graphs and the Triton attention over it: test_cuda_fast_kv_gpu.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fast_kv_helpers import fast_greedy, plain_greedy, prompt, write_kv_llama  # noqa: E402
from prefix_helpers import QUESTIONS, reply  # noqa: E402
from runner import budget  # noqa: E402
from runner.backend import LoadRequest, Message, get_backend  # noqa: E402
from runner.model import load_spec  # noqa: E402


@pytest.fixture(scope="module")
def kv_llama_dir(tiny_llama_dir, tmp_path_factory):
    return write_kv_llama(tiny_llama_dir, tmp_path_factory.mktemp("kv-llama"))


def load_model(folder, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()


def decoder(model, kv_bits, max_len=300, **options):
    from runner_cuda.fast.decoder import FastDecoder

    return FastDecoder(model, max_len=max_len, use_graphs=False, prefill_chunk=16, kv_bits=kv_bits, **options)


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_fp32_greedy_equals_the_ordinary_loops_quantized_cache(kv_bits_dir_model, kv_bits):
    """A 37-token prompt in chunks of 16, then 40 greedy steps: the ordinary loop's tokens, and its
    logits within 1e-4 (what the unquantized fast path differs by: transformers' attention and
    ours sum in another order). The quantization itself moves them far more (checked here, so the
    comparison would see a cache left unquantized or quantized otherwise)."""
    model = kv_bits_dir_model(torch.float32)
    ids = prompt(37, model.config.vocab_size)
    expected, expected_tokens = plain_greedy(model, ids, 40, kv_bits)
    got, tokens = fast_greedy(decoder(model, kv_bits), ids, 40)
    assert tokens == expected_tokens
    assert (got - expected).abs().max().item() < 1e-4
    unquantized = fast_greedy(decoder(model, None), ids, 40)[0]
    assert (unquantized - expected).abs().max().item() > 0.1


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_bf16_teacher_forced_logits_are_the_ordinary_loops(kv_bits_dir_model, kv_bits):
    """bf16: fed the ordinary loop's greedy tokens, the fast path's logits are the ordinary loop's
    within bf16 rounding. Not bit for bit: a K or V value one bf16 step apart (the two paths round
    the attention's sums differently, as without quantization: 0.125 here) can fall on the other
    side of a code's boundary, which moves it by a whole quantization step (1/255 or 1/15 of its
    group's range). Measured: 0.16 (kv8) and 0.41 (kv4) at most, on logits up to 12; the
    quantization itself moves them by 0.53 and 8.0."""
    model = kv_bits_dir_model(torch.bfloat16)
    ids = prompt(37, model.config.vocab_size)
    expected, tokens = plain_greedy(model, ids, 30, kv_bits)
    fast = decoder(model, kv_bits)
    got = torch.stack([fast.prefill(ids).clone()] + [fast.step(token).clone() for token in tokens[:-1]])
    expected = expected[:-1]
    assert ((got - expected).norm() / expected.norm()).item() < 0.02
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9


@pytest.fixture(scope="module")
def kv_bits_dir_model(kv_llama_dir):
    models = {}

    def get(dtype):
        if dtype not in models:
            models[dtype] = load_model(kv_llama_dir, dtype)
        return models[dtype]

    return get


@pytest.mark.parametrize("quant, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_static_cache_holds_the_plans_kv_bytes(kv_llama_dir, kv_bits_dir_model, quant, dtype, kv_bits):
    """Every tensor of the static cache (codes, scales and biases with kv_bits) is the plan's KV
    cache for its positions, byte for byte (budget.kv_cache_bytes, the cuda backend's rules)."""
    spec = load_spec(str(kv_llama_dir))
    fast = decoder(kv_bits_dir_model(dtype), kv_bits, max_len=200)
    tensors = fast.keys + fast.values
    assert len({t.data_ptr() for t in tensors}) == len(tensors) == spec.num_layers * (2 if kv_bits is None else 6)
    held = sum(t.numel() * t.element_size() for t in tensors)
    assert held == budget.kv_cache_bytes(spec, 200, 1, quant, "cuda", kv_bits)
    if kv_bits is not None:
        assert {t.dtype for t in tensors} == {torch.uint8, dtype}


def test_trimmed_cache_continues_as_a_fresh_one(kv_bits_dir_model):
    """A kept quantized cache cut back (trim) below what it held, then a new prompt appended: the
    same logits and tokens as a fresh decoder given the whole sequence (the positions left beyond
    the cut hold stale codes, masked until overwritten)."""
    model = kv_bits_dir_model(torch.float32)
    first, second = prompt(30, model.config.vocab_size, seed=1), prompt(9, model.config.vocab_size, seed=2)
    kept = decoder(model, 8)
    fast_greedy(kept, first, 20)
    kept.trim(25)
    got, tokens = fast_greedy(kept, second, 12)
    expected, expected_tokens = fast_greedy(decoder(model, 8), first[:25] + second, 12)
    assert tokens == expected_tokens
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("split_at", [(1,), (0, "head")])
def test_split_quantized_decoder_equals_the_unsplit_one(kv_bits_dir_model, split_at):
    """Segments (a layer split over several GPUs, here on one CPU) each holding their layers'
    quantized cache: bit for bit the unsplit decoder's logits."""
    model = kv_bits_dir_model(torch.float32)
    ids = prompt(37, model.config.vocab_size, seed=4)
    expected, expected_tokens = fast_greedy(decoder(model, 4), ids, 30)
    got, tokens = fast_greedy(decoder(model, 4, split_at=split_at), ids, 30)
    assert tokens == expected_tokens and torch.equal(got, expected)


def test_refuses_what_it_cannot_quantize(tiny_llama_dir, kv_bits_dir_model):
    from runner_cuda.fast.decoder import Unsupported

    with pytest.raises(ValueError, match="8 or 4"):
        decoder(kv_bits_dir_model(torch.float32), 3)
    with pytest.raises(Unsupported, match="head size 16"):
        decoder(load_model(tiny_llama_dir, torch.float32), 8)


@pytest.fixture
def kv8_sessions(kv_llama_dir):
    """Two fp32 sessions with an 8-bit KV cache: one decoding through the fast path's quantized
    static cache (eagerly, on the CPU), one through the ordinary loop."""
    from runner_cuda.fast import FastSteps
    from runner_cuda.fast.decoder import FastDecoder

    spec = load_spec(str(kv_llama_dir))
    fast = get_backend("cuda").load(LoadRequest(spec, "fp32", 256, kv_bits=8))
    fast.use_steps(FastSteps(FastDecoder(fast.hf_model, fast.context, use_graphs=False, kv_bits=8)))
    plain = get_backend("cuda").load(LoadRequest(spec, "fp32", 256, kv_bits=8))
    yield fast, plain
    fast.close()
    plain.close()


def test_turns_on_the_kept_quantized_static_cache_answer_as_without_it(kv8_sessions):
    """Four turns of a conversation (each from the kept static kv8 cache), an edited system prompt
    (the cache cut back to the common prefix) and the first version again: every reply is the
    ordinary loop's with a new kv8 cache each time (no reuse there: its kept cache is dropped)."""
    fast, plain = kv8_sessions
    messages = [Message("system", "Be brief.")]
    for turn, question in enumerate(QUESTIONS):
        messages.append(Message("user", question))
        _, tokens, chunks = reply(fast, messages, max_tokens=6)
        plain._kept = None
        _, expected, _ = reply(plain, messages, max_tokens=6)
        assert tokens == expected
        assert (chunks[0].reused_tokens > 0) == (turn > 0)
        messages.append(Message("assistant", "".join(c.text for c in chunks)))
    for system in ("You answer in German.", "Be brief."):
        edited = [Message("system", system)] + messages[1:]
        _, tokens, chunks = reply(fast, edited, max_tokens=6)
        plain._kept = None
        assert tokens == reply(plain, edited, max_tokens=6)[1]
        assert 0 < chunks[0].reused_tokens


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_plan_counts_the_dequantized_copy_a_prefill_attends_over(kv_bits):
    """The cuda plan's activations hold, with --kv-bits, one layer's K and V dequantized for a
    prefill chunk's attention (static_cache.QuantizedLayer.read): 8B at 128k in bf16, 2 x 8 KV
    heads x 131,072 positions x 128 x 2 bytes and one 4,096-position block's temporaries, on each
    GPU that holds layers. A decode step needs none of it (the attention reads the codes)."""
    from runner.hardware import parse_machine
    from runner_cuda.plan_rules import CudaPlanRules

    spec = load_spec("meta-llama/Llama-3.1-8B-Instruct")
    expected = 2 * 8 * 131072 * 128 * 2 + (4 + 2 + (kv_bits == 4)) * 8 * 4096 * 128
    assert CudaPlanRules().kv_read_bytes(spec, 131072, 1, "bf16", kv_bits) == expected
    assert CudaPlanRules().kv_read_bytes(spec, 131072, 1, "bf16", None) == 0
    plain = budget.make_plan(spec, parse_machine("2xA100-80GB"), "bf16", 131072, backend="cuda")
    quantized = budget.make_plan(spec, parse_machine("2xA100-80GB"), "bf16", 131072, backend="cuda", kv_bits=kv_bits)
    gpus = [share for share in quantized.placement if share.kind == "gpu" and share.weights_bytes]
    assert len(gpus) == 2
    assert quantized.overhead_bytes - plain.overhead_bytes == 2 * expected

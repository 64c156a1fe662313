"""The fast decoder split into segments (a layer split over several GPUs), checked on the CPU by
splitting a real Llama-shaped model onto "several devices" that are the same device: every segment
boundary (embedding alone, a boundary between layers, the head alone) gives exactly the logits and
greedy tokens of the unsplit decoder. The same on a GPU, and over two GPUs: test_cuda_fast_split_gpu.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def four_layer_llama():
    """A random 4-layer Llama (hidden 64, 4 heads, 2 KV heads) in float32, built in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, initializer_range=0.2)
    return LlamaForCausalLM(config).to(torch.float32).eval()


def greedy(decoder, prompt: list[int], steps: int):
    """The prefill's and each greedy step's logits, and the tokens picked."""
    logits = [decoder.prefill(prompt).clone()]
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(decoder.step(tokens[-1]).clone())
    return torch.stack(logits), tokens


def prompt(count: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_segments_follow_the_devices_and_the_split():
    from runner_cuda.fast.decoder import _segments

    two_gpus = _segments("cuda:0", ["cuda:0"] * 3 + ["cuda:1"] * 2, "cuda:1")
    assert [(s.device, s.layers, s.head) for s in two_gpus] == [("cuda:0", [0, 1, 2], False), ("cuda:1", [3, 4], True)]
    one = _segments("cpu", ["cpu"] * 4, "cpu")
    assert [(s.layers, s.head) for s in one] == [([0, 1, 2, 3], True)]
    forced = _segments("cpu", ["cpu"] * 4, "cpu", split_at=(0, 2, "head"))
    assert [(s.layers, s.head) for s in forced] == [([], False), ([0, 1], False), ([2, 3], False), ([], True)]
    # the head on a device of its own, the embedding too
    apart = _segments("cuda:0", ["cuda:1"] * 2, "cuda:2")
    assert [(s.device, s.layers, s.head) for s in apart] == [("cuda:0", [], False), ("cuda:1", [0, 1], False),
                                                             ("cuda:2", [], True)]


@pytest.mark.parametrize("split_at", [(2,), (1, 3), (0, "head"), (0, 1, 2, 3, "head")])
def test_split_decoder_equals_the_unsplit_one(four_layer_llama, split_at):
    """Prefill (in chunks, so later chunks attend over the cache) and 40 greedy steps: the same
    float32 logits, bit for bit, and the same tokens, wherever the model is cut; a second reply
    from position 0 and a trimmed cache too."""
    from runner_cuda.fast.decoder import FastDecoder

    model = four_layer_llama
    ids = prompt(37, model.config.vocab_size)
    whole = FastDecoder(model, max_len=300, use_graphs=False, prefill_chunk=16)
    split = FastDecoder(model, max_len=300, use_graphs=False, prefill_chunk=16, split_at=split_at)
    assert len(whole.segments) == 1 and len(split.segments) == len(split_at) + 1
    expected, expected_tokens = greedy(whole, ids, 40)
    got, tokens = greedy(split, ids, 40)
    assert tokens == expected_tokens
    assert torch.equal(got, expected)
    split.reset()
    assert torch.equal(greedy(split, ids, 40)[0], expected)
    # the next turn: keep the prompt, append more
    whole.trim(len(ids))
    split.trim(len(ids))
    more = prompt(5, model.config.vocab_size, seed=1)
    assert torch.equal(greedy(split, more, 6)[0], greedy(whole, more, 6)[0])


def test_split_decoder_matches_transformers_forward(four_layer_llama):
    """The split decoder against transformers' own whole-sequence forward (teacher-forced)."""
    from runner_cuda.fast.decoder import FastDecoder

    model = four_layer_llama
    ids = prompt(30, model.config.vocab_size, seed=2)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].float()[9:]
    decoder = FastDecoder(model, max_len=64, use_graphs=False, split_at=(2,))
    got = torch.stack([decoder.prefill(ids[:10]).clone()] + [decoder.step(t).clone() for t in ids[10:]])
    assert (got - expected).abs().max().item() < 1e-4


def test_split_nf4_decoder_equals_the_unsplit_one(tiny_llama_dir):
    """bitsandbytes' NF4 modules (bf16 activations) cut between the two layers: the same logits."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from runner_cuda.fast.decoder import FastDecoder

    pytest.importorskip("bitsandbytes")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), quantization_config=config, dtype=torch.bfloat16,
                                                 device_map="cpu").eval()
    ids = prompt(20, model.config.vocab_size, seed=3)
    expected, expected_tokens = greedy(FastDecoder(model, max_len=64, use_graphs=False), ids, 12)
    got, tokens = greedy(FastDecoder(model, max_len=64, use_graphs=False, split_at=(1,)), ids, 12)
    assert tokens == expected_tokens and torch.equal(got, expected)


def test_session_streams_the_same_reply_through_a_split_decoder(tiny_llama_dir):
    """The backend's adapter (FastSteps) over a split decoder inside a real CudaSession: the
    ordinary loop's greedy reply, twice (the static caches of both segments restart at 0)."""
    from runner.backend import LoadRequest, Message, Sampling, get_backend
    from runner.model import load_spec
    from runner_cuda.fast import FastSteps
    from runner_cuda.fast.decoder import FastDecoder

    session = get_backend("cuda").load(LoadRequest(load_spec(str(tiny_llama_dir)), "fp32", 128))
    try:
        question = [Message("user", "What is the capital of France?")]
        ordinary = [c.token for c in session.stream(question, Sampling(max_tokens=8))]
        session.use_steps(FastSteps(FastDecoder(session.hf_model, session.context, use_graphs=False, split_at=(1,))))
        first = [c.token for c in session.stream(question, Sampling(max_tokens=8))]
        second = [c.token for c in session.stream(question, Sampling(max_tokens=8))]
        assert first == ordinary and second == ordinary
    finally:
        session.close()

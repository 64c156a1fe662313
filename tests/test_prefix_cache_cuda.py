"""The CUDA backend keeps the KV cache of its last reply, for real on the CPU: the next turn of a
conversation prefills only its new tokens, and the greedy reply is the model's own argmax
continuation (one full forward per token, no cache), through the ordinary loop (transformers'
DynamicCache) and through the fast path's static cache (its FastDecoder, run eagerly here)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from runner.backend import LoadRequest, Message, get_backend  # noqa: E402
from runner.model import load_spec  # noqa: E402
from runner.prefix_cache import reusable_prefix  # noqa: E402
from prefix_helpers import QUESTIONS, argmax_continuation, reply  # noqa: E402


def held_after(prompt: list[int], tokens: list[int]) -> list[int]:
    """The ids a reply leaves in the cache: the prompt and every reply token that went through the
    model, i.e. all but the last one picked (it would only be fed for the step after it)."""
    return prompt + tokens[:-1]


def fast_steps_on_cpu(session):
    """The fast path's steps (static KV cache), eagerly on the CPU, inside the real session."""
    from runner_cuda.fast import FastSteps
    from runner_cuda.fast.decoder import FastDecoder

    session.use_steps(FastSteps(FastDecoder(session.hf_model, session.context, use_graphs=False)))
    return session


@pytest.fixture(scope="module", params=["dynamic", "static"])
def tiny(request, tiny_llama_dir):
    session = get_backend("cuda").load(LoadRequest(load_spec(str(tiny_llama_dir)), "fp32", 256))
    if request.param == "static":
        fast_steps_on_cpu(session)
    yield session
    session.close()


def test_each_turn_prefills_only_its_new_tokens(tiny):
    messages: list[Message] = [Message("system", "Be brief.")]
    held: list[int] = []
    for turn, question in enumerate(QUESTIONS):
        messages.append(Message("user", question))
        prompt, tokens, chunks = reply(tiny, messages, max_tokens=6)
        assert tokens == argmax_continuation(tiny, prompt, len(tokens))
        expected = reusable_prefix(held, prompt)
        assert all(c.reused_tokens == expected for c in chunks)
        assert (expected > 0) == (turn > 0)
        assert chunks[-1].prompt_tokens == len(prompt)
        held = held_after(prompt, tokens)
        messages.append(Message("assistant", "".join(c.text for c in chunks)))


def test_a_cancelled_reply_keeps_what_it_had(tiny):
    first = [Message("user", "Tell me about Paris.")]
    prompt, tokens, chunks = reply(tiny, first, max_tokens=20, cancel_after=3)
    assert chunks[-1].finish_reason == "cancelled" and len(tokens) == 3
    assert tokens == argmax_continuation(tiny, prompt, 3)
    # the chat keeps a stopped reply's text in the conversation: the next turn starts with it
    follow = first + [Message("assistant", "".join(c.text for c in chunks)), Message("user", "Go on.")]
    prompt2, tokens2, chunks2 = reply(tiny, follow, max_tokens=6)
    assert chunks2[0].reused_tokens == reusable_prefix(held_after(prompt, tokens), prompt2) > len(prompt)
    assert tokens2 == argmax_continuation(tiny, prompt2, len(tokens2))


def test_an_edited_system_prompt_reuses_the_common_prefix_only(tiny):
    question = [Message("user", "What is the capital of France?")]
    prompt_a, tokens_a, _ = reply(tiny, [Message("system", "You answer in French.")] + question, max_tokens=5)
    edited = [Message("system", "You answer in German.")] + question
    prompt_b, tokens_b, chunks_b = reply(tiny, edited, max_tokens=5)
    common = reusable_prefix(held_after(prompt_a, tokens_a), prompt_b)
    assert 0 < common < len(prompt_a)                  # the cache was cut back, not extended
    assert chunks_b[0].reused_tokens == common
    assert tokens_b == argmax_continuation(tiny, prompt_b, len(tokens_b))
    # and back again: the cut cache serves the first version's common prefix, same reply as before
    _, again, _ = reply(tiny, [Message("system", "You answer in French.")] + question, max_tokens=5)
    assert again == tokens_a


def test_the_same_prompt_again_gives_the_same_reply(tiny):
    question = [Message("user", "Name a color.")]
    prompt, first, _ = reply(tiny, question, max_tokens=6)
    _, second, chunks = reply(tiny, question, max_tokens=6)
    assert second == first and chunks[0].reused_tokens == len(prompt) - 1


def test_use_steps_drops_the_cache_of_the_old_steps(tiny_llama_dir):
    """A fast path attached after a reply must not be handed the ordinary loop's cache object."""
    session = get_backend("cuda").load(LoadRequest(load_spec(str(tiny_llama_dir)), "fp32", 256))
    try:
        question = [Message("user", "What is the capital of France?")]
        _, ordinary, _ = reply(session, question, max_tokens=6)
        fast_steps_on_cpu(session)
        _, fast, chunks = reply(session, question, max_tokens=6)
        assert fast == ordinary and chunks[0].reused_tokens == 0
    finally:
        session.close()


@pytest.mark.slow
def test_default_model_conversation_is_the_same_with_and_without_reuse(default_model_dir):
    """SmolLM2-135M-Instruct, four turns: with the kept cache, and with a new session per turn."""
    spec = load_spec(str(default_model_dir))

    def load():
        return get_backend("cuda").load(LoadRequest(spec, "fp32", 1024))

    kept, texts, reused = load(), [], []
    try:
        messages: list[Message] = []
        for question in QUESTIONS:
            messages.append(Message("user", question))
            _, tokens, chunks = reply(kept, messages, max_tokens=24)
            texts.append(tokens)
            reused.append(chunks[0].reused_tokens)
            messages.append(Message("assistant", "".join(c.text for c in chunks)))
    finally:
        kept.close()
    assert reused[0] == 0 and all(r > 0 for r in reused[1:])
    fresh_messages: list[Message] = []
    for turn, question in enumerate(QUESTIONS):
        fresh_messages.append(Message("user", question))
        fresh = load()
        try:
            _, tokens, chunks = reply(fresh, fresh_messages, max_tokens=24)
        finally:
            fresh.close()
        assert chunks[0].reused_tokens == 0
        assert tokens == texts[turn], f"turn {turn + 1}"
        fresh_messages.append(Message("assistant", "".join(c.text for c in chunks)))

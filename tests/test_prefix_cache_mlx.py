"""The MLX backend keeps the KV cache of its last reply (mlx-lm's cache objects), for real on the
CPU (mlx[cpu]): the next turn prefills only its new tokens, and each greedy reply is the model's
own argmax continuation (one full forward per token, no cache) and the same as a fresh session's."""

from __future__ import annotations

import pytest

from mlx_helpers import load

pytest.importorskip("mlx_lm")

from runner.backend import Message  # noqa: E402
from runner.prefix_cache import reusable_prefix  # noqa: E402
from prefix_helpers import QUESTIONS, argmax_continuation, reply  # noqa: E402


def held_after(prompt: list[int], tokens: list[int]) -> list[int]:
    """The ids a reply (cut by its length or a cancel) leaves in mlx-lm's cache: mlx-lm runs each
    token through the model before it hands it out, so every reply token is in."""
    return prompt + tokens


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    session = load(tiny_llama_dir, "fp32")
    yield session
    session.close()


def test_each_turn_prefills_only_its_new_tokens(tiny):
    messages = [Message("system", "Be brief.")]
    held: list[int] = []
    for turn, question in enumerate(QUESTIONS):
        messages.append(Message("user", question))
        prompt, tokens, chunks = reply(tiny, messages, max_tokens=6)
        assert chunks[-1].finish_reason == "length"      # (the random model does not stop in 6 tokens)
        assert tokens == argmax_continuation(tiny, prompt, len(tokens)), f"turn {turn + 1}"
        assert all(c.reused_tokens == reusable_prefix(held, prompt) for c in chunks)
        assert (chunks[0].reused_tokens > 0) == (turn > 0)
        assert chunks[-1].prompt_tokens == len(prompt)
        held = held_after(prompt, tokens)
        messages.append(Message("assistant", "".join(c.text for c in chunks)))


def test_a_cancelled_reply_keeps_what_it_had(tiny):
    first = [Message("user", "Tell me about Paris.")]
    prompt, tokens, chunks = reply(tiny, first, max_tokens=20, cancel_after=3)
    assert chunks[-1].finish_reason == "cancelled" and len(tokens) == 3
    follow = first + [Message("assistant", "".join(c.text for c in chunks)), Message("user", "Go on.")]
    prompt2, tokens2, chunks2 = reply(tiny, follow, max_tokens=6)
    assert chunks2[0].reused_tokens == reusable_prefix(held_after(prompt, tokens), prompt2) > len(prompt)
    assert tokens2 == argmax_continuation(tiny, prompt2, len(tokens2))


def test_an_edited_system_prompt_reuses_the_common_prefix_only(tiny):
    question = [Message("user", "What is the capital of France?")]
    prompt_a, tokens_a, _ = reply(tiny, [Message("system", "You answer in French.")] + question, max_tokens=5)
    prompt_b, tokens_b, chunks_b = reply(tiny, [Message("system", "You answer in German.")] + question, max_tokens=5)
    common = reusable_prefix(held_after(prompt_a, tokens_a), prompt_b)
    assert 0 < common < len(prompt_a) and chunks_b[0].reused_tokens == common
    assert tokens_b == argmax_continuation(tiny, prompt_b, len(tokens_b))
    _, again, _ = reply(tiny, [Message("system", "You answer in French.")] + question, max_tokens=5)
    assert again == tokens_a


def test_the_same_prompt_again_gives_the_same_reply(tiny):
    question = [Message("user", "Name a color.")]
    prompt, first, _ = reply(tiny, question, max_tokens=6)
    _, second, chunks = reply(tiny, question, max_tokens=6)
    assert second == first and chunks[0].reused_tokens == len(prompt) - 1


@pytest.mark.slow
def test_default_model_conversation_is_the_same_with_and_without_reuse(default_model_dir):
    """SmolLM2-135M-Instruct in bf16, four turns: with the kept cache, and a new session per turn."""
    kept = load(default_model_dir, "bf16")
    replies, reused = [], []
    try:
        messages: list[Message] = []
        for question in QUESTIONS:
            messages.append(Message("user", question))
            _, tokens, chunks = reply(kept, messages, max_tokens=24)
            replies.append(tokens)
            reused.append(chunks[0].reused_tokens)
            messages.append(Message("assistant", "".join(c.text for c in chunks)))
    finally:
        kept.close()
    assert reused[0] == 0 and all(r > 0 for r in reused[1:])
    messages = []
    for turn, question in enumerate(QUESTIONS):
        messages.append(Message("user", question))
        fresh = load(default_model_dir, "bf16")
        try:
            _, tokens, chunks = reply(fresh, messages, max_tokens=24)
        finally:
            fresh.close()
        assert tokens == replies[turn], f"turn {turn + 1}"
        messages.append(Message("assistant", "".join(c.text for c in chunks)))

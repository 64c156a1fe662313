"""The kept KV cache over `runner launch`: two real ranks on 127.0.0.1 (mlx.launch, ring backend),
each keeping the cache of its own layers, in step with the other. A conversation through rank 0
(the chat app's link): each turn after the first prefills only its new tokens, and every reply is
the single-process model's own greedy continuation (full forwards, no cache)."""

from __future__ import annotations

import os

import psutil
import pytest

from mlx_helpers import load, rank_processes

pytest.importorskip("mlx_lm")

from runner.backend import Message  # noqa: E402
from runner.prefix_cache import reusable_prefix  # noqa: E402
from prefix_helpers import argmax_continuation, reply  # noqa: E402

LOOPBACK = "127.0.0.1,127.0.0.1"


def start(model_dir, quant: str, split: str, kv_bits: int | None = None):
    from runner.model import load_spec
    from runner_mlx.launcher import plan_launch, request_hosts
    from runner_mlx.remote import start_ranks

    hosts = request_hosts(LOOPBACK, None, None, 5, rank0_here=True)
    plan = plan_launch(load_spec(str(model_dir)), quant, 256, hosts, split, kv_bits=kv_bits)
    return start_ranks(plan, rank_timeout=30, grace=5, on_progress=None)


def ranks_left() -> list[psutil.Process]:
    _, alive = psutil.wait_procs(list(rank_processes(os.getpid()).values()), timeout=5)
    return alive


@pytest.mark.slow
def test_two_ranks_keep_their_caches_in_step(tiny_llama_dir):
    local = load(tiny_llama_dir, "fp32")
    remote = start(tiny_llama_dir, "fp32", "pipeline")
    try:
        assert "pipeline split over 2 hosts" in remote.device_summary
        messages = [Message("system", "Be brief.")]
        held: list[int] = []
        for turn, question in enumerate(["What is the capital of France?", "And of Italy?", "Which is larger?"]):
            messages.append(Message("user", question))
            prompt, tokens, chunks = reply(remote, messages, max_tokens=6)
            assert chunks[0].reused_tokens == reusable_prefix(held, prompt)
            assert (chunks[0].reused_tokens > 0) == (turn > 0)
            assert tokens == argmax_continuation(local, prompt, len(tokens)), f"turn {turn + 1}"
            held = prompt + tokens
            messages.append(Message("assistant", "".join(c.text for c in chunks)))
        # Esc after 3 tokens (it reaches the ranks a few tokens later): both stop at the same step
        # and keep the same cache, with every token that was streamed
        prompt, tokens, chunks = reply(remote, messages + [Message("user", "Tell me more.")], max_tokens=150,
                                       cancel_after=3)
        assert chunks[-1].finish_reason == "cancelled"
        messages += [Message("user", "Tell me more."), Message("assistant", "".join(c.text for c in chunks)),
                     Message("user", "Go on.")]
        prompt2, tokens2, chunks2 = reply(remote, messages, max_tokens=6)
        assert chunks2[0].reused_tokens == reusable_prefix(prompt + tokens, prompt2) >= len(prompt)
        assert tokens2 == argmax_continuation(local, prompt2, len(tokens2))
        # an edited system prompt: the caches are cut back to the common prefix on both ranks
        edited = [Message("system", "Be very brief.")] + messages[1:]
        prompt3, tokens3, chunks3 = reply(remote, edited, max_tokens=6)
        assert 0 < chunks3[0].reused_tokens < len(prompt2)
        assert tokens3 == argmax_continuation(local, prompt3, len(tokens3))
    finally:
        remote.close()
        local.close()
    assert not ranks_left()

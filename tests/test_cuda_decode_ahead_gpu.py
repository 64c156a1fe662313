"""Decoding a step ahead on the GPU, through the fast path the backend attaches there (static KV
cache, CUDA graphs): the sampled pick on the device equals torch.multinomial's for the same seed,
and a session decoding ahead answers and keeps its cache exactly as one reading each token before
the next step, over turns ending on an end token, a cancel and max_tokens, greedy and sampled. The
same on the CPU: test_cuda_decode_ahead.py. Skipped without CUDA; run with `pytest -m gpu`."""

from __future__ import annotations

import pytest

from runner.backend import LoadRequest, Message, Sampling, get_backend
from runner.model import load_spec
from prefix_helpers import QUESTIONS
from test_cuda_decode_ahead import greedy_equals_argmax, same_picks_as_multinomial, turns_both_ways
from test_prefix_cache_gpu import word_chat_dir  # noqa: F401  (a fixture)

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_sampled_picks_on_the_gpu_are_multinomials_for_the_same_seed():
    same_picks_as_multinomial("cuda")


def test_greedy_pick_on_the_gpu_is_torch_argmax():
    greedy_equals_argmax("cuda")


@pytest.fixture(scope="module", params=["fp32", "nf4"])
def pair(request, word_chat_dir):  # noqa: F811
    sessions = [get_backend("cuda").load(LoadRequest(load_spec(str(word_chat_dir)), request.param, 512)) for _ in range(2)]
    ahead, in_turn = sessions
    assert "fast decode" in ahead.device_summary and ahead.step_ahead, ahead.device_summary
    in_turn.step_ahead = False
    yield ahead, in_turn
    for session in sessions:
        session.close()


@pytest.mark.parametrize("sampling", [Sampling(max_tokens=9), Sampling(temperature=1.2, top_p=0.9, max_tokens=9, seed=3)],
                         ids=["greedy", "sampled"])
def test_turns_decoded_ahead_are_the_ordinary_orders(pair, sampling):
    ahead = pair[0]
    messages = [Message("system", "Be brief."), Message("user", QUESTIONS[0])]
    prompt = ahead.tokenize(messages)

    def start_afresh():               # a prompt that shares no prefix: the next prefills from position 0
        for session in pair:
            list(session.stream_tokens([(prompt[0] + 1) % 512, 9, 10], Sampling(max_tokens=1)))

    start_afresh()
    probe = [[c.token for c in session.stream_tokens(prompt, sampling)] for session in pair]
    assert probe[0] == probe[1]
    end_token = probe[0][4]           # turn 1 (prefilled as the probe was) stops on it
    start_afresh()
    endings = []
    for prompt, chunks, seen in turns_both_ways(pair, messages, end_token, sampling, cancel_after=4):
        if len(chunks) > 2:           # token 1's step ran before its chunk came out
            assert seen[0] == len(prompt) + 1
        endings.append(chunks[-1].finish_reason)
    assert endings[0] == "stop" and endings[1] == "cancelled"

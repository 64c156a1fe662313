"""The CUDA session's fast path decodes a step ahead: each token is picked on the device and fed to
the next step before the host reads it. On the CPU, for real (the fast path's FastDecoder without
graphs inside a real CudaSession): every reply and every kept cache equal the ordinary order's
(each token read before the next step), over prefix-cache turns, a cancel, an end-of-sequence stop,
max_tokens, the context's end and seeded sampling; and the sampled pick equals torch.multinomial's
for the same seed. The same on the GPU with graphs: test_cuda_decode_ahead_gpu.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from runner.backend import LoadRequest, Message, Sampling, get_backend  # noqa: E402
from runner.model import load_spec  # noqa: E402
from prefix_helpers import QUESTIONS  # noqa: E402


def multinomial_pick(logits, sampling: Sampling, generator) -> int:
    """The session's pick before it stayed on the device: torch.multinomial, read with int()."""
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def same_picks_as_multinomial(device: str) -> None:
    from runner_cuda.session import pick_token

    for seed in range(40):
        logits = torch.randn(49152, generator=torch.Generator().manual_seed(seed)).mul(4).to(device)
        for sampling in (Sampling(temperature=0.7, seed=seed), Sampling(temperature=1.3, top_p=0.9, seed=seed)):
            theirs = torch.Generator(device=device).manual_seed(seed)
            ours = torch.Generator(device=device).manual_seed(seed)
            expected = [multinomial_pick(logits, sampling, theirs) for _ in range(4)]
            assert [int(pick_token(logits, sampling, ours)) for _ in range(4)] == expected, (seed, sampling)
    greedy = torch.tensor([0.5, 3.0, -1.0, 3.0], device=device)
    assert int(pick_token(greedy, Sampling(), None)) == int(torch.argmax(greedy)) == 1


def test_sampled_picks_are_multinomials_for_the_same_seed():
    same_picks_as_multinomial("cpu")


def greedy_equals_argmax(device: str) -> None:
    """The greedy pick, two reductions where the vocabulary splits into rows, is torch.argmax's: the
    first of equal largest logits (in one row, in rows apart), a NaN's place, any length."""
    from runner_cuda.session import greedy

    for count in (4, 49152, 128256, 151936, 8209):        # 8209 is prime: one reduction
        generator = torch.Generator().manual_seed(count)
        for case in range(6):
            logits = torch.randn(count, generator=generator)
            if case:                                       # ties: the largest value at several places
                places = torch.randint(0, count, (case + 1,), generator=generator)
                logits[places] = logits.max() + 1
            if case == 5:
                logits[places[0]] = float("nan")
            logits = logits.to(device)
            assert greedy(logits).shape == torch.argmax(logits).shape == ()
            assert int(greedy(logits)) == int(torch.argmax(logits)), (count, case)
    row_ties = torch.zeros(128256, device=device)
    row_ties[[700, 600, 1744]] = 5.0                       # rows of 384: 600 and 700 in one, 1,744 in a later one
    assert int(greedy(row_ties)) == 600


def test_greedy_pick_is_torch_argmax():
    greedy_equals_argmax("cpu")


def fast_session(folder, context: int, ahead: bool):
    from runner_cuda.fast import FastSteps
    from runner_cuda.fast.decoder import FastDecoder

    session = get_backend("cuda").load(LoadRequest(load_spec(str(folder)), "fp32", context))
    session.use_steps(FastSteps(FastDecoder(session.hf_model, session.context, use_graphs=False)))
    session.step_ahead = ahead
    return session


@pytest.fixture
def pair(tiny_llama_dir):
    """Two sessions of the tiny model on the fast path's steps: one decoding ahead (as attached on
    CUDA), one in the ordinary order."""
    ahead, in_turn = fast_session(tiny_llama_dir, 256, True), fast_session(tiny_llama_dir, 256, False)
    yield ahead, in_turn
    ahead.close()
    in_turn.close()


def cached(session) -> int:
    """Positions the fast path's static cache holds."""
    return session.forward_step.__self__.decoder.length


def streamed(session, prompt: list[int], sampling: Sampling, cancel_after: int | None = None):
    """(chunks, cached positions seen at each chunk) of one reply; `cancel_after` cancels it there."""
    import threading

    cancel = threading.Event()
    chunks, seen = [], []
    for chunk in session.stream_tokens(prompt, sampling, cancel):
        chunks.append(chunk)
        seen.append(cached(session))
        if cancel_after is not None and len(chunks) == cancel_after:
            cancel.set()
    return chunks, seen


def record(chunks) -> list[tuple]:
    return [(c.token, c.text, c.finish_reason, c.generation_tokens, c.reused_tokens, c.prompt_tokens) for c in chunks]


def kept(prompt: list[int], chunks) -> int:
    """Positions the ordinary order leaves cached: the prompt and every reply token but the last."""
    return len(prompt) + len([c for c in chunks if c.token is not None]) - 1


def turns_both_ways(pair, messages: list, end_token: int, sampling: Sampling, cancel_after: int):
    """QUESTIONS as turns of one conversation, each answered by both sessions (a step ahead, in
    turn): the first stops on `end_token`, the second is cancelled after `cancel_after` chunks.
    Each turn gives the same chunks both ways and, already at the last chunk, the cache the
    ordinary order keeps. Yields (prompt, chunks, cached positions at each chunk) per turn."""
    ahead, in_turn = pair
    for turn, question in enumerate(QUESTIONS):
        if turn:
            messages.append(Message("user", question))
        for session in pair:
            session.eos_ids = {end_token} if turn == 0 else set()
        prompt = ahead.tokenize(messages)
        cut = cancel_after if turn == 1 else None
        chunks, seen = streamed(ahead, prompt, sampling, cut)
        theirs, _ = streamed(in_turn, prompt, sampling, cut)
        assert record(chunks) == record(theirs), f"turn {turn + 1}"
        assert seen[-1] == cached(in_turn) == kept(prompt, chunks), f"turn {turn + 1}"
        yield prompt, chunks, seen
        messages.append(Message("assistant", "".join(c.text for c in chunks)))


def test_the_step_after_a_token_runs_before_the_host_reads_it(pair):
    ahead, in_turn = pair
    prompt = ahead.tokenize([Message("user", QUESTIONS[0])])
    chunks, seen = streamed(ahead, prompt, Sampling(max_tokens=6))
    # each token but the last is in the cache when its chunk comes out: its step already ran
    assert seen[:-1] == [len(prompt) + n for n in range(1, 6)]
    assert seen[-1] == kept(prompt, chunks)            # the limit's last token: no step after it
    theirs, seen_in_turn = streamed(in_turn, prompt, Sampling(max_tokens=6))
    assert seen_in_turn == [len(prompt) + n - 1 for n in range(1, 7)]
    assert record(chunks) == record(theirs)


def test_conversation_with_stop_cancel_and_limit_is_the_ordinary_orders(pair):
    """Four turns that reuse the kept cache, ending on an end token, on a cancel and at max_tokens:
    the same chunks, and after each reply the cache holds exactly the ordinary order's positions,
    so the next turn reuses the same prefix and answers the same."""
    messages = [Message("user", QUESTIONS[0])]
    prompt = pair[0].tokenize(messages)
    probe = [[c.token for c in session.stream_tokens(prompt, Sampling(max_tokens=8))] for session in pair]
    assert probe[0] == probe[1]
    end_token = probe[0][3]        # an id the greedy reply to the first question reaches: turn 1 stops there
    endings, previous = [], []
    for prompt, chunks, _seen in turns_both_ways(pair, messages, end_token, Sampling(max_tokens=7), cancel_after=3):
        assert chunks[0].reused_tokens >= len(previous)      # the turn before's prompt, at least
        endings.append(chunks[-1].finish_reason)
        previous = prompt
    assert endings == ["stop", "cancelled", "length", "length"]


def test_a_reply_to_the_end_of_the_context(pair):
    """The limit is the context's end: no step is fed past it, and the cache ends where the
    ordinary order's does."""
    ahead, in_turn = pair
    prompt = torch.randint(3, 49152, (250,), generator=torch.Generator().manual_seed(3)).tolist()
    chunks, _ = streamed(ahead, prompt, Sampling(max_tokens=100))
    theirs, _ = streamed(in_turn, prompt, Sampling(max_tokens=100))
    assert record(chunks) == record(theirs)
    assert len(chunks) == 6 and chunks[-1].finish_reason == "length"
    assert cached(ahead) == cached(in_turn) == 255


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_seeded_sampling_gives_the_ordinary_orders_reply(pair, top_p):
    """A sampled reply with a seed, twice in a row (the second reuses the first's cache and ends
    with a cancel): the same ids as the ordinary order, which picked them with torch.multinomial."""
    ahead, in_turn = pair
    prompt = ahead.tokenize([Message("user", QUESTIONS[2])])
    sampling = Sampling(temperature=1.5, top_p=top_p, max_tokens=12, seed=11)
    for cancel_after in (None, 5):
        chunks, _ = streamed(ahead, prompt, sampling, cancel_after)
        theirs, _ = streamed(in_turn, prompt, sampling, cancel_after)
        assert record(chunks) == record(theirs)
        assert cached(ahead) == cached(in_turn) == kept(prompt, chunks)
    assert len({c.token for c in chunks}) > 1

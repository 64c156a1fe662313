"""`runner launch --serve`: rank 0 of a model split over two loopback ranks serves runner serve's
API; the real command in its own process, the official `openai` client, and a rank killed."""

from __future__ import annotations

import httpx
import openai
import psutil
import pytest

from runner.backend import Sampling
from runner.choice import open_session, resolve
from runner.cli import main
from runner.hardware import detect_machine
from runner.model import load_spec
from test_serve import QUESTION, ServerProcess

pytestmark = pytest.mark.slow


def one_process_completion(prompt: str, max_tokens: int) -> str:
    """A plain (no chat template) greedy completion by one process, mlx q8."""
    session = open_session(resolve(load_spec(None), detect_machine(), "mlx", "q8"))
    try:
        return "".join(c.text for c in session.stream_tokens(session.encode(prompt), Sampling(max_tokens=max_tokens)))
    finally:
        session.close()


def test_the_ranks_answer_through_the_api_and_a_dead_rank_stops_the_server(default_model_dir, capsys):
    assert main(["generate", "--backend", "mlx", "--quant", "q8", "-p", QUESTION, "--max-tokens", "24"]) == 0
    expected = capsys.readouterr().out.strip()     # one process, the same scheme: the ranks' tokens are its tokens
    expected_plain = one_process_completion("The capital of France is", 8)

    server = ServerProcess("--serve", "--hosts", "127.0.0.1,127.0.0.1", "--quant", "q8", command=("launch",))
    try:
        server.wait_for("runner: ready:")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120)
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=24,
                                               messages=[{"role": "user", "content": QUESTION}])
        assert reply.choices[0].message.content.strip() == expected
        plain = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                          temperature=0, max_tokens=8)
        assert plain.choices[0].text == expected_plain          # plain text: rank 0 encodes, the ranks take ids

        ranks = [p for p in psutil.Process(server.process.pid).children(recursive=True)
                 if p.cmdline()[1:3] == ["-m", "runner_mlx.rank"]]       # not mlx.launch, which names it too
        assert len(ranks) == 2
        ranks[-1].kill()
        broken = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert broken.status_code == 500 and "died (killed by signal 9, SIGKILL)" in broken.json()["error"]["message"]
        assert server.process.wait(timeout=60) == 1                   # the server stops: nothing left to answer with
        assert "runner: error: the model's ranks stopped" in server.log and "Traceback" not in server.log
        _, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive
    finally:
        server.stop()

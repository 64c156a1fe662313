"""`runner serve` end to end: the real command in its own process on a free loopback port, the
default model on the CPU, and real clients (httpx and the official `openai` package).

One server serves the whole module (with an API key and a queue of one, so that the key and the
full queue can be tested on it too); the last test stops it with Ctrl+C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from runner.cli import main
from runner.server.api import ApiError, parse_chat, parse_completion
from runner.server.stops import StopScanner

KEY = "test-key-1234"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
LONG_REPLY = "Write the numbers from 1 to 500 separated by commas."   # greedy SmolLM2: over 1,000 tokens


class ServerProcess:
    """`runner serve` (or another command that serves, `command`) in a subprocess; its stderr
    collected line by line."""

    def __init__(self, *args: str, command: tuple[str, ...] = ("serve",)) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runner.cli", *command, "--port", "0", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
        )
        self.lines: list[str] = []
        self.ended = False
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self.wait_for(r"serving on (http://\S+)").group(1)

    def _read(self) -> None:
        for line in self.process.stderr:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        """The first stderr line matching `pattern`, waiting for it to be written."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    if match := re.search(pattern, line):
                        return match
                left = deadline - time.monotonic()
                if self.ended or left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} in:\n{self.log}")
                self.changed.wait(left)

    @property
    def log(self) -> str:
        with self.changed:
            return "\n".join(self.lines)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(default_model_dir):
    """The default model behind `runner serve --api-key … --queue 1`, ready; what it answered
    while the model was still loading is kept in `server.while_loading`."""
    server = ServerProcess("--api-key", KEY, "--queue", "1")
    auth = {"Authorization": f"Bearer {KEY}"}
    # torch alone takes seconds to import in the new process: these come well before the model is ready
    server.while_loading = (httpx.get(f"{server.url}/health", headers=auth),
                            httpx.post(f"{server.url}/v1/chat/completions", headers=auth,
                                       json={"messages": [{"role": "user", "content": "hi"}]}))
    server.wait_for("runner: ready:")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- the server, as a client sees it ------------------------------------------------------------


@pytest.mark.slow
def test_answers_503_while_the_model_loads(server):
    health, chat = server.while_loading
    assert health.status_code == 503 and health.json()["status"] == "loading"
    assert chat.status_code == 503 and chat.headers["retry-after"]
    assert chat.json()["error"]["code"] == "model_loading" and "still loading" in chat.json()["error"]["message"]


@pytest.mark.slow
def test_greedy_reply_equals_runner_generate(client, capsys):
    assert main(["generate", "-p", QUESTION, "--max-tokens", "12", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)

    reply = client.chat.completions.create(model=MODEL, messages=ask(QUESTION), temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == generated["text"] and generated["text"].strip()
    assert reply.choices[0].finish_reason == generated["finish_reason"]
    assert reply.usage.prompt_tokens == generated["prompt_tokens"]
    assert reply.usage.completion_tokens == generated["tokens"]

    stream = client.chat.completions.create(model=MODEL, messages=ask(QUESTION), temperature=0,
                                            max_completion_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == generated["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == generated["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == generated["tokens"]


@pytest.mark.slow
def test_next_turn_reuses_the_kv_cache(http, server):
    first = http.post("/v1/chat/completions", json={"messages": ask(QUESTION), "temperature": 0, "max_tokens": 8})
    answer = first.json()["choices"][0]["message"]["content"]
    turns = ask(QUESTION) + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
    second = http.post("/v1/chat/completions", json={"messages": turns, "temperature": 0, "max_tokens": 4})
    assert second.status_code == 200, second.text
    reused = int(second.headers["x-runner-reused-prompt-tokens"])
    usage = second.json()["usage"]
    assert first.json()["usage"]["prompt_tokens"] <= reused < usage["prompt_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == reused
    server.wait_for(rf"{usage['prompt_tokens']} prompt tokens, {reused} reused")


@pytest.mark.slow
def test_stop_strings_seed_and_plain_completions(client):
    whole = client.chat.completions.create(model=MODEL, messages=ask("Name the three primary colors."),
                                           temperature=0, max_tokens=10).choices[0].message.content
    cut = whole.split()[3]
    stopped = client.chat.completions.create(model=MODEL, messages=ask("Name the three primary colors."),
                                             temperature=0, max_tokens=10, stop=[cut, "zzz-never"])
    assert stopped.choices[0].message.content == whole[:whole.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"

    sampled = [client.chat.completions.create(model=MODEL, messages=ask("Tell me a fun fact."), temperature=1.0,
                                              top_p=0.9, seed=7, max_tokens=5).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]

    completion = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                           temperature=0, max_tokens=4)
    assert completion.choices[0].text.strip() and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 4
    streamed = list(client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0,
                                              max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list()] == [MODEL]


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_goes_on(http, server):
    chat = "/v1/chat/completions"
    cases = [
        (http.post(chat, content=b"{not json"), 400, "not valid JSON"),
        (http.post(chat, content=b"[1, 2]"), 400, "JSON object"),
        (http.post(chat, content=b"[" * 100_000 + b"]" * 100_000), 400, "not valid JSON"),
        (http.post(chat, json={"messages": []}), 400, "messages"),
        (http.post(chat, json={"messages": [{"role": "robot", "content": "hi"}]}), 400, r"messages\[0\]\.role"),
        (http.post(chat, json={"messages": ask("hi"), "temperature": "hot"}), 400, "'temperature' must be a number"),
        (http.post(chat, json={"messages": ask("hi"), "max_tokens": 0}), 400, "'max_tokens' must be at least 1"),
        (http.post(chat, json={"messages": ask("hi"), "n": 2}), 400, "'n' must be 1"),
        (http.post(chat, json={"messages": ask("hi"), "stop": [""]}), 400, "'stop'"),
        (http.post(chat, json={"model": "gpt-4o", "messages": ask("hi")}), 404, "not served here"),
        (http.post("/v1/completions", json={"prompt": 42}), 400, "'prompt'"),
        (http.post(chat, content=b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}'), 400,
         r"'messages\[0\]\.content' is not valid Unicode text: a lone surrogate \(\\ud800\) at character 3"),
        (http.get("/v1/nowhere"), 404, "/v1/nowhere"),
        (http.get(chat), 405, "GET /v1/chat/completions"),
        (http.post(chat, json={"messages": ask("word " * 5000)}), 400,
         r"the prompt is \d{4} tokens but this server's context is 4096 tokens"),
        (http.post(chat, content=b" " * (4 * 1024 * 1024 + 1)), 413, "limit"),
        (http.post(chat, json={"messages": ask("hi")}, headers={"Origin": "https://evil.example"}), 403,
         "web pages of other origins"),
        (http.get("/v1/models", headers={"Host": "evil.example:8080"}), 403, "loopback names only"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (response.status_code, response.text)
        error = response.json()["error"]
        assert re.search(message, error["message"]) and set(error) == {"message", "type", "param", "code"}
    assert http.get("/health", headers={"Origin": "http://localhost:3000"}).json()["status"] == "ready"
    address = httpx.URL(server.url)
    with socket.create_connection((address.host, address.port)) as raw:   # a client gone mid-body
        raw.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address.host}\r\nAuthorization: Bearer {KEY}"
                    "\r\nContent-Length: 1000\r\n\r\n{\"messages\": ".encode())
    server.wait_for("400 POST /v1/chat/completions · the client went away before its request body arrived")
    assert http.get("/health").json()["status"] == "ready"
    assert "Traceback" not in server.log


@pytest.mark.slow
def test_api_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong-key-1234"}, {"Authorization": KEY}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-1234", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=ask("hi"))


def test_other_hosts_need_a_key_and_a_taken_port_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("RUNNER_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("runner: error: --host 0.0.0.0 lets other")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    assert "runner: error: cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_a_weak_or_unsendable_api_key_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("RUNNER_API_KEY", raising=False)
    for key, message in [("", "--api-key is empty: a key needs at least 8 characters"),
                         ("k", "--api-key is only 1 character long: a key needs at least 8 characters"),
                         ("secret!", "--api-key is only 7 characters long"),
                         ("two words", "--api-key holds ' ' at character 4: a key is ASCII letters"),
                         ("tab\tkey-1234", "--api-key holds '\\t' at character 4"),
                         ("clé-secrète", "--api-key holds '\\xe9' at character 3")]:
        assert main(["serve", "--api-key", key]) == 2, key
        error = capsys.readouterr().err
        assert error.startswith(f"runner: error: {message}") and error.count("\n") == 1, error
        assert len(key) < 7 or key not in error   # the key itself is never printed
    monkeypatch.setenv("RUNNER_API_KEY", "short")
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.startswith("runner: error: RUNNER_API_KEY is only 5 characters long")
    # an 8-character key passes, from the option or the environment: the port is the next check
    for args in (["--api-key", "12345678"], []):
        monkeypatch.setenv("RUNNER_API_KEY", "abcd-EFG")
        assert main(["serve", "--host", "0.0.0.0", "--port", "70000", *args]) == 2
        assert capsys.readouterr().err.startswith("runner: error: --port must be between 0 and 65535")


@pytest.mark.slow
def test_disconnect_cancels_and_a_full_queue_gets_429(http, server):
    """A streams a long reply; B waits in the queue of one; C is refused with 429; A's client
    goes away mid-stream, its generation stops at the next token, and B is answered at once."""
    body = {"messages": ask(LONG_REPLY), "temperature": 0, "max_tokens": 2000, "stream": True}
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=120) as first, \
            httpx.Client(base_url=server.url, headers=auth, timeout=120) as second:
        with first.stream("POST", "/v1/chat/completions", json=body) as streamed:
            lines = streamed.iter_lines()   # held: a generator dropped half-way closes the connection
            for line in lines:
                if '"content":"' in line and '"content":""' not in line:
                    break   # A is generating
            waiting = {}
            behind = threading.Thread(target=lambda: waiting.setdefault("reply", second.post(
                "/v1/chat/completions", json={"messages": ask(QUESTION), "temperature": 0, "max_tokens": 4})))
            behind.start()
            deadline = time.monotonic() + 60
            while http.get("/health").json()["queued"] != 1:   # until B is in the queue
                assert time.monotonic() < deadline, server.log
            refused = http.post("/v1/chat/completions", json={"messages": ask("hi"), "max_tokens": 1})
            assert refused.status_code == 429 and refused.headers["retry-after"]
            assert refused.json()["error"]["code"] == "queue_full"
        closed_at = time.monotonic()   # leaving the block closes A's connection
        behind.join(timeout=60)
    assert waiting["reply"].status_code == 200 and time.monotonic() - closed_at < 15
    cancelled = server.wait_for(r"chat #(\d+) · .* (\d+) tokens? \(cancelled: the client went away\)")
    answered = server.wait_for(rf"chat #{int(cancelled.group(1)) + 1} · waited")
    assert int(cancelled.group(2)) < 200 and answered


@pytest.mark.slow
def test_ctrl_c_stops_the_server(server):
    assert server.stop() in (0, 130)
    assert "Traceback" not in server.log


@pytest.mark.slow
def test_ctrl_c_during_a_stream_ends_it_cleanly(default_model_dir):
    """Ctrl+C while a reply streams: the reply stops at its next token and its stream ends with an
    error event, inside uvicorn's grace period (past it uvicorn cancels the response: tracebacks)."""
    server = ServerProcess()
    server.wait_for("runner: ready:")
    body = {"messages": ask(LONG_REPLY), "temperature": 0, "max_tokens": 2000, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as streamed:
            lines = streamed.iter_lines()
            for line in lines:
                if '"content":"' in line and '"content":""' not in line:
                    break   # generating
            server.process.send_signal(signal.SIGINT)
            rest = [line for line in lines if line]
    assert server.process.wait(timeout=30) in (0, 130)
    error = json.loads(rest[-1].removeprefix("data: "))["error"]   # the stream's last event says why it ended
    assert error["code"] == "shutting_down" and "the reply was cut short" in error["message"], rest[-3:]
    server.wait_for(r"chat #1 · .* tokens \(cancelled: the server is stopping\)")
    assert "Traceback" not in server.log and "ERROR" not in server.log, server.log


@pytest.mark.slow
def test_ctrl_c_while_a_request_body_arrives_answers_it_at_once(default_model_dir):
    """A client sends its headers and part of the body it announced, then nothing: Ctrl+C answers it
    503 and the server ends at once (before, uvicorn waited out its 3 s grace period, then cancelled
    the request: a 500 and a CancelledError traceback in the log)."""
    server = ServerProcess()
    server.wait_for("runner: ready:")
    address, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((address, int(port)), timeout=30) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
        assert client.recv(1024).startswith(b"HTTP/1.1 100 ")   # the route now waits for the body
        client.sendall(b'{"messages": [')
        server.process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        reply = b""
        while piece := client.recv(65536):   # until the server closes the connection
            reply += piece
        answered = time.monotonic() - interrupted
    assert server.process.wait(timeout=30) in (0, 130)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and json.loads(body)["error"]["code"] == "shutting_down", reply
    assert answered < 3, answered   # inside uvicorn's grace period
    server.wait_for(r"runner: 503 POST /v1/chat/completions · the server is stopping: the request's body had not")
    assert "Traceback" not in server.log and "ERROR" not in server.log, server.log


# ---- the pieces, without a server ---------------------------------------------------------------


def test_stop_scanner_holds_back_what_could_become_a_stop():
    scanner = StopScanner(("END", "\n\n"))
    assert scanner.feed("Hello E") == ("Hello ", False)      # "E" could start "END"
    assert scanner.feed("N") == ("", False)
    assert scanner.feed("ough\n") == ("ENough", False)
    assert scanner.feed("\nmore") == ("", True)
    assert StopScanner(("x",)).feed("abc") == ("abc", False)
    unstopped = StopScanner(("END",))
    assert unstopped.feed("the EN") == ("the ", False) and unstopped.flush() == "EN"


def test_requests_are_checked_field_by_field():
    served = (MODEL, "SmolLM2-135M-Instruct")
    request = parse_chat({"model": "SmolLM2-135M-Instruct", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        "max_tokens": 5, "max_completion_tokens": 7, "stop": "\n", "seed": 3, "temperature": 0}, served)
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."), ("user", "Hi there")]
    assert request.max_tokens == 7 and request.stop == ("\n",) and request.seed == 3 and request.temperature == 0.0
    assert parse_completion({"prompt": ["Once"], "max_tokens": 32.0}, served).max_tokens == 32
    assert parse_completion({"prompt": "Once", "best_of": 1}, served).max_tokens == 16   # OpenAI's default
    assert parse_chat({"messages": ask("hi")}, served).max_tokens is None   # as long as the context allows
    for body, param in [
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"messages": ask("hi"), "top_p": 0}, "top_p"),
        ({"messages": ask("hi"), "seed": -1}, "seed"),
        ({"messages": ask("hi"), "stream": 1}, "stream"),
        ({"messages": ask("hi"), "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": ask("hi"), "max_tokens": True}, "max_tokens"),
        ({"messages": ask("hi"), "temperature": float("nan")}, "temperature"),
        ({"messages": ask("hi"), "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udcff"}]}]}, "messages[0].content"),
    ]:
        with pytest.raises(ApiError) as raised:
            parse_chat(body, served)
        assert raised.value.status == 400 and raised.value.param == param, body
    with pytest.raises(ApiError) as raised:
        parse_completion({"prompt": "The \ud83d capital"}, served)   # half of an emoji's surrogate pair
    assert raised.value.param == "prompt" and "(\\ud83d) at character 4" in raised.value.message

"""What `runner serve` costs over the in-process session, same prompt, same run; and time to
first token per turn of a chat through the server (the session's kept KV cache).

    PYTHONPATH=$PWD/src:$PWD/backends python3 bench/serve_overhead.py [MODEL] [--max-tokens 128]
        [--repeats 3] [--turns 6]

Both sides load MODEL (default: the default model) as the plan chooses, and answer the same
prompt greedily, alternating. Decode tokens/s is measured the same way on both sides, from the
arrival times of the first and the last piece of text: in-process from `session.stream`'s chunks,
through the server from the `openai` client's stream (`runner serve` in its own process on a free
port). Time to first token: from the call (the request) to the first piece of text.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

PROMPT = "Count from 1 to 1000, one number per line."   # greedy SmolLM2 does not stop early
TURNS = ["Tell me about Paris in a few sentences.", "What are its most famous museums?",
         "Which one should I visit first?", "How do I get there from the Eiffel Tower?",
         "What else is nearby?", "Summarise the plan in a list."]


def in_process(session, max_tokens: int) -> tuple[float, float, int]:
    from runner.backend import Message, Sampling

    started = time.perf_counter()
    first = last = None
    for chunk in session.stream([Message("user", PROMPT)], Sampling(max_tokens=max_tokens)):
        if chunk.text:
            last = time.perf_counter()
            first = first or last
        final = chunk
    return first - started, (final.generation_tokens - 1) / (last - first), final.generation_tokens


def through_server(client, model: str, max_tokens: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = last = None
    tokens = 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                            temperature=0, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first - started, (tokens - 1) / (last - first), tokens


def chat_turn(http, messages: list[dict]) -> tuple[str, int, float]:
    """One streamed turn: its text, the prompt tokens reused, the time to its first text."""
    started, first, text = time.perf_counter(), None, []
    body = {"messages": messages, "temperature": 0, "max_tokens": 48, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                piece = json.loads(line[len("data: "):])["choices"][0]["delta"].get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
        return "".join(text), int(response.headers["x-runner-reused-prompt-tokens"]), first - started


def start_server(model: str | None) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "runner.cli", "serve", "--port", "0"] + ([model] if model else [])
    server = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=dict(os.environ))
    url = None
    for line in server.stderr:
        if match := re.search(r"serving on (http://\S+)", line):
            url = match.group(1)
        if "runner: ready:" in line:
            return server, url
    raise SystemExit(f"runner serve ended: {server.wait()}")


def main(argv: list[str] | None = None) -> int:
    import openai

    from runner.choice import open_session, resolve
    from runner.hardware import detect_machine
    from runner.model import load_spec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args(argv)

    choice = resolve(load_spec(args.model), detect_machine())
    session = open_session(choice)
    server, url = start_server(args.model)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    print(f"{choice.spec.name} · {choice.backend} · {choice.quant} · {session.device_summary}")
    try:
        in_process(session, 8), through_server(client, choice.spec.name, 8)   # warm both
        rows = {"in-process": [], "server": []}
        for _ in range(args.repeats):
            rows["in-process"].append(in_process(session, args.max_tokens))
            rows["server"].append(through_server(client, choice.spec.name, args.max_tokens))
        for name, runs in rows.items():
            print(f"{name:>10}: {runs[0][2]} tokens; first token {statistics.median(r[0] for r in runs):.3f} s; "
                  f"decode {statistics.median(r[1] for r in runs):.2f} tokens/s "
                  f"(runs: {', '.join(f'{r[1]:.2f}' for r in runs)})")
        ratio = statistics.median(r[1] for r in rows["server"]) / statistics.median(r[1] for r in rows["in-process"])
        print(f"server / in-process decode speed: {ratio:.3f}")

        import httpx

        messages = []
        with httpx.Client(base_url=url, timeout=600) as http:
            for turn, question in enumerate(TURNS[:args.turns], 1):
                messages.append({"role": "user", "content": question})
                text, reused, ttft = chat_turn(http, messages)
                messages.append({"role": "assistant", "content": text})
                print(f"turn {turn}: reused {reused:>4} prompt tokens; first token after {ttft:.3f} s")
    finally:
        server.terminate()
        server.wait()
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

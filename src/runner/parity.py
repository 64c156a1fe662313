"""Parity: do two sessions (backends, quantizations, machines) give the same next-token distributions?

The flow, one session at a time so that only one model is in memory:

    prompts = builtin_prompts()
    reference = capture(session_a, prompts, token_ids=None, ...)   # tokenizes with session_a
    other = capture(session_b, prompts, token_ids=reference.prompt_ids(), ...)
    result = compare(reference, other)                               # PairResult with a verdict

A `Capture` holds, for every prompt, the session's greedy reply (through `Session.stream`) and its
next-token logits at every position of prompt + reply (through `Session.logits`): in memory the
full float32 logits, on disk (a `.parity` record) the top-k logits, the logsumexp and the log
probability of the token that follows. Two captures are compared at the positions whose prefixes
are the same token ids: the whole prompt, then the replies up to and including the first token
where they part.

All probabilities are computed from float64 log-softmax. KL is KL(reference || other) in nats per
position. With full logits on both sides it is exact; when either side is a record it is computed
over the tokens both top-k lists hold plus one bucket for everything else, which is a lower bound
of the true KL (coarsening never increases KL) and close to it when the top-k hold most of the
probability (the result says which one it is).

numpy is imported inside functions: `runner.parity` is imported by the CLI, which must start fast.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import platform
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from runner.backend import Message, Sampling, backend_class, backend_names
from runner.errors import RunnerError, UserInputError
from runner.files import parse_json, read_json_object, read_text
from runner.paths import user_path
from runner.words import counted, one_line

if TYPE_CHECKING:
    import numpy as np

    from runner.backend import Session
    from runner.model import ModelSpec

RECORD_FORMAT = "runner-parity/1"
DEFAULT_TOP_K = 64
DEFAULT_MAX_TOKENS = 32

# ---- thresholds -----------------------------------------------------------------------------
# Each quant belongs to a precision class; a pair is judged by the looser class of its two sides.
# The defaults were calibrated on SmolLM2-135M-Instruct and a tiny random Llama on CPU.
PRECISION_CLASS = {
    "fp32": "fp32",
    "bf16": "16-bit",
    "fp16": "16-bit",
    "fp8": "8-bit",
    "int8": "8-bit",
    "q8": "8-bit",
    "nf4": "4-bit",
    "nf4-nodq": "4-bit",
    "fp4": "4-bit",
    "q4": "4-bit",
    "gguf": "8-bit",   # a GGUF as stored; llama.cpp also rounds activations to 8 bits for quantized matmuls
}
CLASS_ORDER = ("fp32", "16-bit", "8-bit", "4-bit")
# A quantized KV cache (`,kv8` / `,kv4` after the quant) is judged as that many bits at least.
KV_CLASS = {8: "8-bit", 4: "4-bit"}


@dataclass(frozen=True)
class Thresholds:
    scheme: str        # the precision class the pair is judged as: "fp32", "16-bit", "8-bit", "4-bit"
    max_kl: float      # the largest mean KL (nats per position) that passes
    min_top1: float    # the smallest top-1 agreement (a fraction) that passes

    def describe(self) -> str:
        return f"mean KL <= {self.max_kl:g}, top-1 >= {self.min_top1:.0%}"


# Measured on SmolLM2-135M-Instruct against torch float32, 8 built-in prompts (README):
#   MLX float32      mean KL 3.6e-11, top-1 100 %   (tiny Llama: 1.8e-12)
#   torch / MLX bf16 mean KL 1.1e-3 / 1.5e-3, top-1 97.1 % / 98.0 %
#   MLX q8           mean KL 1.8e-3, top-1 98.5 %;  torch int8 (LLM.int8) 2.3e-2, 94.5 %
#   NF4 / MLX q4     mean KL 0.37 / 0.46, top-1 79 % / 73 %: both fail; on this small model 4-bit
#                    moves the answers (MLX q4 loses "Paris"). The 4-bit bound is what a 4-bit
#                    quant that keeps a model's answers reaches on larger models, not a bound
#                    stretched to let these pass.
#   wrong RoPE theta (10000 for 100000): mean KL 0.09, top-1 89 %: fails float32 by 4 orders.
DEFAULT_THRESHOLDS = {
    "fp32": Thresholds("fp32", 1e-5, 0.99),
    "16-bit": Thresholds("16-bit", 0.01, 0.95),
    "8-bit": Thresholds("8-bit", 0.05, 0.92),
    "4-bit": Thresholds("4-bit", 0.15, 0.85),
}


def precision_class(scheme: str) -> str:
    """The class of a quant, or of a quant with its KV cache setting ("bf16,kv8"): the looser of the two."""
    quant, kv_bits = split_scheme(scheme)
    if quant not in PRECISION_CLASS:
        raise UserInputError(f"unknown quant '{quant}' (known: {', '.join(PRECISION_CLASS)})")
    classes = [PRECISION_CLASS[quant]] + ([KV_CLASS[kv_bits]] if kv_bits is not None else [])
    return max(classes, key=CLASS_ORDER.index)


def split_scheme(scheme: str) -> tuple[str, int | None]:
    """"bf16,kv8" -> ("bf16", 8); "bf16" -> ("bf16", None)."""
    quant, sep, kv = scheme.partition(",")
    if not sep:
        return quant, None
    if kv not in ("kv8", "kv4"):
        raise UserInputError(f"'{scheme}': after the quant comes kv8 or kv4 (the KV cache's bits), e.g. bf16,kv8")
    return quant, int(kv[2:])


def scheme_name(quant: str, kv_bits: int | None) -> str:
    """The quant with its KV cache setting, as the user writes it: "bf16", "bf16,kv8"."""
    return quant if kv_bits is None else f"{quant},kv{kv_bits}"


def thresholds_for(
    scheme_a: str, scheme_b: str, max_kl: float | None = None, min_top1: float | None = None
) -> Thresholds:
    """The thresholds a pair is judged by: the defaults of its looser side, unless the user set them.
    A scheme is a quant, or a quant with its KV cache setting ("bf16,kv8")."""
    scheme = max(precision_class(scheme_a), precision_class(scheme_b), key=CLASS_ORDER.index)
    default = DEFAULT_THRESHOLDS[scheme]
    return Thresholds(
        scheme,
        default.max_kl if max_kl is None else max_kl,
        default.min_top1 if min_top1 is None else min_top1,
    )


# ---- what is compared -----------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    name: str
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class Target:
    """One side of a comparison, as the user writes it: `cuda:bf16`, `mlx:q4`, `cuda:bf16,kv8`
    (the KV cache quantized to 8 bits, as `--kv-bits 8` loads it)."""

    backend: str
    quant: str
    kv_bits: int | None = None

    @property
    def scheme(self) -> str:
        return scheme_name(self.quant, self.kv_bits)

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.scheme}"


def parse_target(text: str) -> Target:
    backend, sep, scheme = text.partition(":")
    if not sep or not backend or not scheme:
        raise UserInputError(f"'{text}': write a backend and a quant as BACKEND:QUANT[,kv8|kv4], "
                             "e.g. cuda:bf16, mlx:q4 or cuda:bf16,kv8")
    if backend not in backend_names():     # the backend first, as it is written first
        raise UserInputError(f"'{text}': unknown backend '{backend}' (known: {', '.join(backend_names())})")
    precision_class(scheme)  # unknown quant or KV setting: a clear error before anything loads
    quant, kv_bits = split_scheme(scheme)
    return Target(backend, quant, kv_bits)


def _prompts_from_json(items: Any, source: str) -> list[Prompt]:
    if not isinstance(items, list):
        raise UserInputError(f"{source}: expected a JSON list of prompts")
    prompts = []
    for index, item in enumerate(items):
        where = f"{source}: prompt {index + 1}"
        if isinstance(item, str):
            item = {"messages": [{"role": "user", "content": item}]}
        if not isinstance(item, dict):
            raise UserInputError(f"{where}: expected a string or an object with 'messages'")
        if "prompt" in item and "messages" not in item:
            item = {**item, "messages": [{"role": "user", "content": item["prompt"]}]}
        raw = item.get("messages")
        if not isinstance(raw, list) or not raw:
            raise UserInputError(f"{where}: 'messages' must be a non-empty list")
        messages = []
        for message in raw:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise UserInputError(f"{where}: each message needs a 'role' and a 'content' string")
            if message.get("role") not in ("system", "user", "assistant"):
                raise UserInputError(f"{where}: role must be system, user or assistant, not {message.get('role')!r}")
            messages.append(Message(message["role"], message["content"]))
        prompts.append(Prompt(str(item.get("name") or f"prompt-{index + 1}"), tuple(messages)))
    return prompts


def builtin_prompts() -> list[Prompt]:
    """The built-in prompt set: short questions with one-line answers, a multi-turn prose prompt."""
    text = resources.files("runner.prompts").joinpath("builtin.json").read_text()
    return _prompts_from_json(json.loads(text), "built-in prompts")


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a file: a JSON list (strings, or objects with 'name' and 'messages'), or plain
    text where prompts are separated by blank lines (each one becomes a single user message)."""
    path = user_path(path)
    text = read_text(path)
    if path.suffix == ".json":
        prompts = _prompts_from_json(parse_json(text, path), str(path))
    else:
        blocks = [block.strip() for block in text.split("\n\n") if block.strip()]
        prompts = [
            Prompt(f"{path.stem}-{index + 1}", (Message("user", block),)) for index, block in enumerate(blocks)
        ]
    if not prompts:
        raise UserInputError(f"{path}: no prompts in this file")
    return prompts


# ---- identity of a model: what must match for two runs to be comparable -----------------------

# The config.json keys that decide what a decoder computes. Only these make a model's identity:
# the rest of a config.json changes with the transformers version that wrote it (`dtype` or
# `torch_dtype`, `rope_parameters` or `rope_theta` + `rope_scaling`, defaults it spells out).
IDENTITY_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "hidden_act",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window", "num_local_experts",
    "num_experts_per_tok", "rope_theta", "rope_scaling",
)


def model_identity(config: dict) -> dict:
    """The identity keys of a config.json, with RoPE written one way whichever transformers wrote it."""
    config = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):                          # transformers 5
        rope = dict(rope)
        config.setdefault("rope_theta", rope.pop("rope_theta", None))
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        scaling = {k: v for k, v in scaling.items() if k != "type"}
        scaling.setdefault("rope_type", config["rope_scaling"].get("type", "default"))
        config["rope_scaling"] = scaling
    if isinstance(config.get("rope_theta"), (int, float)):
        config["rope_theta"] = float(config["rope_theta"])
    return {key: config[key] for key in IDENTITY_KEYS if config.get(key) is not None}


def config_sha256(folder: Path) -> str:
    """sha256 of the model's identity keys (see IDENTITY_KEYS) in its config.json."""
    config = read_json_object(folder / "config.json")
    return hashlib.sha256(json.dumps(model_identity(config), sort_keys=True).encode()).hexdigest()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


def tokenizer_sha256(folder: Path) -> str:
    """sha256 over the tokenizer's vocabulary files; "" when the folder has none."""
    digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
            found = True
    return digest.hexdigest() if found else ""


def stack_versions(backend: str) -> dict[str, str]:
    """Versions of the packages that compute the numbers, read without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        packages = tuple(backend_class(backend).packages)
    except RunnerError:   # a record of a backend this install does not have
        packages = ()
    versions = {"python": platform.python_version()}
    for package in ("runner", "numpy") + packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


# ---- capture: one session on the prompts --------------------------------------------------------


@dataclass
class PromptCapture:
    """One prompt through one session. Arrays cover every position of prompt + greedy reply;
    position i holds the distribution of the token at i + 1."""

    name: str
    prompt_ids: "np.ndarray"       # int64 (p,): the prompt's token ids (cut if it was too long)
    reply_ids: "np.ndarray"        # int64 (r,): the session's greedy reply, up to EOS or max tokens
    reply_text: str
    top_ids: "np.ndarray"          # int32 (p + r, k): the k most likely next tokens, most likely first
    top_logits: "np.ndarray"       # float32 (p + r, k): their logits
    logsumexp: "np.ndarray"        # float64 (p + r,): log of the softmax denominator
    next_logprob: "np.ndarray"     # float64 (p + r - 1,): log probability of the token that follows
    logits: "np.ndarray | None" = None  # float32 (p + r, vocab): full logits, in memory only

    @property
    def token_ids(self) -> "np.ndarray":
        import numpy as np

        return np.concatenate([self.prompt_ids, self.reply_ids])


@dataclass
class Capture:
    meta: dict                      # model, hashes, backend, quant, versions, device, date, ...
    prompts: list[PromptCapture]

    @property
    def scheme(self) -> str:
        """The quant with the KV cache setting ("bf16,kv8"); records written before the setting
        existed have no kv_bits: their KV cache was not quantized."""
        return scheme_name(self.meta["quant"], self.meta.get("kv_bits"))

    @property
    def label(self) -> str:
        return f"{self.meta['backend']}:{self.scheme}"

    def prompt_ids(self) -> list["np.ndarray"]:
        return [prompt.prompt_ids for prompt in self.prompts]

    def drop_logits(self) -> None:
        for prompt in self.prompts:
            prompt.logits = None


def log_softmax64(logits: "np.ndarray") -> "np.ndarray":
    """float64 log-softmax over the last axis."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x, axis=-1, keepdims=True)
    return x - top - np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True))


def top_k(logits: "np.ndarray", k: int) -> tuple["np.ndarray", "np.ndarray"]:
    """The k largest logits of each row, largest first; ties go to the lower token id (as argmax)."""
    import numpy as np

    k = min(k, logits.shape[-1])
    candidates = np.sort(np.argpartition(-logits, k - 1, axis=-1)[:, :k], axis=-1)
    values = np.take_along_axis(logits, candidates, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    return (
        np.take_along_axis(candidates, order, axis=-1).astype(np.int32),
        np.take_along_axis(values, order, axis=-1).astype(np.float32),
    )


def summarize_logits(token_ids: "np.ndarray", logits: "np.ndarray", k: int):
    """(top_ids, top_logits, logsumexp, next_logprob) of full logits for `token_ids`."""
    import numpy as np

    logprobs = log_softmax64(logits)
    logsumexp = logits.astype(np.float64)[:, 0] - logprobs[:, 0]
    next_logprob = logprobs[np.arange(len(token_ids) - 1), token_ids[1:]]
    top_ids, top_logits = top_k(logits, k)
    return top_ids, top_logits, logsumexp, next_logprob


def greedy_reply(session: "Session", messages: Sequence[Message], max_tokens: int) -> tuple[list[int], str]:
    """The session's greedy reply through its real generation path (`stream`): every chunk's token
    but a "stop" chunk's, the end-of-sequence id the backend stopped at (a GGUF file has no
    generation_config.json to name it)."""
    tokens: list[int] = []
    text = []
    for chunk in session.stream(messages, Sampling(temperature=0.0, max_tokens=max_tokens)):
        if chunk.token is not None and chunk.finish_reason != "stop":
            tokens.append(int(chunk.token))
        text.append(chunk.text)
    return tokens, "".join(text).strip()


def capture(
    session: "Session",
    prompts: Sequence[Prompt],
    *,
    token_ids: Sequence[Sequence[int]] | None = None,
    context: int,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    top_k_size: int = DEFAULT_TOP_K,
    keep_logits: bool = True,
    kv_bits: int | None = None,
    warn: Callable[[str], None] = lambda message: None,
) -> Capture:
    """Run `prompts` through `session`: its greedy reply, then its logits on prompt + reply.

    `token_ids` are the prompts' ids from the reference's tokenizer (None: this session is the
    reference and tokenizes them). A prompt longer than `context - max_tokens` is cut to that
    many tokens, with a warning, and gets no greedy reply (the chat template cannot be cut).
    `kv_bits`: the KV cache setting the session was loaded with, for the record and its label.
    """
    import numpy as np

    started = time.perf_counter()
    limit = context - max_tokens
    if limit < 2:
        raise UserInputError(f"a context of {context} leaves no room for prompts and {max_tokens} reply tokens")
    label = f"{session.backend}:{scheme_name(session.quant, kv_bits)}"
    results = []
    for index, prompt in enumerate(prompts):
        reference_ids = None if token_ids is None else token_ids[index]
        ids, cut = prompt_token_ids(session, prompt, reference_ids, limit, max_tokens, label, warn)
        reply, text = ([], "") if cut else greedy_reply(session, prompt.messages, max_tokens)
        full = np.asarray(ids + reply, dtype=np.int64)
        logits = checked_logits(session, full, label)
        results.append(prompt_capture(prompt.name, full, len(ids), text, logits, top_k_size, keep_logits))
    vocab_size = int(logits.shape[1]) if results else 0
    meta = capture_meta(session, prompts, kv_bits=kv_bits, vocab_size=vocab_size, context=context,
                        max_tokens=max_tokens, top_k_size=top_k_size, started=started)
    return Capture(meta, results)


def prompt_token_ids(
    session: "Session", prompt: Prompt, reference_ids: Sequence[int] | None, limit: int, max_tokens: int, label: str,
    warn: Callable[[str], None],
) -> tuple[list[int], bool]:
    """The prompt's token ids (the reference's if given, else the session's own), cut to `limit`;
    and whether they were cut. Each is said through `warn`."""
    own_ids = list(session.tokenize(prompt.messages))
    ids = own_ids if reference_ids is None else [int(t) for t in reference_ids]
    if reference_ids is not None and own_ids != ids:
        warn(f"{label} tokenizes prompt '{prompt.name}' differently from the reference; "
             "its logits use the reference's ids, its greedy reply its own")
    if len(ids) <= limit:
        return ids, False
    warn(f"prompt '{prompt.name}' has {len(ids)} tokens, more than the context allows with "
         f"{counted(max_tokens, 'reply token')} ({limit}): cut to its first {counted(limit, 'token')}, "
         "no greedy reply")
    return ids[:limit], True


def checked_logits(session: "Session", token_ids: "np.ndarray", label: str) -> "np.ndarray":
    """The session's float32 logits at every position of `token_ids`, refused unless one row each."""
    import numpy as np

    logits = np.asarray(session.logits(token_ids.tolist()), dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] != len(token_ids):
        raise RunnerError(f"{label}: logits() returned shape {logits.shape} for {counted(len(token_ids), 'token')}")
    return logits


def prompt_capture(name: str, token_ids: "np.ndarray", prompt_length: int, reply_text: str, logits: "np.ndarray",
                   top_k_size: int, keep_logits: bool) -> PromptCapture:
    """One prompt's capture from the logits of prompt + reply (`token_ids`, the prompt's first)."""
    top_ids, top_logits, logsumexp, next_logprob = summarize_logits(token_ids, logits, top_k_size)
    return PromptCapture(
        name=name,
        prompt_ids=token_ids[:prompt_length],
        reply_ids=token_ids[prompt_length:],
        reply_text=reply_text,
        top_ids=top_ids,
        top_logits=top_logits,
        logsumexp=logsumexp,
        next_logprob=next_logprob,
        logits=logits if keep_logits else None,
    )


def capture_meta(session: "Session", prompts: Sequence[Prompt], *, kv_bits: int | None, vocab_size: int,
                 context: int, max_tokens: int, top_k_size: int, started: float) -> dict:
    """What a record says of its run: the model's identity, the session, the machine, the settings."""
    folder = Path(session.model.path) if session.model.path is not None else None
    return {
        "format": RECORD_FORMAT,
        "model": session.model.name,
        "config_sha256": config_sha256(folder) if folder is not None and (folder / "config.json").is_file() else "",
        "tokenizer_sha256": tokenizer_sha256(folder) if folder is not None else "",
        "vocab_size": vocab_size,
        "backend": session.backend,
        "quant": session.quant,
        "kv_bits": kv_bits,
        "device": session.device_summary,
        "machine": f"{platform.system()} {platform.machine()} ({platform.node()})",
        "versions": stack_versions(session.backend),
        "memory": dict(session.memory().measured),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "context": context,
        "max_tokens": max_tokens,
        "top_k": top_k_size,
        "seconds": round(time.perf_counter() - started, 2),
        "prompts": [
            {"name": p.name, "messages": [{"role": m.role, "content": m.content} for m in p.messages]}
            for p in prompts
        ],
    }


# ---- comparison -------------------------------------------------------------------------------


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def kl_exact(reference_logits: "np.ndarray", other_logits: "np.ndarray") -> "np.ndarray":
    """KL(P || Q) per row from full logits, float64, in nats."""
    import numpy as np

    log_p = log_softmax64(reference_logits)
    log_q = log_softmax64(other_logits)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


_ROUNDING = 1e-12


def kl_top_k(
    p_ids: "np.ndarray", p_logprobs: "np.ndarray", q_ids: "np.ndarray", q_logprobs: "np.ndarray"
) -> "np.ndarray":
    """A lower bound of KL(P || Q) per row from top-k lists: the tokens both lists hold, each on its
    own, and one bucket for all other tokens. Exact when the shared tokens hold all the mass."""
    import numpy as np

    rows = p_ids.shape[0]
    result = np.empty(rows, dtype=np.float64)
    for row in range(rows):
        shared, p_at, q_at = np.intersect1d(p_ids[row], q_ids[row], assume_unique=True, return_indices=True)
        lp = p_logprobs[row, p_at]
        lq = q_logprobs[row, q_at]
        kl = float(np.sum(np.exp(lp) * (lp - lq)))
        rest_p = 1.0 - float(np.sum(np.exp(lp)))
        rest_q = 1.0 - float(np.sum(np.exp(lq)))
        if rest_p > _ROUNDING:  # below that, the bucket is rounding error of the sums
            kl += rest_p * (np.log(rest_p) - np.log(max(rest_q, _ROUNDING)))
        result[row] = kl
    return result


@dataclass
class PairResult:
    """One session (or record) against the reference."""

    reference: str                  # "cuda:fp32"
    other: str                      # "mlx:q4"
    positions: int                  # distinct positions compared (prompt + shared reply prefix, all prompts)
    kl_mean: float
    kl_p99: float
    kl_max: float
    kl_exact: bool                  # False: a lower bound from top-k lists (a record was involved)
    top1: float                     # fraction of positions with the same most likely token
    top5: float                     # mean overlap of the 5 most likely tokens, as a fraction
    greedy_same: int                # prompts whose greedy replies are identical
    greedy_prompts: int             # prompts with a greedy reply on both sides
    greedy_first_diff: list[int | None]  # per prompt: index of the first different reply token, None if same
    greedy_matched: list[int]       # per prompt with replies: tokens the two replies share before they part
    ppl_reference: float            # perplexity of each side on the prompts' tokens
    ppl_other: float
    answers: dict[str, tuple[str, str]]  # prompt name -> (reference's reply, other's reply)
    thresholds: Thresholds
    passed: bool
    reasons: list[str] = field(default_factory=list)  # why it failed, in words

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def to_json(self) -> dict:
        return {
            "reference": self.reference,
            "other": self.other,
            "positions": self.positions,
            "kl_mean": self.kl_mean,
            "kl_p99": self.kl_p99,
            "kl_max": self.kl_max,
            "kl_exact": self.kl_exact,
            "top1": self.top1,
            "top5": self.top5,
            "greedy_same": self.greedy_same,
            "greedy_prompts": self.greedy_prompts,
            "greedy_first_diff": self.greedy_first_diff,
            "greedy_matched": self.greedy_matched,
            "ppl_reference": self.ppl_reference,
            "ppl_other": self.ppl_other,
            "answers": {name: {"reference": a, "other": b} for name, (a, b) in self.answers.items()},
            "thresholds": {"scheme": self.thresholds.scheme, "max_kl": self.thresholds.max_kl,
                           "min_top1": self.thresholds.min_top1},
            "verdict": self.verdict,
            "reasons": self.reasons,
        }


def check_comparable(reference: Capture, other: Capture) -> None:
    """Refuse, with the reason, two captures that are not of the same model, tokenizer and prompts."""
    a, b = reference.meta, other.meta
    for key, what in (("config_sha256", "model config"), ("tokenizer_sha256", "tokenizer")):
        if a.get(key) and b.get(key) and a[key] != b[key]:
            raise UserInputError(
                f"not the same {what}: {reference.label} ran {a['model']} ({what} {a[key][:12]}), "
                f"{other.label} ran {b['model']} ({what} {b[key][:12]})"
            )
    names_a = [p.name for p in reference.prompts]
    names_b = [p.name for p in other.prompts]
    if names_a != names_b:
        raise UserInputError(f"not the same prompts: {', '.join(names_a)} vs {', '.join(names_b)}")
    for pa, pb in zip(reference.prompts, other.prompts):
        if pa.prompt_ids.tolist() != pb.prompt_ids.tolist():
            raise UserInputError(f"prompt '{pa.name}' has different token ids in the two runs (another tokenizer?)")


def first_new_positions(capture_: Capture) -> list[int]:
    """Per prompt, the first position not already seen in an earlier prompt. Prompts rendered with
    one chat template share a prefix (the default system prompt, ...); positions there have the same
    prefix, hence the same distribution, and are counted once, with the first prompt."""
    starts = []
    for index, prompt in enumerate(capture_.prompts):
        ids = prompt.prompt_ids.tolist()
        shared = [common_prefix(ids, earlier.prompt_ids.tolist()) for earlier in capture_.prompts[:index]]
        starts.append(max(shared, default=0))
    return starts


def perplexity(capture_: Capture) -> float:
    """exp of the mean negative log-likelihood of the prompts' tokens (each position counted once)."""
    import numpy as np

    starts = first_new_positions(capture_)
    nll = np.concatenate([-p.next_logprob[start: len(p.prompt_ids) - 1] for p, start in zip(capture_.prompts, starts)])
    return float(np.exp(np.mean(nll))) if nll.size else float("nan")


def compare(
    reference: Capture,
    other: Capture,
    thresholds: Thresholds | None = None,
    *,
    require_same_model: bool = True,
) -> PairResult:
    """Compare `other` against `reference` at every position where both saw the same tokens."""
    import numpy as np

    if require_same_model:
        check_comparable(reference, other)
    if thresholds is None:
        thresholds = thresholds_for(reference.scheme, other.scheme)
    pairs = list(zip(reference.prompts, other.prompts))
    agreements = [position_agreement(pa, pb, start) for (pa, pb), start in zip(pairs, first_new_positions(reference))]
    greedy_same, greedy_prompts, first_diffs, matched = greedy_agreement(pairs)
    kl = np.concatenate([a.kl for a in agreements])
    top1_rate = float(np.mean(np.concatenate([a.top1 for a in agreements])))
    kl_mean = float(np.mean(kl))
    reasons = failure_reasons(kl_mean, top1_rate, thresholds)
    return PairResult(
        reference=reference.label,
        other=other.label,
        positions=int(kl.size),
        kl_mean=kl_mean,
        kl_p99=float(np.percentile(kl, 99)),
        kl_max=float(np.max(kl)),
        kl_exact=all(a.exact for a in agreements),
        top1=top1_rate,
        top5=float(np.mean(np.concatenate([a.top5 for a in agreements]))),
        greedy_same=greedy_same,
        greedy_prompts=greedy_prompts,
        greedy_first_diff=first_diffs,
        greedy_matched=matched,
        ppl_reference=perplexity(reference),
        ppl_other=perplexity(other),
        answers={pa.name: (pa.reply_text, pb.reply_text) for pa, pb in pairs},
        thresholds=thresholds,
        passed=not reasons,
        reasons=reasons,
    )


@dataclass(frozen=True)
class PositionAgreement:
    """One prompt's positions compared: those from its first new one up to the last both sides saw alike."""

    kl: "np.ndarray"      # float64 per position: KL(reference || other)
    exact: bool           # False: a lower bound from top-k lists (a record was involved)
    top1: "np.ndarray"    # bool per position: the same most likely token
    top5: "np.ndarray"    # per position: the overlap of the 5 most likely tokens, as a fraction


def position_agreement(pa: PromptCapture, pb: PromptCapture, start: int) -> PositionAgreement:
    """KL, top-1 and top-5 agreement of one prompt from position `start` on, where both saw the same tokens."""
    import numpy as np

    # position i saw tokens 0..i: the same on both sides while i < the shared prefix; the last
    # such position is the one that predicts the first token where the two replies part
    n = common_prefix(pa.token_ids.tolist(), pb.token_ids.tolist())
    exact = pa.logits is not None and pb.logits is not None
    if exact:
        kl = kl_exact(pa.logits[start:n], pb.logits[start:n])
    else:
        kl = kl_top_k(
            pa.top_ids[start:n], pa.top_logits[start:n].astype(np.float64) - pa.logsumexp[start:n, None],
            pb.top_ids[start:n], pb.top_logits[start:n].astype(np.float64) - pb.logsumexp[start:n, None],
        )
    top1 = pa.top_ids[start:n, 0] == pb.top_ids[start:n, 0]
    top5 = np.array([len(np.intersect1d(pa.top_ids[i, :5], pb.top_ids[i, :5])) / 5 for i in range(start, n)])
    return PositionAgreement(kl, exact, top1, top5)


def greedy_agreement(
    pairs: Sequence[tuple[PromptCapture, PromptCapture]],
) -> tuple[int, int, list[int | None], list[int]]:
    """How far the greedy replies agree: (prompts whose replies are identical, prompts with a reply on
    either side, per prompt the index of the first different reply token or None, per prompt with a
    reply the tokens the two replies share before they part)."""
    identical = 0
    first_diffs: list[int | None] = []
    matched: list[int] = []
    for pa, pb in pairs:
        if not (len(pa.reply_ids) or len(pb.reply_ids) or pa.reply_text or pb.reply_text):
            first_diffs.append(None)
            continue
        same = common_prefix(pa.reply_ids.tolist(), pb.reply_ids.tolist())
        matched.append(same)
        if same == len(pa.reply_ids) == len(pb.reply_ids):
            identical += 1
            first_diffs.append(None)
        else:
            first_diffs.append(same)
    return identical, len(matched), first_diffs, matched


def failure_reasons(kl_mean: float, top1_rate: float, thresholds: Thresholds) -> list[str]:
    """Why a pair fails its thresholds, in words; none when it passes."""
    reasons = []
    if not kl_mean <= thresholds.max_kl:  # written so that NaN fails
        reasons.append(f"mean KL {kl_mean:.3g} > {thresholds.max_kl:g}")
    if not top1_rate >= thresholds.min_top1:
        reasons.append(f"top-1 {top1_rate:.1%} < {thresholds.min_top1:.0%}")
    return reasons


# ---- records: a capture on disk, to compare across machines --------------------------------------
# A `.parity` file is a zip: meta.json (readable with `unzip -p FILE meta.json`) and one .npy per
# array, named "<prompt index>/<array>.npy". No pickles: np.load runs with allow_pickle=False.

_ARRAYS = ("prompt_ids", "reply_ids", "top_ids", "top_logits", "logsumexp", "next_logprob")


def write_record(capture_: Capture, path: str | Path) -> Path:
    import numpy as np

    path = user_path(path)
    meta = dict(capture_.meta)
    meta["replies"] = [p.reply_text for p in capture_.prompts]
    tmp = path.with_name(path.name + ".partial")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("meta.json", json.dumps(meta, indent=2, sort_keys=True))
            for index, prompt in enumerate(capture_.prompts):
                for name in _ARRAYS:
                    buffer = io.BytesIO()
                    np.save(buffer, getattr(prompt, name), allow_pickle=False)
                    archive.writestr(f"{index}/{name}.npy", buffer.getvalue())
        tmp.replace(path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserInputError(f"{path}: cannot write the record ({error.strerror})") from None
    return path


RECORD_MAX_ENTRY_BYTES = 1 << 30      # one array of top-k logits: ~0.5 KB per position
RECORD_MAX_BYTES = 4 << 30            # everything in a record, uncompressed (a zip can claim far more)

# array -> (numpy kind: "i" integers, "f" floats; dimensions)
_ARRAY_KINDS = {"prompt_ids": ("i", 1), "reply_ids": ("i", 1), "top_ids": ("i", 2), "top_logits": ("f", 2),
                "logsumexp": ("f", 1), "next_logprob": ("f", 1)}


def read_record(path: str | Path) -> Capture:
    """A `.parity` record, checked: its meta (format, model, backend, quant, prompts and replies),
    and every array's kind and shape against the others, so that a record of the wrong shape is
    one clear error here, not a traceback in the comparison. Sizes are checked before anything is
    decompressed."""
    path = user_path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such record file")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            too_big = [i.filename for i in infos if i.file_size > RECORD_MAX_ENTRY_BYTES]
            if too_big or sum(i.file_size for i in infos) > RECORD_MAX_BYTES:
                raise UserInputError(f"{path}: not a runner parity record ({', '.join(too_big[:1]) or 'its content'} "
                                     "is larger than any record runner writes)")
            meta = _record_meta(parse_json(archive.read("meta.json"), f"{path}: meta.json"), path)
            prompts = []
            for index, (spec, reply) in enumerate(zip(meta["prompts"], meta["replies"])):
                arrays = {name: _record_array(archive, f"{index}/{name}.npy", path) for name in _ARRAYS}
                _check_record_arrays(arrays, f"{path}: prompt {index + 1}")
                prompts.append(PromptCapture(name=spec["name"], reply_text=reply, **arrays))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, ValueError, EOFError, NotImplementedError,
            RuntimeError, zlib.error) as error:   # RuntimeError: an encrypted entry
        raise UserInputError(f"{path}: not a runner parity record ({str(error)[:200]})") from None
    except OSError as error:
        raise UserInputError(f"{path}: cannot read the record ({error.strerror or error})") from None
    return Capture(meta, prompts)


def _record_meta(meta: Any, path: Path) -> dict:
    def bad(what: str) -> UserInputError:
        return UserInputError(f"{path}: not a runner parity record (meta.json: {what})")

    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    if meta.get("format") != RECORD_FORMAT:
        raise UserInputError(f"{path}: format {one_line(repr(meta.get('format')), 40)}, runner reads {RECORD_FORMAT}")
    for key in ("model", "backend", "quant"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise bad(f"'{key}' must be a string")
    if meta["quant"] not in PRECISION_CLASS:
        raise bad(f"unknown quant {one_line(meta['quant'], 40)!r} (known: {', '.join(PRECISION_CLASS)})")
    kv_bits = meta.get("kv_bits")
    if kv_bits is not None and (type(kv_bits) is not int or kv_bits not in KV_CLASS):
        raise bad(f"'kv_bits' must be null, 8 or 4, not {one_line(str(kv_bits), 40)}")
    for key in ("config_sha256", "tokenizer_sha256"):
        if not isinstance(meta.get(key, ""), str):
            raise bad(f"'{key}' must be a string")
    prompts, replies = meta.get("prompts"), meta.get("replies")
    if not isinstance(prompts, list) or not all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in prompts):
        raise bad("'prompts' must be a list of objects with a 'name'")
    if not isinstance(replies, list) or len(replies) != len(prompts) or not all(isinstance(r, str) for r in replies):
        raise bad("'replies' must be a list of strings, one per prompt")
    if not prompts:
        raise bad("no prompts")
    return meta


def _record_array(archive: zipfile.ZipFile, name: str, path: Path) -> "np.ndarray":
    import numpy as np

    data = archive.read(name)
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(stream)
    if math.prod(shape) * dtype.itemsize > len(data):   # np.load would allocate what the header claims first
        raise ValueError(f"{name} claims {shape} {dtype} in {len(data)} bytes")
    array = np.load(io.BytesIO(data), allow_pickle=False)
    kind, dimensions = _ARRAY_KINDS[name.split("/")[-1][: -len(".npy")]]
    kind_ok = array.dtype.kind == kind or (kind == "i" and array.dtype.kind == "u")
    if not kind_ok or array.ndim != dimensions:
        raise UserInputError(f"{path}: not a runner parity record ({name} is {array.ndim}-D {array.dtype}, "
                             f"not {dimensions}-D {'integers' if kind == 'i' else 'floats'})")
    return array


def _check_record_arrays(arrays: dict, where: str) -> None:
    """The shapes `capture` writes: p prompt ids, r reply ids, n = p + r positions of top-k lists,
    logsumexps, and n - 1 next-token log probabilities."""
    positions = len(arrays["prompt_ids"]) + len(arrays["reply_ids"])
    k = arrays["top_ids"].shape[1]
    expected = {"top_ids": (positions, k), "top_logits": (positions, k), "logsumexp": (positions,),
                "next_logprob": (max(positions - 1, 0),)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise UserInputError(f"{where}: {name} has shape {arrays[name].shape}, expected {shape} "
                                 f"({positions} positions, top-{k})")
    if not len(arrays["prompt_ids"]) or not k:
        raise UserInputError(f"{where}: no prompt tokens or an empty top-k list")


# ---- the whole run: load, capture, close, one session at a time ----------------------------------


@dataclass
class Skipped:
    target: str
    reason: str


@dataclass
class ParityReport:
    reference: Capture
    results: list[PairResult]
    skipped: list[Skipped]
    warnings: list[str]
    others: list[Capture] = field(default_factory=list)  # the other captures' meta (logits dropped)

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)


def load_session(spec: "ModelSpec", target: Target, context: int) -> "Session":
    """The target's session through the one path (plan, refusal, load); logits need no chat template."""
    from runner.choice import LoadOptions, open_session, resolve
    from runner.hardware import detect_machine

    choice = resolve(spec, detect_machine(), target.backend, target.quant, context, kv_bits=target.kv_bits)
    return open_session(choice, LoadOptions(chat=False))


def run_parity(
    spec: "ModelSpec",
    reference: Target,
    others: Sequence[Target],
    prompts: Sequence[Prompt],
    *,
    context: int,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    top_k_size: int = DEFAULT_TOP_K,
    max_kl: float | None = None,
    min_top1: float | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> ParityReport:
    """Load the reference, capture it, close it; then each other target in turn. A target that
    cannot load here (backend missing, quant not offered) is skipped with the reason."""
    warnings: list[str] = []

    def warn(message: str) -> None:
        if message not in warnings:
            warnings.append(message)
            progress(f"warning: {message}")

    progress(f"loading {reference.label} (reference)")
    session = load_session(spec, reference, context)
    try:
        progress(f"running {len(prompts)} prompts through {reference.label}")
        ref = capture(session, prompts, context=context, max_tokens=max_tokens, top_k_size=top_k_size,
                      kv_bits=reference.kv_bits, warn=warn)
    finally:
        session.close()
    results, skipped, other_captures = [], [], []
    for target in others:
        progress(f"loading {target.label}")
        try:
            session = load_session(spec, target, context)
        except RunnerError as error:
            skipped.append(Skipped(target.label, str(error)))
            progress(f"skipped {target.label}: {error}")
            continue
        try:
            progress(f"running {len(prompts)} prompts through {target.label}")
            other = capture(session, prompts, token_ids=ref.prompt_ids(), context=context, max_tokens=max_tokens,
                            top_k_size=top_k_size, kv_bits=target.kv_bits, warn=warn)
        finally:
            session.close()
        results.append(compare(ref, other, thresholds_for(reference.scheme, target.scheme, max_kl, min_top1)))
        other.drop_logits()
        other_captures.append(other)
    return ParityReport(ref, results, skipped, warnings, other_captures)


# ---- output --------------------------------------------------------------------------------------


def _class_or_unknown(scheme: str) -> str:
    try:
        return precision_class(scheme)
    except UserInputError:
        return "?"


def format_table(reference: Capture, results: Sequence[PairResult], skipped: Sequence[Skipped] = (),
                 answer_prompt: str | None = None) -> str:
    """The comparison as a plain-text table, one row per session, the reference first."""
    if answer_prompt is None and reference.prompts:
        answer_prompt = reference.prompts[0].name
    positions = results[0].positions if results else sum(len(p.token_ids) for p in reference.prompts)
    exact = all(r.kl_exact for r in results)
    lines = [
        f"model {reference.meta['model']} · reference {reference.label} · {len(reference.prompts)} prompts · "
        f"KL(reference || session) in nats per position{'' if exact else ', from top-k (a lower bound)'}",
    ]
    header = ("session", "scheme", "KL mean", "KL p99", "KL max", "top-1", "top-5", "greedy same", "ppl",
              f"answer to '{answer_prompt}'", "verdict")
    ref_answer = next((p.reply_text for p in reference.prompts if p.name == answer_prompt), "")
    rows = [(reference.label, precision_class(reference.scheme), "", "", "", "", "", "",
             f"{results[0].ppl_reference:.2f}" if results else "", one_line(ref_answer, 40), "reference")]
    for r in results:
        scheme = r.other.partition(":")[2]
        verdict = r.verdict + (": " + "; ".join(r.reasons) if r.reasons else f" ({r.thresholds.describe()})")
        rows.append((
            r.other, _class_or_unknown(scheme),
            f"{r.kl_mean:.2e}", f"{r.kl_p99:.2e}", f"{r.kl_max:.2e}", f"{r.top1:.1%}", f"{r.top5:.1%}",
            f"{r.greedy_same}/{r.greedy_prompts} ({sum(r.greedy_matched) / max(1, len(r.greedy_matched)):.1f})",
            f"{r.ppl_other:.2f}",
            one_line(r.answers.get(answer_prompt, ("", ""))[1], 40), verdict,
        ))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    lines.append(f"{positions} positions compared for the first pair; greedy same = prompts whose greedy replies "
                 "are token-for-token identical (mean tokens shared before the first difference)")
    for skip in skipped:
        lines.append(f"skipped {skip.target}: {skip.reason}")
    return "\n".join(lines)


def report_json(reference: Capture, results: Sequence[PairResult], skipped: Sequence[Skipped] = (),
                warnings: Sequence[str] = (), others: Sequence[Capture] = ()) -> dict:
    def describe(c: Capture) -> dict:
        keys = ("model", "config_sha256", "tokenizer_sha256", "backend", "quant", "kv_bits", "device", "machine",
                "versions", "memory", "date", "seconds")
        return {key: c.meta.get(key) for key in keys}

    return {
        "reference": describe(reference),
        "sessions": [describe(c) for c in others],
        "results": [r.to_json() for r in results],
        "skipped": [{"target": s.target, "reason": s.reason} for s in skipped],
        "warnings": list(warnings),
        "passed": all(r.passed for r in results),
    }

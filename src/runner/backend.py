"""The Backend and Session protocols, the values they exchange, and the backend registry.

Front ends (CLI, TUI, parity, bench) talk only to these. A backend lives in its own package
under `backends/` and imports its heavy stack (torch, mlx) only when it loads a model.

    backend = get_backend("cuda")          # raises BackendUnavailable with the install command
    session = backend.load(LoadRequest(spec, quant="nf4", context=4096, plan=plan))
    for chunk in session.stream([Message("user", "Hi")], Sampling(max_tokens=64)):
        print(chunk.text, end="")
    session.close()
"""

from __future__ import annotations

import importlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

from runner.errors import BackendUnavailable, UserInputError
from runner.words import counted

if TYPE_CHECKING:  # numpy is light, but the core does not need it at import time
    import numpy as np

    from runner.budget import Plan
    from runner.model import ModelSpec


@dataclass(frozen=True)
class Message:
    role: str      # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None

    def __post_init__(self) -> None:
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        # logits / temperature must stay finite in float32: below 1e-6 a logit of 40 overflows
        if not number(self.temperature) or not (self.temperature == 0 or 1e-6 <= self.temperature <= 1e6):
            raise UserInputError(f"temperature must be 0 (greedy) or between 1e-06 and 1e+06, not {self.temperature!r:.30}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise UserInputError(f"top-p must be in (0, 1], not {self.top_p!r:.30}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise UserInputError(f"max tokens must be a whole number of at least 1, not {self.max_tokens!r:.30}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 1 << 64):
            raise UserInputError("seed must be a whole number from 0 to 2**64 - 1 (torch and mlx take 64 bits)")


@dataclass(frozen=True)
class GenerationChunk:
    """One step of a streamed reply, the same shape from every backend (after mlx-lm's
    GenerationResponse). `text` is the new text since the previous chunk (may be empty while a
    multi-byte character is incomplete); the last chunk has `finish_reason` set. A reply that ends
    on an end-of-sequence token ends with a "stop" chunk whose `token` is that id, with no text,
    counted in `generation_tokens` (as OpenAI-compatible servers count it in completion_tokens)."""

    text: str
    token: int | None                 # the token id produced at this step (None on a "cancelled" chunk)
    prompt_tokens: int
    prompt_tps: float                 # prefill tokens per second
    generation_tokens: int            # tokens generated so far, an end-of-sequence token included
    generation_tps: float             # decode tokens per second so far (after the first token)
    time_to_first_token: float        # seconds from the call to the first generated token
    peak_memory: int                  # bytes, the backend's own peak measure (0 if unknown)
    finish_reason: str | None = None  # None while streaming; "stop", "length" or "cancelled"
    reused_tokens: int = 0            # prompt tokens whose KV cache was kept from the previous reply (not prefilled)


def checked_prompt(prompt: Sequence[int], context: int, model_max_context: int) -> list[int]:
    """A prompt's ids that leave room for at least one reply token in `context`; one clear line
    otherwise (every backend checks before its generator starts)."""
    prompt = list(prompt)
    if not prompt:
        raise UserInputError("the prompt is empty")
    if len(prompt) >= context:
        raise UserInputError(
            f"the prompt is {counted(len(prompt), 'token')} but the context is {context}: shorten it or raise "
            f"--context (the model handles up to {model_max_context})"
        )
    return prompt


def reply_seed(sampling: Sampling) -> int:
    """The seed of a sampled reply: the one asked for, else a fresh one (63 bits: torch and numpy take it)."""
    return sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1


class TokenStreaming:
    """`stream` and `stream_tokens` of a session whose decode loop is `_decode(prompt, sampling,
    cancel, started)`: the chat template, then the prompt's ids checked against the session's
    `context` before the generator starts (so a bad prompt is one line, not a broken stream)."""

    context: int
    model: "ModelSpec"

    def stream(self, messages: Sequence[Message], sampling: Sampling,
               cancel: threading.Event | None = None) -> Iterator[GenerationChunk]:
        started = time.perf_counter()
        return self.stream_tokens(self.tokenize(messages), sampling, cancel, started)

    def stream_tokens(self, prompt: Sequence[int], sampling: Sampling, cancel: threading.Event | None = None,
                      started: float | None = None) -> Iterator[GenerationChunk]:
        prompt = checked_prompt(prompt, self.context, self.model.max_context)
        return self._decode(prompt, sampling, cancel, started or time.perf_counter())


@dataclass(frozen=True)
class LoadProgress:
    """Progress of a load, drawn by the CLI and the TUI."""

    stage: str       # what is happening, in the user's words: "reading shards", "quantizing", ...
    done: int
    total: int       # 0 when unknown
    unit: str = ""   # "bytes", "shards", "layers", ...


@dataclass(frozen=True)
class LoadRequest:
    model: "ModelSpec"                    # must have a `path` with weights, except for rehearsals
    quant: str                            # "bf16", "fp16", "fp32", "nf4", "fp4", "int8", "fp8", "q4", "q8"
    context: int                          # the longest prompt + reply the session must hold
    plan: "Plan | None" = None            # the placement to follow; None: the backend plans itself
    allow_offload: bool = False           # allow CPU/disk offload the plan says is needed
    trust_remote_code: bool = False
    on_progress: Callable[[LoadProgress], None] | None = None
    kv_bits: int | None = None            # None: the KV cache in the compute dtype; 8 or 4: quantized
    fast_decode: bool = True              # the backend's own fast decode path where it has one
    kernel: str | None = None             # a backend's named kernel choice (e.g. cuda's NF4 GEMV); None: its default


@dataclass(frozen=True)
class MemoryReport:
    """Measured bytes per device after a load ("cuda:0", "cpu", "mlx", ...), next to the plan's."""

    measured: dict[str, int]
    planned: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)


class Session(Protocol):
    """A loaded model, ready to answer."""

    backend: str          # "cuda", "mlx", ...
    quant: str
    model: "ModelSpec"
    device_summary: str   # placement in words, e.g. "cuda:0 (all 32 layers), sdpa attention"
    warnings: tuple[str, ...]  # what the user must know about this load (wired limit, offload...), in words

    def tokenize(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of `messages` rendered with the tokenizer's chat template, ready for a reply."""

    def stream(
        self, messages: Sequence[Message], sampling: Sampling, cancel: threading.Event | None = None
    ) -> Iterator[GenerationChunk]:
        """Stream a reply. Setting `cancel` stops between tokens; the last chunk says why it ended."""

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, as the model's tokenizer makes them (no chat template)."""

    def stream_tokens(
        self, prompt: Sequence[int], sampling: Sampling, cancel: threading.Event | None = None
    ) -> Iterator[GenerationChunk]:
        """Stream a reply to ready-made token ids (what `stream` does after the chat template)."""

    def logits(self, token_ids: Sequence[int]) -> "np.ndarray":
        """float32 next-token logits for every position: shape (len(token_ids), vocab)."""

    def memory(self) -> MemoryReport:
        """Measured bytes per device, from the allocator."""

    def close(self) -> None:
        """Free the model's memory."""


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""     # why not, in words
    install: str = ""    # the command that fixes it


class Backend(Protocol):
    name: str

    def availability(self) -> Availability:
        """Can this backend run here? Cheap: no model is loaded."""

    def load(self, request: LoadRequest) -> Session:
        """Load the model as planned; raise LoadError / DoesNotFit with a message a user can act on."""


# ---- registry -----------------------------------------------------------------------------
# The one place that names the backends: name -> "module:class". The module is a backend package's
# light __init__ (no torch, no mlx); the class says what the backend takes (`quants`,
# `quality_order`, `rehearse_quants`, `install`, `packages`). Adding a backend is one package and
# one line here.
BACKENDS: dict[str, str] = {
    "cuda": "runner_cuda:CudaBackend",
    "mlx": "runner_mlx:MlxBackend",
    "llamacpp": "runner_llamacpp:LlamaCppBackend",
}


def backend_names() -> list[str]:
    return list(BACKENDS)


def backend_class(name: str):
    """The backend's class, for what it declares; imports only the backend package's light __init__."""
    if name not in BACKENDS:
        raise UserInputError(f"unknown backend '{name}' (known: {', '.join(BACKENDS)})")
    module_name, attribute = BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise BackendUnavailable(f"backend '{name}' is not installed ({error}); "
                                 f"install it with: pip install 'runner[{name}]'") from None
    return getattr(module, attribute)


def installed_backends() -> dict[str, type]:
    """name -> class of the registered backends whose package imports here, in registry order
    (a backend whose own libraries are missing still imports: `availability()` says so)."""
    classes = {}
    for name in BACKENDS:
        try:
            classes[name] = backend_class(name)
        except BackendUnavailable:
            continue
    return classes


def backend_quants(name: str) -> tuple[str, ...]:
    """The schemes backend `name` loads, in the CLI's words."""
    return tuple(backend_class(name).quants)


def all_quants() -> tuple[str, ...]:
    """Every scheme some backend loads, each once, in registry order."""
    return tuple(dict.fromkeys(q for name in BACKENDS for q in backend_quants(name)))


def get_backend(name: str, *, check: bool = True) -> Backend:
    """The backend called `name`; with `check`, raise BackendUnavailable if it cannot run here."""
    backend = backend_class(name)()
    if check:
        availability = backend.availability()
        if not availability.ok:
            hint = f"; {availability.install}" if availability.install else ""
            raise BackendUnavailable(f"backend '{name}' cannot run here: {availability.reason}{hint}")
    return backend

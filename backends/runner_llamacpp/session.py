"""LlamaCppSession: a GGUF model loaded by llama-cpp-python behind runner's Session protocol.

The decode loop is runner's own over `Llama.eval` (one token per step, so cancelling between
tokens is a flag check) with the same sampling as the other backends (greedy, or temperature and
top-p with a seed), from the last position's logits.

llama.cpp keeps its KV cache in the context between calls, with the ids in it (`Llama.input_ids`
up to `Llama.n_tokens`): the next prompt's common prefix with them (`runner.prefix_cache`) is not
prefilled again; the cache is cut back to it (`llama_memory_seq_rm`), or cleared where it cannot be.

The prompt is the chat template from the GGUF rendered by the core's limited renderer
(`runner.templates.render`), then tokenized by llama.cpp's own tokenizer with special tokens parsed.

Two schemes: `gguf` runs the file as stored; `fp16` runs runner's F16 copy of it (`f16.py`: the
same weights without llama.cpp's 8-bit rounding of activations for quantized types).
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import io
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from runner.backend import (GenerationChunk, LoadProgress, LoadRequest, MemoryReport, Message, Sampling, TokenStreaming,
                            reply_seed)
from runner_llamacpp.plan_rules import BATCH   # tokens per llama_decode, as the plan counts them
from runner.errors import CorruptWeights, GenerationError, LoadError, UserInputError
from runner.prefix_cache import reusable_prefix
from runner.reply_clock import ReplyClock, reply_chunks
from runner.words import counted

if TYPE_CHECKING:
    import numpy as np

    from runner.budget import Plan
    from runner.gguf import GgufFile
    from runner.model import ModelSpec

# --kv-bits -> ggml's KV cache type: Q8_0 (34 bytes per 32 values) and Q4_0 (18 per 32) are the
# plan's kv_dtype_bytes exactly (bits/8 + a 2-byte scale per 32); V quantized needs flash attention
KV_TYPES = {8: 8, 4: 2}       # GGML_TYPE_Q8_0, GGML_TYPE_Q4_0
MAX_TEMPLATE_BYTES = 256 * 1024   # llama-cpp-python compiles every template of the file when it loads it


def pick_token(logits: "np.ndarray", sampling: Sampling, generator) -> int:
    """Greedy (temperature 0) or sampled with temperature and nucleus (top-p) from float32 logits,
    as the cuda backend's `pick_token` does it, in numpy."""
    import numpy as np

    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        keep = np.cumsum(sorted_probs) - sorted_probs < sampling.top_p   # always at least the first
        kept = sorted_probs * keep
        return int(order[generator.choice(len(kept), p=kept / kept.sum())])
    return int(generator.choice(len(probs), p=probs))


class LlamaCppSession(TokenStreaming):
    backend = "llamacpp"

    def __init__(self, llm, spec: "ModelSpec", quant: str, context: int, plan: "Plan | None", template: str | None,
                 special_tokens: dict[str, str], device_summary: str, warnings: tuple[str, ...],
                 log, threads: int) -> None:
        from runner_llamacpp.compat import eog_ids

        self.llm = llm
        self.model = self.spec = spec
        self.quant = quant                       # "gguf": the file as stored; "fp16": runner's F16 copy
        self.context = context
        self.plan = plan
        self.template = template
        self.special_tokens = special_tokens      # bos_token, eos_token: what templates may name
        self.device_summary = device_summary
        self.warnings = warnings
        self.eos_ids = eog_ids(llm)
        self.buffers = log.buffers()             # bytes per device llama.cpp allocated for this load
        self.kv_cache_bytes = log.kinds().get("KV", 0)   # ... of which its KV cache
        self.threads = threads                   # CPU threads llama.cpp computes with
        self._lock = threading.Lock()            # one reply at a time

    # ---- prompt ---------------------------------------------------------------------------
    def tokenize(self, messages: Sequence[Message]) -> list[int]:
        from runner.templates import render

        if not self.template:
            raise UserInputError(
                f"{self.spec.name} has no chat template: it looks like a base model, not a chat (instruct) "
                "model; runner does not invent a template: use an -Instruct model"
            )
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        text = render(self.template, conversation, self.special_tokens, self.spec.name)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def encode(self, text: str) -> list[int]:
        """Plain text as llama.cpp tokenizes it, with a BOS where the file says its model wants one."""
        add_bos = str(self.llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    # ---- the KV cache llama.cpp keeps -----------------------------------------------------
    def _reuse(self, prompt: list[int]) -> int:
        """Cut the context's cache back to its common prefix with `prompt`; how many tokens it keeps."""
        from runner_llamacpp.compat import cut_cache

        held = self.llm.input_ids[: self.llm.n_tokens].tolist()
        reused = reusable_prefix(held, prompt)
        if not cut_cache(self.llm, reused):
            reused = 0
            cut_cache(self.llm, 0)
        self.llm.n_tokens = reused
        return reused

    # ---- streaming (stream and stream_tokens: TokenStreaming) -----------------------------
    def _decode(self, prompt: list[int], sampling: Sampling, cancel, started: float) -> Iterator[GenerationChunk]:
        if not self._lock.acquire(blocking=False):
            raise GenerationError("this session is already generating a reply")
        try:
            limit = min(sampling.max_tokens, self.context - len(prompt))
            reused = self._reuse(prompt)
            clock = ReplyClock(len(prompt), reused, started)
            tokens = self._tokens(prompt[reused:], sampling)
            yield from reply_chunks(tokens, ReplyBytes(self.llm), clock, limit, self.eos_ids, cancel,
                                    lambda: self.buffer_bytes)
        finally:
            self._lock.release()

    def _tokens(self, feed: list[int], sampling: Sampling) -> Iterator[int]:
        """The reply's ids, `feed` evaluated first, then each id picked from the last logits."""
        import numpy as np

        from runner_llamacpp.compat import last_logits

        generator = np.random.default_rng(reply_seed(sampling)) if sampling.temperature > 0 else None
        while True:
            try:
                self.llm.eval(feed)
            except Exception as error:    # llama_decode failed: the cache's state is unknown
                self.llm.n_tokens = 0
                raise GenerationError(f"llama.cpp failed while generating: {error}") from None
            token = pick_token(last_logits(self.llm), sampling, generator)
            yield token
            feed = [token]

    @property
    def buffer_bytes(self) -> int:
        """The bytes of llama.cpp's buffers for this load: what a chunk reports as its peak memory."""
        return sum(self.buffers.values())

    # ---- parity ----------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> "np.ndarray":
        """Every position's logits, BATCH tokens per llama_decode from an empty cache (which is
        then dropped: the next reply prefills from the start)."""
        from runner_llamacpp.compat import all_logits

        token_ids = [int(t) for t in token_ids]
        if not token_ids:
            raise UserInputError("logits() needs at least one token id")
        if len(token_ids) > self.context:
            raise UserInputError(f"{len(token_ids)} tokens is more than this session's context ({self.context})")
        with self._lock:
            self.llm.n_tokens = 0
            try:
                return all_logits(self.llm, token_ids, BATCH)
            except RuntimeError as error:
                raise GenerationError(f"llama.cpp failed while computing logits: {error}") from None

    # ---- memory ----------------------------------------------------------------------------
    def memory(self) -> MemoryReport:
        """What llama.cpp said it allocated for this load, per device: the weights' buffer (mapped
        from the file on a CPU), the KV cache, the compute and output buffers."""
        planned = {}
        if self.plan is not None:
            planned = {share.device: share.total_bytes for share in self.plan.placement if share.total_bytes}
        return MemoryReport(measured=dict(self.buffers), planned=planned, peak=dict(self.buffers))

    def close(self) -> None:
        if self.llm is None:
            return
        self.llm.close()
        self.llm = None
        gc.collect()


# ---- loading -------------------------------------------------------------------------------


class ReplyBytes:
    """A reply's text from its tokens' bytes, as llama.cpp stores them (a piece may end inside a
    UTF-8 character: the incremental decoder holds it back until the rest comes)."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        from runner_llamacpp.compat import token_bytes

        return self.decoder.decode(token_bytes(self.llm, token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def gguf_of(spec: "ModelSpec") -> Path:
    from runner.gguf import gguf_path

    if spec.source != "gguf":
        raise UserInputError(f"{spec.name}: the llamacpp backend runs GGUF files; this is a {spec.source} model "
                             "(config.json and safetensors): use the cuda or mlx backend, or give a .gguf file")
    return gguf_path(spec)


def gpu_layers(request: LoadRequest) -> int:
    """Decoder layers the plan puts on a GPU (or Metal): llama.cpp's n_gpu_layers (the output
    layer counts as one more when the head is there too)."""
    if request.plan is None:
        return 0
    on_gpu = [s for s in request.plan.placement if s.kind in ("gpu", "unified")]
    layers = sum(s.num_layers for s in on_gpu)
    return layers + (1 if any(s.head for s in on_gpu) else 0)


def offload_words(offload: int, num_layers: int) -> str:
    """llama.cpp's n_gpu_layers in words: it offloads the last layers first, the output layer
    with more than `num_layers` (the input embeddings stay in RAM)."""
    if offload > num_layers:
        return f"all {num_layers} layers and the output layer on the GPU"
    return f"the last {offload} of {num_layers} layers on the GPU"


def threads() -> int:
    """Threads for llama.cpp: the cores not already busy (1-minute load average), as the cuda
    backend picks torch's. llama.cpp's OpenMP threads spin while they wait for each other: on the
    2-core VM at load average 4, 2 threads decoded the default model at 4-6 tokens/s, 1 thread at
    70. An explicit OMP_NUM_THREADS is respected."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


def load_session(request: LoadRequest) -> LlamaCppSession:
    import llama_cpp  # noqa: F401  (first: a llama.cpp that cannot be imported fails before any F16 copy is made)

    from runner_llamacpp.compat import special_token_texts

    spec = request.model
    path = gguf_of(spec)
    if request.trust_remote_code:
        raise UserInputError("the llamacpp backend runs no repository code (--trust-remote-code)")
    path, file, stored = file_to_load(path, request)
    template = chat_template(path, file)
    offload, warnings = gpu_offload(request)
    llm, log, count = open_llama(path, request, offload)
    summary = describe(llm, request, offload, count, stored, file)
    return LlamaCppSession(llm, spec, request.quant, request.context, request.plan, template, special_token_texts(llm),
                           summary, warnings, log, count)


def file_to_load(path: Path, request: LoadRequest) -> tuple[Path, "GgufFile", str]:
    """The GGUF llama.cpp loads (`path` as stored, or for fp16 runner's F16 copy of it), its
    header, and the stored file's tensor types in words."""
    from runner.gguf import read_gguf

    file = read_gguf(path)     # checked before llama.cpp (or gguf-py) parses it
    stored = file.types_in_words()
    if request.quant == "fp16":
        from runner_llamacpp.f16 import f16_copy

        path = f16_copy(path, request.on_progress)
        file = read_gguf(path)
    return path, file, stored


def chat_template(path: Path, file: "GgufFile") -> str | None:
    """The file's chat template (None without one), refused when too large to load."""
    template = file.metadata.get("tokenizer.chat_template")
    template = template if isinstance(template, str) and template else None
    if template is not None and len(template.encode()) > MAX_TEMPLATE_BYTES:
        raise CorruptWeights(f"{path}: its chat template is {len(template.encode()):,} bytes; runner loads "
                             f"templates of at most {MAX_TEMPLATE_BYTES:,}")
    return template


def gpu_offload(request: LoadRequest) -> tuple[int, tuple[str, ...]]:
    """llama.cpp's n_gpu_layers for the plan, and a warning when this build cannot offload."""
    import llama_cpp

    offload = gpu_layers(request)
    if offload and not llama_cpp.llama_supports_gpu_offload():
        return 0, ("this llama-cpp-python was built without CUDA or Metal: every layer runs on the CPU "
                   "(reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\" for NVIDIA GPUs)",)
    return offload, ()


def open_llama(path: Path, request: LoadRequest, offload: int):
    """(llama.cpp's Llama for `path`, the log it wrote while loading, its CPU threads)."""
    import llama_cpp

    from runner_llamacpp.compat import capture_log

    kv_type = KV_TYPES.get(request.kv_bits)      # None: f16
    if request.on_progress is not None:
        request.on_progress(LoadProgress("loading the GGUF file (llama.cpp)", 0, 1, "files"))
    log = capture_log()
    count = threads()
    try:
        # op_offload: a plan with no layer on the GPU runs nothing there (by default a CUDA build
        # multiplies a prompt's batch on the GPU it finds: on an H200 such a session's logits were
        # the offloaded session's, bit for bit). flash attention: the compute buffer stays one
        # ubatch's logits at any context (without it, 166 MiB instead of 98 at 8k for the default
        # model, no faster). verbose=True: llama-cpp-python would otherwise point the process's
        # stdout and stderr at /dev/null while it loads (a chat screen drawn meanwhile is lost); its
        # C log comes to `log`, its own prints are caught here
        with log.recording(), contextlib.redirect_stderr(io.StringIO()):
            llm = llama_cpp.Llama(
                str(path), n_ctx=request.context, n_batch=BATCH, n_ubatch=BATCH, n_gpu_layers=offload,
                n_threads=count, n_threads_batch=count, logits_all=False, flash_attn=True, verbose=True,
                type_k=kv_type, type_v=kv_type, op_offload=offload > 0,
            )
    except (ValueError, RuntimeError, OSError) as error:
        detail = log.last_error() or str(error)
        raise LoadError(f"{path}: llama.cpp could not load it ({detail})") from None
    llm.verbose = False   # no more prints from llama-cpp-python
    if request.on_progress is not None:
        request.on_progress(LoadProgress("loading the GGUF file (llama.cpp)", 1, 1, "files"))
    return llm, log, count


def describe(llm, request: LoadRequest, offload: int, count: int, stored: str, file: "GgufFile") -> str:
    """The session's one-line summary: llama.cpp's version, where it runs, the weights, the context."""
    import llama_cpp

    where = offload_words(offload, request.model.num_layers) if offload else \
        f"CPU, {counted(count, 'thread')}"
    kv = f"; KV cache {request.kv_bits}-bit" if request.kv_bits else ""
    weights = f"GGUF as stored: {stored}" if request.quant != "fp16" else \
        f"GGUF ({stored}) as runner's F16 copy: {file.types_in_words()}"
    return f"llama.cpp {llama_cpp.__version__} ({where}); {weights}; context {llm.n_ctx()} tokens{kv}"


__all__ = ["LlamaCppSession", "load_session", "pick_token", "BATCH"]

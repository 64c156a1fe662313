"""CudaSession: a loaded transformers model behind runner's Session protocol.

The decode loop is our own, over the model's forward with a KV cache (`DynamicCache`), instead
of HF `generate` with a streamer thread: one token per step, so cancelling between tokens is a
flag check.

The session keeps the KV cache of its last reply with the token ids in it (`_kept`): the next
request's prompt usually starts with them (a chat's next turn), so only the rest is prefilled;
otherwise the cache is cut back to the common prefix (`runner.prefix_cache`), or dropped where it
cannot be cut. A cancelled reply keeps what it had. The ids are recorded only after each forward
has completed, so a reply that fails half-way through a forward leaves no cache behind.

The prompt goes through the model in chunks of `budget.PREFILL_CHUNK` tokens (`forward_in_chunks`,
which `runner rehearse` calls too), the lm_head only for each chunk's last position: the prefill's
activations are those of one chunk, which is what the Plan counts, whatever the prompt's length.

A faster path (static cache, CUDA graphs, fused kernels: `runner_cuda.fast`) replaces three
methods (`use_steps`): `new_cache()`, `forward_step(input_ids, cache)` and `trim_cache(cache, length)`,
and decodes a step ahead (`step_ahead`): the token is picked on the device and fed to the next step
before the host reads it, so the GPU runs step t + 1 while the host streams token t. A step fed
ahead of a reply's end (an end-of-sequence token, a cancel) is cut off the cache again, so the kept
ids are those of the ordinary loop.
"""

from __future__ import annotations

import inspect
import threading
from typing import TYPE_CHECKING, Iterator, Sequence

from runner.backend import GenerationChunk, MemoryReport, Message, Sampling, TokenStreaming, reply_seed
from runner.budget import PREFILL_CHUNK, check_kv_bits
from runner.detokenize import ReplyText
from runner.errors import GenerationError, UserInputError
from runner.prefix_cache import reusable_prefix
from runner.reply_clock import ReplyClock, reply_chunks
from runner.templates import chat_token_ids
from runner_cuda import compat
from runner_cuda.loading import cuda_allocated, decoder_layers, free_memory, placement_summary, tensor_bytes_by_device
from runner.words import counted

if TYPE_CHECKING:
    import numpy as np
    import torch

    from runner.budget import Plan
    from runner.model import ModelSpec

# the session's methods a fast path replaces (runner_cuda.fast.FastSteps has each)
FAST_STEPS = ("new_cache", "forward_step", "trim_cache", "greedy", "host_id")


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a reply: generation_config.json's list (Llama 3 has three), the
    config's, and the tokenizer's own end-of-sequence token."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x): the name this version's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def forward_in_chunks(model, input_ids: "torch.Tensor", cache, chunk: int, cache_name: str) -> "torch.Tensor":
    """Run `input_ids` (1, n) through `model` `chunk` tokens at a time, appending each chunk to
    `cache` before the next; the logits (1, 1, vocab, the model's dtype) of the last position.

    Each forward computes the lm_head for its last position only (`logits_to_keep=1`), so the
    activations alive at once are those of one chunk: what the Plan counts (budget.PREFILL_CHUNK).
    The CUDA session's prompt and decode steps and `runner rehearse` all go through here."""
    import torch

    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 token, not {chunk}")
    logits = None
    with torch.inference_mode():
        for start in range(0, input_ids.shape[1], chunk):
            output = model(input_ids=input_ids[:, start:start + chunk], use_cache=True, logits_to_keep=1,
                           **{cache_name: cache})
            logits = output.logits
            del output
    return logits


def pick_token(logits: "torch.Tensor", sampling: Sampling, generator: "torch.Generator | None") -> "torch.Tensor":
    """Greedy (temperature 0) or sampled with temperature and nucleus (top-p) from float32 logits:
    the id as a one-element tensor on the logits' device, chosen without waiting for the device
    (read it with int())."""
    import torch

    if sampling.temperature == 0:
        return greedy(logits)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (always at least the first).
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
        sorted_probs = sorted_probs * keep
        return order[draw(sorted_probs / sorted_probs.sum(), generator)]
    return draw(probs, generator)


def greedy(logits: "torch.Tensor") -> "torch.Tensor":
    """torch.argmax(logits) (the first index of the largest) as a 0-dim tensor on their device, in two
    reductions where the vocabulary splits into rows: torch's argmax of one long vector is one
    reduction over few blocks (27.5 us of an 8B's token on an H200, bench/RESULTS.md)."""
    import torch

    rows = _argmax_rows(logits.numel())
    if rows is None:
        return torch.argmax(logits)
    columns = logits.numel() // rows
    best, where = logits.reshape(rows, columns).max(dim=1)      # the first of each row's largest
    row = torch.argmax(best, dim=0, keepdim=True)
    return torch.add(where.gather(0, row), row, alpha=columns).squeeze(0)


def _argmax_rows(count: int) -> "int | None":
    """The divisor of `count` between 64 and 1024 nearest its square root, or None (fewer than 8,192
    logits, or no such divisor): the rows `greedy` reduces first."""
    if count < 8192:
        return None
    divisors = [rows for rows in range(64, 1025) if count % rows == 0]
    return min(divisors, key=lambda rows: abs(rows * rows - count)) if divisors else None


def draw(probs: "torch.Tensor", generator: "torch.Generator | None") -> "torch.Tensor":
    """One index drawn from `probs`: the draw of `torch.multinomial(probs, 1, generator=generator)`,
    which for one sample takes the argmax of probs / q with q ~ Exp(1) from `generator` (ATen's
    Distributions.cpp; the same ids for the same seed on torch 2.11 and 2.13, tests/test_cuda_decode_ahead.py),
    without multinomial's checks of `probs` on the host, which wait for the device to finish."""
    import torch

    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / q, dim=-1, keepdim=True)


class CudaSession(TokenStreaming):
    backend = "cuda"

    def __init__(
        self,
        model,
        tokenizer,
        spec: "ModelSpec",
        quant: str,
        context: int,
        plan: "Plan | None",
        scheme_description: str,
        attention: str,
        cuda_baseline: dict[str, int],
        gpu_names: list[str],
        kv_bits: int | None = None,
    ) -> None:
        import torch

        self.hf_model = model          # the transformers model
        self.tokenizer = tokenizer
        self.model = self.spec = spec  # the protocol's `model` is the ModelSpec
        self.quant = quant
        self.context = context
        self.plan = plan
        self.attention = attention
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._cuda_baseline = cuda_baseline
        self._lock = threading.Lock()  # one reply at a time
        embeddings = model.get_input_embeddings()
        hook = compat.accelerate_hook(embeddings)
        self.input_device = getattr(hook, "execution_device", None) or embeddings.weight.device
        if torch.device(self.input_device).type == "meta":
            self.input_device = torch.device("cpu")
        where = placement_summary(model)
        if gpu_names:
            gpus = sorted(set(gpu_names))
            where += f" on {', '.join(gpus)}"
        else:
            threads = torch.get_num_threads()
            where += f"; no CUDA GPU: running on the CPU ({counted(threads, 'thread')})"
        self.kv_bits = kv_bits   # None: the KV cache in the compute dtype; 8 or 4: runner_cuda.kv_cache's
        kv = ""
        if kv_bits is not None:
            check_kv_bits(spec, kv_bits)
            kv = f"; KV cache {kv_bits}-bit"
        self.device_summary = f"{where}; {scheme_description}; {attention} attention{kv}"
        self.warnings: tuple[str, ...] = ()   # set by the loader (offload the user allowed, ...)
        self._weights_measured = self._measure()
        self._cache_argument = cache_argument(model)
        self.prefill_chunk = PREFILL_CHUNK   # tokens per forward while reading the prompt (the Plan's)
        self._kept: tuple[object, list[int]] | None = None   # the last reply's cache and the ids in it
        self.step_ahead = False     # feed each token to the next step before reading it (the fast path's loop)

    # ---- prompt ---------------------------------------------------------------------------
    def tokenize(self, messages: Sequence[Message]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise UserInputError(
                f"{self.spec.name} has no chat template: it looks like a base model, not a chat (instruct) "
                "model; runner does not invent a template: use an -Instruct model"
            )
        return chat_token_ids(self.tokenizer, messages, self.spec.name)   # rendered with limits

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    # ---- the steps a fast path replaces ------------------------------------------------------
    def new_cache(self):
        from transformers import DynamicCache

        if self.kv_bits is not None:
            from runner_cuda.kv_cache import quantized_cache

            return quantized_cache(self.hf_model.config, self.kv_bits)
        return DynamicCache(config=self.hf_model.config)

    def trim_cache(self, cache, length: int) -> bool:
        """Cut `cache` back to its first `length` positions; False where it cannot be cut (sliding
        windows). transformers 5.24's `crop` takes minus the number of positions to remove."""
        if not cache.is_croppable or any(cache.is_sliding):
            return False
        cache.crop(length - cache.get_seq_length())
        return True

    def forward_step(self, input_ids: "torch.Tensor", cache) -> "torch.Tensor":
        """Run `input_ids` (1, n) through the model in chunks of `prefill_chunk` tokens, appending
        to `cache`; float32 logits (vocab,) of the last position."""
        logits = forward_in_chunks(self.hf_model, input_ids, cache, self.prefill_chunk, self._cache_argument)
        return logits[0, -1].float()

    def greedy(self, logits: "torch.Tensor") -> "torch.Tensor":
        """The greedy id of `logits`, on their device (a fast path's step has picked it already)."""
        return greedy(logits)

    def host_id(self, token: "torch.Tensor") -> "HostId":
        """An id on the device, to read on the host (a fast path's step has written it there)."""
        return HostId(token)

    def use_steps(self, steps) -> None:
        """Take a fast path's steps (`runner_cuda.fast.FastSteps`, each of FAST_STEPS) and decode a
        step ahead with them; a cache kept by the old ones is dropped."""
        for step in FAST_STEPS:
            setattr(self, step, getattr(steps, step))
        self.step_ahead = True
        self._kept = None

    def _cache_for(self, prompt: list[int]) -> tuple[object, int]:
        """The cache to answer `prompt` from and how many of its first tokens that cache already
        holds: the last reply's, cut back to the common prefix, or a new one."""
        kept, self._kept = self._kept, None
        if kept is not None:
            cache, held = kept
            reused = reusable_prefix(held, prompt)
            if reused > 0 and (reused == len(held) or self.trim_cache(cache, reused)):
                return cache, reused
            del cache, kept      # let go of its memory before a new cache is made
        return self.new_cache(), 0

    # ---- streaming (stream and stream_tokens: TokenStreaming) -----------------------------
    def _decode(self, prompt: list[int], sampling: Sampling, cancel, started: float) -> Iterator[GenerationChunk]:
        import torch

        if not self._lock.acquire(blocking=False):
            raise GenerationError("this session is already generating a reply")
        try:
            limit = min(sampling.max_tokens, self.context - len(prompt))
            pick = self._picker(sampling)
            self._reset_peak()
            decoder = ReplyText(self.tokenizer, prompt)   # the prompt's last ids: an SPM first word keeps its space
            cache, reused = self._cache_for(prompt)
            held = list(prompt[:reused])             # the ids whose K/V are in `cache`
            feed = self._tokens_ahead if self.step_ahead else self._tokens_in_turn
            tokens = feed(prompt[reused:], cache, held, pick, limit)
            clock = ReplyClock(len(prompt), reused, started)
            out_of_memory = False
            try:   # reply_chunks closes `tokens` before its last chunk: a step fed ahead is cut off the cache
                yield from reply_chunks(tokens, decoder, clock, limit, self.eos_ids, cancel, lambda: self._peak(cache))
            except torch.OutOfMemoryError:
                out_of_memory = True  # raised below, outside `except`, so the failed step's tensors can be freed
            if out_of_memory:
                del cache
                free_memory()
                raise GenerationError(
                    f"out of GPU memory after {counted(len(held), 'token')}; use a shorter --context or a smaller --quant"
                )
        finally:
            self._lock.release()

    def _picker(self, sampling: Sampling):
        """`pick_token` for one reply: logits -> the id on their device; greedy by `self.greedy`, else
        sampled from a generator seeded for the reply, on the lm_head's device."""
        import torch

        if sampling.temperature == 0:
            return self.greedy
        device = self.hf_model.lm_head.weight.device if hasattr(self.hf_model, "lm_head") else self.input_device
        device = torch.device("cpu") if device.type == "meta" else device
        generator = torch.Generator(device=device).manual_seed(reply_seed(sampling))
        return lambda logits: pick_token(logits, sampling, generator)

    def _tokens_in_turn(self, ids: list[int], cache, held: list[int], pick, count: int) -> Iterator[int]:
        """Up to `count` reply ids, `ids` run first: each read on the host before the next step."""
        for _ in range(count):
            token = int(self._run(ids, cache, held, pick))
            yield token
            ids = [token]

    def _tokens_ahead(self, ids: list[int], cache, held: list[int], pick, count: int) -> Iterator[int]:
        """Up to `count` reply ids, `ids` run first: each fed to the next step on the device before
        the host reads it, so the device is never idle waiting for the host. When the caller stops
        (closes this), a step fed the last id it took is cut off the cache again. A step ahead
        that runs out of memory is run again in turn, after its id is out, where the ordinary loop
        would have run it (and met the error)."""
        token = self._run(ids, cache, held, pick)
        ahead = None         # the step fed the id last yielded, before the caller asked for the next
        try:
            for index in range(count):
                copy = self.host_id(token)
                if index + 1 < count:
                    ahead = self._run_ahead(token, cache, held, pick)
                value = copy.read()
                if ahead is not None:
                    held.append(value)
                    self._kept = (cache, held)
                yield value
                token, ahead = ahead, None
                if token is None and index + 1 < count:
                    token = self._run([value], cache, held, pick)
        finally:
            if ahead is not None:
                held.pop()
                self.trim_cache(cache, len(held))

    def _run(self, ids: list[int], cache, held: list[int], pick) -> "torch.Tensor":
        """Run `ids` through the model into `cache` and record them in `held`; the next id, on the device."""
        import torch

        self._kept = None                    # a forward cut short leaves the cache half-written
        token = pick(self.forward_step(torch.tensor([ids], device=self.input_device), cache))
        held.extend(ids)
        self._kept = (cache, held)           # what a next request may start from
        return token

    def _run_ahead(self, token: "torch.Tensor", cache, held: list[int], pick) -> "torch.Tensor | None":
        """Run the id a step picked (still on the device) through the model into `cache`; the next
        id, on the device. None where it ran out of memory: the fast path's static cache then holds
        what it held (its length moves once a step has run)."""
        import torch

        self._kept = None                    # until `held` has the id
        try:
            return pick(self.forward_step(token.reshape(1, 1), cache))
        except torch.OutOfMemoryError:
            self._kept = (cache, held)
            return None

    # ---- memory ----------------------------------------------------------------------------
    def _reset_peak(self) -> None:
        import torch

        for device in self._cuda_baseline:
            torch.cuda.reset_peak_memory_stats(device)

    def _peak(self, cache) -> int:
        """CUDA: the allocator's peak since the reply started, above what was there before the
        load. CPU: the weights' bytes plus the KV cache's tensors (the CPU has no allocator stats)."""
        import torch

        if self._cuda_baseline:
            return sum(
                max(0, torch.cuda.max_memory_allocated(device) - base) for device, base in self._cuda_baseline.items()
            )
        kv = 0
        for layer in getattr(cache, "layers", []):
            # a quantized layer (runner_cuda.kv_cache) holds codes, scales and biases in `stored`
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None), *(getattr(layer, "stored", None) or ())):
                if tensor is not None:
                    kv += tensor.numel() * tensor.element_size()
        return sum(self._weights_measured.values()) + kv

    def _measure(self) -> dict[str, int]:
        """Bytes per device: the CUDA allocator (above what was allocated before the load) for
        GPUs; the model's tensors for the CPU (and for disk offload)."""
        measured = {}
        if self._cuda_baseline:
            for device, now in cuda_allocated().items():
                used = now - self._cuda_baseline.get(device, 0)
                if used > 0:
                    measured[device] = used
        for device, size in tensor_bytes_by_device(self.hf_model).items():
            if not device.startswith("cuda"):
                measured[device] = size
        return measured

    def memory(self) -> MemoryReport:
        import torch

        planned = {}
        if self.plan is not None:
            planned = {share.device: share.weights_bytes for share in self.plan.placement if share.weights_bytes}
        peak = {}
        for device, base in self._cuda_baseline.items():
            peak[device] = max(0, torch.cuda.max_memory_allocated(device) - base)
        return MemoryReport(measured=self._measure(), planned=planned, peak=peak)

    # ---- parity ----------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> "np.ndarray":
        """Every position's float32 logits, teacher-forced through a new KV cache of the plain
        path (quantized with `kv_bits`) `prefill_chunk` tokens at a time, as a reply's prefill
        fills it: each position attends to the K/V its cache stores for the earlier ones, so a
        quantized cache changes these logits as it changes replies. The fast path's static cache
        serves decoding only; the kept cache of the last reply is not touched."""
        import torch

        if len(token_ids) == 0:
            raise UserInputError("logits() needs at least one token id")
        if len(token_ids) > self.spec.max_context:
            raise UserInputError(f"{len(token_ids)} tokens is more than {self.spec.name}'s context ({self.spec.max_context})")
        ids = torch.tensor([list(token_ids)], device=self.input_device)
        cache = CudaSession.new_cache(self)     # the plain path's, even where a fast path replaced it
        chunks = []
        with torch.inference_mode():
            for start in range(0, ids.shape[1], self.prefill_chunk):
                output = self.hf_model(input_ids=ids[:, start:start + self.prefill_chunk], use_cache=True,
                                       **{self._cache_argument: cache})
                chunks.append(output.logits[0].float().cpu())
                del output
        return torch.cat(chunks).numpy()

    def close(self) -> None:
        if self.hf_model is None:
            return
        self.hf_model = None
        self.tokenizer = None
        # A fast path (runner_cuda.fast.attach) replaces these steps with bound methods of an object
        # that holds the static KV cache, the CUDA graphs and views of the weights: drop them, or the
        # GPU memory stays allocated after close.
        self._kept = None
        for step in FAST_STEPS:
            self.__dict__.pop(step, None)
        free_memory()


class HostId:
    """An id on the device, copied to the host behind the work queued before it (pinned memory, an
    event), or `written` there by that work itself: `read()` waits for that work, not for the work
    queued after it."""

    def __init__(self, token: "torch.Tensor", written: "torch.Tensor | None" = None) -> None:
        import torch

        # a copy on a CPU too: the step after may reuse `token`
        self.value = token.to("cpu", non_blocking=True, copy=True) if written is None else written
        self.copied = None
        if token.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(token.device))

    def read(self) -> int:
        if self.copied is not None:
            self.copied.synchronize()
        return int(self.value)


__all__ = ["CudaSession", "HostId", "forward_in_chunks", "cache_argument", "pick_token", "eos_token_ids", "decoder_layers"]

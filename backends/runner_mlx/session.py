"""MlxSession: a loaded mlx-lm model behind runner's Session protocol.

`stream()` is a thin loop over `mlx_lm.stream_generate`: it builds the sampler with mlx-lm's
`make_sampler`, seeds `mx.random`, and turns each `GenerationResponse` into a runner
`GenerationChunk`. The text is `runner.detokenize.ReplyText`'s, not mlx-lm's (which drops the first
token's leading space). The end-of-sequence ids are mlx-lm's: the tokenizer's own plus every id in
generation_config.json (Llama 3 stops on two).

The session keeps the KV cache of its last reply (mlx-lm's cache objects, passed to
`stream_generate` as its `prompt_cache`) with the token ids in it: the next prompt's common prefix
with them is not prefilled again (`runner.prefix_cache`); the cache is trimmed back to it, or
dropped where it cannot be trimmed. Over `runner launch` every rank runs the same requests and
samples the same tokens, so each rank's cache of its own layers stays in step. With `kv_bits` the
cache is mlx-lm's QuantizedKVCache from the first token (group `budget.KV_GROUP_SIZE`).
"""

from __future__ import annotations

import contextlib
import gc
import io
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from runner.backend import GenerationChunk, LoadProgress, LoadRequest, MemoryReport, Message, Sampling, TokenStreaming
from runner.budget import KV_GROUP_SIZE, PREFILL_CHUNK
from runner.detokenize import ReplyText
from runner.errors import GenerationError, UserInputError
from runner.model import ModelSpec
from runner.prefix_cache import reusable_prefix
from runner.templates import chat_token_ids

from runner_mlx import QUANT_BITS, QUANT_DTYPES
from runner_mlx.convert import (CorruptWeights, check_weights, config_fixes, mlx_folder, notify, read_json,
                                read_layers)
from runner_mlx.memory import measured, metal_limits, wired_limit_warning
from runner.words import counted


class MlxSession(TokenStreaming):
    backend = "mlx"

    def __init__(self, model, tokenizer, spec: ModelSpec, quant: str, folder: Path,
                 device_summary: str, context: int, planned_bytes: int = 0, warnings: tuple[str, ...] = (),
                 device: str = "mlx", kv_bits: int | None = None):
        self._model = model
        self.context = context                 # prompt + reply, as planned
        self._tokenizer = tokenizer
        self.model = spec
        self.quant = quant
        self.folder = folder               # the MLX folder actually loaded
        self.device_summary = device_summary
        self.planned_bytes = planned_bytes     # the plan's weights, next to the measured bytes
        self.warnings = warnings
        self.device = device                   # the plan's name for where it runs ("cpu", "metal", ...)
        self.kv_bits = kv_bits                 # None: the KV cache in the model's dtype; 8 or 4: quantized
        self._kept: tuple[list, list[int]] | None = None   # the last reply's cache and the ids in it

    # ---- the protocol ----------------------------------------------------------------------
    def tokenize(self, messages: Sequence[Message]) -> list[int]:
        if not self._tokenizer.has_chat_template:
            raise UserInputError(
                f"{self.model.name} has no chat template: it is a base model, not a chat model; "
                "use an -Instruct/-Chat variant"
            )
        return chat_token_ids(self._tokenizer, messages, self.model.name)   # rendered with limits

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))

    def _decode(self, prompt: list[int], sampling: Sampling, cancel: threading.Event | None,
                started: float) -> Iterator[GenerationChunk]:
        """mlx-lm's stream_generate over the kept cache (stream and stream_tokens: TokenStreaming)."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream, stream_generate
        from mlx_lm.sample_utils import make_sampler

        if sampling.seed is not None:
            mx.random.seed(sampling.seed)
        sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p if sampling.top_p < 1 else 0.0)
        first_token = 0.0
        cache, reused = self._cache_for(prompt)
        fed = list(prompt)           # what goes through the model: the prompt, then each reply token
        text = ReplyText(self._tokenizer, prompt)
        limit = min(sampling.max_tokens, self.context - len(prompt))
        responses = stream_generate(self._model, self._tokenizer, prompt[reused:],
                                    max_tokens=limit, sampler=sampler, prompt_cache=cache)
        broken = False
        try:
            for response in responses:
                if not first_token:
                    first_token = time.perf_counter() - started
                fed.append(response.token)
                # the end-of-sequence id has no text, but is the stop chunk's token and counted (GenerationChunk)
                piece = "" if response.finish_reason == "stop" else text.add(response.token)
                if response.finish_reason is not None:
                    piece += text.flush()
                yield GenerationChunk(
                    text=piece,
                    token=response.token,
                    prompt_tokens=len(prompt),
                    prompt_tps=response.prompt_tps,
                    generation_tokens=response.generation_tokens,
                    generation_tps=response.generation_tps,
                    time_to_first_token=first_token,
                    peak_memory=int(response.peak_memory * 1e9),
                    finish_reason=response.finish_reason,
                    reused_tokens=reused,
                )
                if cancel is not None and cancel.is_set() and response.finish_reason is None:
                    yield GenerationChunk(text.flush(), None, len(prompt), response.prompt_tps,
                                          response.generation_tokens, response.generation_tps,
                                          first_token, int(response.peak_memory * 1e9), "cancelled",
                                          reused_tokens=reused)
                    return
        except (RuntimeError, ValueError) as error:
            broken = True
            raise GenerationError(f"mlx failed while generating: {error}") from None
        except BaseException as error:      # a reply abandoned at a token keeps its cache; else none
            broken = not isinstance(error, GeneratorExit)
            raise
        finally:
            responses.close()  # runs mlx-lm's clean-up (wired limit restored) on cancel too
            # mlx-lm computes the step after the last token ahead of time: wait for it, so nothing is
            # left running (on several hosts it talks to the other ranks, which must stay in step)
            mx.synchronize(generation_stream)
            if not broken:
                self._keep(cache, fed)

    # ---- the KV cache kept between replies -------------------------------------------------
    def _new_cache(self) -> list:
        from mlx_lm.generate import maybe_quantize_kv_cache
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self._model)
        if self.kv_bits is not None:    # quantized from the first token, as the plan counts it
            maybe_quantize_kv_cache(cache, quantized_kv_start=0, kv_group_size=KV_GROUP_SIZE, kv_bits=self.kv_bits)
        return cache

    def _cache_for(self, prompt: list[int]) -> tuple[list, int]:
        """The cache to answer `prompt` from and how many of its first tokens it already holds:
        the last reply's, trimmed back to the common prefix, or a new one."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        kept, self._kept = self._kept, None
        if kept is not None:
            cache, held = kept
            reused = reusable_prefix(held, prompt)
            if reused > 0 and (reused == len(held) or can_trim_prompt_cache(cache)):
                trim_prompt_cache(cache, len(held) - reused)
                return cache, reused
            del cache, kept      # let go of its memory before a new cache is made
        return self._new_cache(), 0

    def _keep(self, cache: list, fed: list[int]) -> None:
        """Keep `cache` for the next request with the ids it holds: the first `offset` of `fed`
        (mlx-lm runs each sampled token through the model before yielding it). A cache whose
        layers disagree on their length was cut off mid-step: it is dropped."""
        offsets = {getattr(layer, "offset", None) for layer in cache}
        if len(offsets) == 1 and isinstance(offset := offsets.pop(), int) and 0 < offset <= len(fed):
            self._kept = (cache, fed[:offset])

    def logits(self, token_ids: Sequence[int]):
        """Every position's float32 logits, teacher-forced through a new cache of this session's
        kind (mlx-lm's QuantizedKVCache with `kv_bits`) `PREFILL_CHUNK` tokens at a time, as
        mlx-lm's prefill fills it: each position attends to the K/V the cache stores, so a
        quantized cache changes these logits as it changes replies. The kept cache is not touched."""
        import mlx.core as mx
        import numpy as np

        if not token_ids:
            raise UserInputError("logits() needs at least one token id")
        ids = mx.array([list(token_ids)])
        cache = self._new_cache()
        chunks = []
        for start in range(0, ids.shape[1], PREFILL_CHUNK):
            output = self._model(ids[:, start:start + PREFILL_CHUNK], cache=cache)
            chunks.append(np.array(output[0].astype(mx.float32)))
        return np.concatenate(chunks)

    def memory(self) -> MemoryReport:
        active, peak = measured()
        planned = {self.device: self.planned_bytes} if self.planned_bytes else {}
        return MemoryReport(measured={self.device: active}, planned=planned, peak={self.device: peak})

    def close(self) -> None:
        import mlx.core as mx

        self._model = None
        self._tokenizer = None
        self._kept = None
        gc.collect()
        mx.clear_cache()


# ---- loading -------------------------------------------------------------------------------


def describe_quant(quant: str) -> str:
    if quant in QUANT_BITS:
        return f"{QUANT_BITS[quant]}-bit, group 64"
    return QUANT_DTYPES[quant]


def where_it_runs() -> str:
    import mlx.core as mx

    return "Metal GPU" if mx.metal.is_available() else "CPU (mlx[cpu])"


def needed_bytes(request: LoadRequest, folder: Path) -> int:
    """What must fit in memory: the plan's total (weights, KV cache, activations), or without a
    plan the size of the weight files."""
    if request.plan is not None:
        return int(request.plan.total_bytes)
    return sum(f.stat().st_size for f in check_weights(folder))


def check_wired_limit(model_bytes: int) -> str | None:
    """A warning, for the front end to show, when the model will not fit the GPU's wired memory."""
    limits = metal_limits()
    if limits is None:
        return None
    return wired_limit_warning(model_bytes, *limits)


def load_model_folder(folder: Path, on_progress=None, *, layers: tuple[int, int] | None = None):
    """mlx-lm's `load`, evaluated layer by layer so a slow load shows progress.

    `layers` (start, stop): only those decoder layers (a pipeline stage; the others are None and
    never read), from whatever weight files `folder` holds: a share's conversion holds only its own."""
    import mlx.core as mx
    from mlx_lm.utils import load, load_tokenizer

    fixes = config_fixes(read_json(folder / "config.json"))
    try:
        if layers is not None:
            model, config = read_layers(folder, layers, fixes)
            tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                model, tokenizer = load(str(folder), lazy=True, model_config=fixes)
        kept = [layer for layer in model.layers if layer is not None]
        for index, layer in enumerate(kept):
            mx.eval(layer.parameters())
            notify(on_progress, LoadProgress("loading layers", index + 1, len(kept), "layers"))
        mx.eval(model.parameters())
    except (ValueError, RuntimeError, OSError) as error:
        raise CorruptWeights(f"{folder}: cannot load the weights ({error})") from None
    return model, tokenizer


def load_session(request: LoadRequest) -> MlxSession:
    spec = request.model
    if spec.path is None:
        raise UserInputError(f"{spec.name}: no local folder with weights (the mlx backend loads a folder)")
    if request.trust_remote_code:
        raise UserInputError("the mlx backend does not run a repository's own code (--trust-remote-code)")
    folder = mlx_folder(Path(spec.path), request.quant, request.on_progress)
    warnings = tuple(w for w in [check_wired_limit(needed_bytes(request, folder))] if w)
    model, tokenizer = load_model_folder(folder, request.on_progress)
    summary = f"mlx on {where_it_runs()}, {describe_quant(request.quant)}, all {counted(spec.num_layers, 'layer')}"
    planned_weights = sum(s.weights_bytes for s in request.plan.placement) if request.plan is not None else 0
    return MlxSession(model, tokenizer, spec, request.quant, folder, summary, request.context,
                      planned_bytes=planned_weights, warnings=warnings, device=plan_device(request),
                      kv_bits=request.kv_bits)


def plan_device(request: LoadRequest) -> str:
    """The plan's name for the one device this process runs on, so that memory reports line up."""
    shares = request.plan.placement if request.plan is not None else ()
    return shares[0].device if len(shares) == 1 else "mlx"

"""MlxSession: a loaded mlx-lm model behind runner's Session protocol.

`stream()` is a thin loop over `mlx_lm.stream_generate`: it builds the sampler with mlx-lm's
`make_sampler`, seeds `mx.random`, and turns each `GenerationResponse` into a runner
`GenerationChunk`. The end-of-sequence ids are mlx-lm's: the tokenizer's own plus every id in
generation_config.json (Llama 3 stops on two).
"""

from __future__ import annotations

import contextlib
import gc
import io
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from runner.backend import GenerationChunk, LoadProgress, LoadRequest, MemoryReport, Message, Sampling
from runner.errors import GenerationError, UserInputError
from runner.model import ModelSpec

from runner_mlx import QUANT_BITS, QUANT_DTYPES
from runner_mlx.convert import CorruptWeights, check_weights, config_fixes, mlx_folder, notify, read_json
from runner_mlx.memory import measured, metal_limits, wired_limit_warning


class MlxSession:
    backend = "mlx"

    def __init__(self, model, tokenizer, spec: ModelSpec, quant: str, folder: Path,
                 device_summary: str, planned_bytes: int = 0, warnings: tuple[str, ...] = (),
                 device: str = "mlx"):
        self._model = model
        self._tokenizer = tokenizer
        self.model = spec
        self.quant = quant
        self.folder = folder               # the MLX folder actually loaded
        self.device_summary = device_summary
        self.planned_bytes = planned_bytes     # the plan's weights, next to the measured bytes
        self.warnings = warnings
        self.device = device                   # the plan's name for where it runs ("cpu", "metal", ...)

    # ---- the protocol ----------------------------------------------------------------------
    def tokenize(self, messages: Sequence[Message]) -> list[int]:
        if not self._tokenizer.has_chat_template:
            raise UserInputError(
                f"{self.model.name} has no chat template: it is a base model, not a chat model; "
                "use an -Instruct/-Chat variant"
            )
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        return list(self._tokenizer.apply_chat_template(conversation, add_generation_prompt=True))

    def stream(
        self, messages: Sequence[Message], sampling: Sampling, cancel: threading.Event | None = None
    ) -> Iterator[GenerationChunk]:
        return self.stream_tokens(self.tokenize(messages), sampling, cancel)

    def stream_tokens(
        self, prompt: Sequence[int], sampling: Sampling, cancel: threading.Event | None = None
    ) -> Iterator[GenerationChunk]:
        """Stream a reply to ready-made prompt token ids (what `stream` does after the template)."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream, stream_generate
        from mlx_lm.sample_utils import make_sampler

        if sampling.seed is not None:
            mx.random.seed(sampling.seed)
        sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p if sampling.top_p < 1 else 0.0)
        start = time.perf_counter()
        first_token = 0.0
        responses = stream_generate(self._model, self._tokenizer, list(prompt),
                                    max_tokens=sampling.max_tokens, sampler=sampler)
        try:
            for response in responses:
                if not first_token:
                    first_token = time.perf_counter() - start
                stopped = response.finish_reason == "stop"
                yield GenerationChunk(
                    text=response.text,
                    token=None if stopped else response.token,   # the end-of-sequence id is not reply
                    prompt_tokens=response.prompt_tokens,
                    prompt_tps=response.prompt_tps,
                    generation_tokens=response.generation_tokens - (1 if stopped else 0),
                    generation_tps=response.generation_tps,
                    time_to_first_token=first_token,
                    peak_memory=int(response.peak_memory * 1e9),
                    finish_reason=response.finish_reason,
                )
                if cancel is not None and cancel.is_set() and response.finish_reason is None:
                    yield GenerationChunk("", None, response.prompt_tokens, response.prompt_tps,
                                          response.generation_tokens, response.generation_tps,
                                          first_token, int(response.peak_memory * 1e9), "cancelled")
                    return
        except (RuntimeError, ValueError) as error:
            raise GenerationError(f"mlx failed while generating: {error}") from None
        finally:
            responses.close()  # runs mlx-lm's clean-up (wired limit restored) on cancel too
            # mlx-lm computes the step after the last token ahead of time: wait for it, so nothing is
            # left running (on several hosts it talks to the other ranks, which must stay in step)
            mx.synchronize(generation_stream)

    def logits(self, token_ids: Sequence[int]):
        import mlx.core as mx
        import numpy as np

        if not token_ids:
            raise UserInputError("logits() needs at least one token id")
        output = self._model(mx.array([list(token_ids)]))
        return np.array(output[0].astype(mx.float32))

    def memory(self) -> MemoryReport:
        active, peak = measured()
        planned = {self.device: self.planned_bytes} if self.planned_bytes else {}
        return MemoryReport(measured={self.device: active}, planned=planned, peak={self.device: peak})

    def close(self) -> None:
        import mlx.core as mx

        self._model = None
        self._tokenizer = None
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


def load_model_folder(folder: Path, on_progress=None, *, lazy_layers=None):
    """mlx-lm's `load`, evaluated layer by layer so a slow load shows progress.

    `lazy_layers(model)` may drop layers before anything is read (the pipeline split does)."""
    import mlx.core as mx
    from mlx_lm.utils import load

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model, tokenizer = load(str(folder), lazy=True,
                                    model_config=config_fixes(read_json(folder / "config.json")))
        if lazy_layers is not None:
            lazy_layers(model)
        layers = [layer for layer in model.layers if layer is not None]
        for index, layer in enumerate(layers):
            mx.eval(layer.parameters())
            notify(on_progress, LoadProgress("loading layers", index + 1, len(layers), "layers"))
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
    summary = f"mlx on {where_it_runs()}, {describe_quant(request.quant)}, all {spec.num_layers} layers"
    planned_weights = sum(s.weights_bytes for s in request.plan.placement) if request.plan is not None else 0
    return MlxSession(model, tokenizer, spec, request.quant, folder, summary,
                      planned_bytes=planned_weights, warnings=warnings, device=plan_device(request))


def plan_device(request: LoadRequest) -> str:
    """The plan's name for the one device this process runs on, so that memory reports line up."""
    shares = request.plan.placement if request.plan is not None else ()
    return shares[0].device if len(shares) == 1 else "mlx"

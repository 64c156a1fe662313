"""The one path from what the user typed to a running session, for every front end.

    choice = resolve(spec, machine, backend=None, quant=None, context=None)   # plan + reason, in words
    session = open_session(choice, LoadOptions(...), on_progress)            # refusal, import, load

Front ends (generate, chat, launch, parity, rehearse, serve, pull) never pick a quantization or
name a backend: they pass on what the user asked for (None where nothing was asked) and show
`choice.reason`. Pure arithmetic up to `open_session`; the backend imports its stack when it loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from runner.backend import (
    LoadProgress, LoadRequest, MemoryReport, Session, backend_class, backend_names, backend_quants, get_backend,
    installed_backends,
)
from runner.budget import (
    DEFAULT_CONTEXT, DOES_NOT_FIT, FITS, OFFLOAD, Plan, backends_taking, candidate_schemes, make_plan, preferred_backend,
    recommend,
)
from runner.plan_rules import rules_for
from runner.errors import DoesNotFit, ModelNotFound, UserInputError
from runner.model import DEFAULT_MODEL_ID, ModelSpec, load_spec
from runner.words import counted, one_line

if TYPE_CHECKING:
    from runner.hardware import Machine


@dataclass(frozen=True)
class Choice:
    """What will be loaded, how, and why."""

    spec: ModelSpec
    machine: "Machine"
    backend: str
    quant: str
    context: int
    plan: Plan
    reason: str      # in words: "the plan's recommendation: …", "you asked for mlx: its best scheme that fits"
    kv_bits: int | None = None   # the KV cache quantized to 8 or 4 bits; None: the compute dtype


@dataclass(frozen=True)
class LoadOptions:
    """How to load, beyond the choice: what the user allowed and switched."""

    allow_offload: bool = False
    trust_remote_code: bool = False
    fast_decode: bool = True
    kernel: str | None = None
    chat: bool = True            # refuse a model without a chat template (parity reads logits only)


def default_context(spec: ModelSpec) -> int:
    return min(DEFAULT_CONTEXT, spec.max_context)


def resolve(
    spec: ModelSpec,
    machine: "Machine",
    backend: str | None = None,
    quant: str | None = None,
    context: int | None = None,
    *,
    batch: int = 1,
    kv_bits: int | None = None,
    schemes: Callable[[str], Sequence[str]] | None = None,
) -> Choice:
    """The backend, quant and context to use, with the plan and the reason. What the user did not
    ask for comes from the plan. `schemes(backend)` narrows the quants a front end can run
    (rehearse runs fewer than a real load)."""
    if backend is not None and backend not in backend_names():
        raise UserInputError(f"unknown backend '{backend}' (known: {', '.join(backend_names())})")
    context = default_context(spec) if context is None else context
    allowed = schemes or backend_quants
    if quant is not None:
        backend, reason = _backend_for_quant(quant, backend, machine, allowed)
    elif backend is None and schemes is None:
        recommendation = recommend(spec, machine, context, kv_bits)
        backend, quant = recommendation.backend, recommendation.quant
        reason = f"the plan's recommendation: {recommendation.reason}"
    else:
        backend = backend or preferred_backend(machine)
        quant, reason = _best_scheme(spec, machine, backend, context, batch, kv_bits, allowed(backend))
    plan = make_plan(spec, machine, quant, context, batch, backend, kv_bits=kv_bits)
    return Choice(spec, machine, backend, quant, context, plan, reason, kv_bits)


def _backend_for_quant(quant: str, backend: str | None, machine: "Machine",
                       allowed: Callable[[str], Sequence[str]]) -> tuple[str, str]:
    takers = backends_taking(quant, machine, allowed)
    if backend is not None:
        if backend not in takers:
            raise UserInputError(f"--quant {quant} is not a {backend} scheme; --backend {backend} takes "
                                 f"{', '.join(allowed(backend))}")
        return backend, f"you asked for {backend} {quant}"
    if not takers:
        known = sorted({q for name in installed_backends() for q in allowed(name)})
        raise UserInputError(f"unknown quantization '{quant}' (known: {', '.join(known)})")
    return takers[0], f"you asked for {quant}: {takers[0]} is the backend that takes it here"


def _best_scheme(spec: ModelSpec, machine: "Machine", backend: str, context: int, batch: int,
                 kv_bits: int | None, allowed: Sequence[str]) -> tuple[str, str]:
    """The first of the plan's candidates for this backend, then the backend's own quality order,
    that fits; else its smallest."""
    order = [q for b, q, _ in candidate_schemes(spec, machine) if b == backend]
    order += list(backend_class(backend).quality_order)
    order = [q for q in dict.fromkeys(order) if q in allowed] or list(allowed)
    if not order:   # e.g. `runner rehearse --backend llamacpp`: it rehearses nothing
        raise UserInputError(f"this command takes none of the {backend} backend's schemes ({', '.join(backend_quants(backend))})")
    for quant in order:
        if make_plan(spec, machine, quant, context, batch, backend, kv_bits=kv_bits).verdict == FITS:
            return quant, f"you asked for {backend}: {quant} is its best scheme that fits"
    return order[-1], f"you asked for {backend}: nothing fits; {order[-1]} is its smallest scheme"


# ---- opening a session -------------------------------------------------------------------------


def open_session(choice: Choice, options: LoadOptions = LoadOptions(),
                 on_progress: Callable[[LoadProgress], None] | None = None) -> Session:
    """Refuse what the plan refuses, make sure the weights are here (the default model is imported
    on first use), check the chat template, then let the backend load as planned."""
    refuse_by_plan(choice.plan, options.allow_offload)
    check_kernel(choice.backend, options.kernel)
    backend = get_backend(choice.backend)
    spec = spec_with_weights(choice.spec, choice.backend, on_progress)
    if options.chat and spec.path is not None and has_chat_template(spec.path) is False:
        raise UserInputError(
            f"{spec.name} has no chat template: it looks like a base model, not a chat (instruct) model; "
            "runner does not invent a template: use an -Instruct model"
        )
    return backend.load(LoadRequest(
        spec, quant=choice.quant, context=choice.context, plan=choice.plan,
        allow_offload=options.allow_offload, trust_remote_code=options.trust_remote_code,
        on_progress=on_progress, kv_bits=choice.kv_bits, fast_decode=options.fast_decode, kernel=options.kernel,
    ))


def check_kernel(backend: str, kernel: str | None) -> None:
    """A kernel name the backend declares (`--kernel`), or None for its default."""
    kernels = tuple(getattr(backend_class(backend), "kernels", ()))
    if kernel is not None and kernel not in kernels:
        offered = f"it takes {', '.join(kernels)}" if kernels else "it has no kernels to choose from"
        raise UserInputError(f"--kernel {one_line(kernel, 40)}: not a kernel of the {backend} backend; {offered}")


def refuse_by_plan(plan: Plan, allow_offload: bool) -> None:
    """Before touching any weight: a plan that does not fit, or needs offload the user did not allow."""
    if plan.verdict not in (DOES_NOT_FIT, OFFLOAD):
        return
    options = options_that_fit(plan)
    fits = f"; options that fit: {', '.join(options)}" if options else "; more memory (or more GPUs) is needed"
    if plan.verdict == DOES_NOT_FIT:
        raise DoesNotFit(f"{plan.model.name} does not fit: {plan_line(plan)}{fits}")
    if not allow_offload:
        raise DoesNotFit(
            f"{plan.model.name} fits only with CPU/disk offload, which makes each token very slow "
            f"({plan.roofline_tokens_per_s:.2g} tokens/s at best): {plan_line(plan)}{fits}; or pass --allow-offload"
        )


def options_that_fit(plan: Plan) -> list[str]:
    """Smaller schemes of the same backend (smallest first), then shorter contexts, that the plan's
    arithmetic says fit."""
    options = []
    for quant in reversed(backend_class(plan.backend).quality_order):
        if quant != plan.quant and make_plan(plan.model, plan.machine, quant, plan.context, backend=plan.backend,
                                             kv_bits=plan.kv_bits).verdict == FITS:
            options.append(f"--quant {quant}")
    for context in (plan.context // 2, plan.context // 4, 2048):
        if 512 <= context < plan.context and make_plan(plan.model, plan.machine, plan.quant, context,
                                                       backend=plan.backend, kv_bits=plan.kv_bits).verdict == FITS:
            options.append(f"--context {context}")
            break
    return options


def spec_with_weights(spec: ModelSpec, backend: str,
                      on_progress: Callable[[LoadProgress], None] | None = None) -> ModelSpec:
    """The spec `backend` loads: the default model imported on first use (for a backend that runs
    GGUF files: its package's GGUF file as it is); refuses a catalog-only entry."""
    if rules_for(backend).loads_gguf and spec.source != "gguf" and spec.name.lower() == DEFAULT_MODEL_ID.lower():
        from runner.gguf import default_gguf_spec

        return default_gguf_spec()
    if spec.path is not None:
        return spec
    if spec.name.lower() == DEFAULT_MODEL_ID.lower():
        from runner.default_model import import_default_model

        import_default_model(on_progress)
        return load_spec(DEFAULT_MODEL_ID)
    raise ModelNotFound(
        f"{spec.name}: runner knows its shape (so its plan is real) but its weights are not on this "
        f"machine; download them first: runner pull {spec.name}"
    )


def has_chat_template(folder: Path) -> bool | None:
    """Does a Hugging Face-format folder carry a chat template? None when it cannot tell."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError, RecursionError):   # the backend's load says what is wrong with the file
        return None
    return bool(data.get("chat_template")) if isinstance(data, dict) else None


# ---- in words ----------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def plan_line(plan: Plan) -> str:
    where = ", ".join(f"{share.device} {_gb(share.total_bytes)}" for share in plan.placement if share.total_bytes)
    return (
        f"plan for {plan.quant} at {counted(plan.context, 'token')}: weights {_gb(plan.weights_bytes)} + KV cache "
        f"{_gb(plan.kv_cache_bytes)} + overhead {_gb(plan.overhead_bytes)} = {_gb(plan.total_bytes)} "
        f"({where + '; ' if where else ''}{plan.verdict})"
    )


def choice_line(choice: Choice) -> str:
    """One line for the top of a load: model, backend, scheme, context, the plan's total and verdict."""
    plan = choice.plan
    shares = ", ".join(f"{s.device} {_gb(s.total_bytes)}" for s in plan.placement if s.total_bytes)
    where = f" ({shares})" if shares else ""
    return (f"{choice.spec.name} · {choice.backend} · {choice.quant} · {counted(choice.context, 'token')} of context · "
            f"plan: {_gb(plan.total_bytes)}{where}, {plan.verdict}")


def memory_line(memory: MemoryReport, plan: Plan) -> str:
    """Per device, what the backend measured next to the plan's total for that device and its
    weights. A GPU's measure is everything its allocator holds for the model (weights, KV cache,
    CUDA graphs, workspaces), so it is set against the plan's total, not the weights alone."""
    shares = {share.device: share for share in plan.placement}
    parts = []
    for device, size in memory.measured.items():
        share = shares.get(device)
        if share is None:
            parts.append(f"{device} {_gb(size)} measured (not in the plan)")
        else:
            parts.append(f"{device} {_gb(size)} measured / {_gb(share.total_bytes)} planned "
                         f"(weights {_gb(share.weights_bytes)})")
    return ", ".join(parts)

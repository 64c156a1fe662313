"""From what the user asked for to a loaded Session: spec, plan, (default model import), load.

Plain functions with no Textual in them; the chat screen runs them in a thread worker and turns
their progress callbacks into messages. The backend, not this module, imports torch or mlx.

Where the session comes from is a `ModelSource`: this machine (`LocalSource`, what `runner chat`
uses), or the ranks that `runner launch` starts on several hosts (`runner_mlx.remote.LaunchSource`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from runner.backend import LoadProgress, LoadRequest, Session, get_backend
from runner.budget import DOES_NOT_FIT, Plan, make_plan, recommend
from runner.errors import DoesNotFit, ModelNotFound
from runner.hardware import Machine
from runner.model import DEFAULT_MODEL_ID, ModelSpec, load_spec

DEFAULT_CONTEXT = 4096   # enough for a chat; the model's maximum is often far more than fits


@dataclass(frozen=True)
class ModelChoice:
    """What the user asked for; None means 'let runner decide'."""

    model: str | None = None          # id or folder; None: the default model
    backend: str | None = None        # "cuda" or "mlx"; None: the plan's choice
    quant: str | None = None          # None: the plan's choice
    context: int | None = None        # None: min(DEFAULT_CONTEXT, the model's maximum)
    allow_offload: bool = False

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL_ID


def this_machine() -> Machine:
    from runner.hardware import detect_machine

    return detect_machine()


def plan_for(choice: ModelChoice, spec: ModelSpec, machine: Machine) -> Plan:
    """The plan for this choice on `machine`; what is not chosen comes from `recommend`."""
    context = choice.context or min(DEFAULT_CONTEXT, spec.max_context)
    if choice.quant is not None:
        return make_plan(spec, machine, choice.quant, context, backend=choice.backend)
    recommended = recommend(spec, machine, context)
    if choice.backend is None or choice.backend == recommended.backend:
        return recommended.plan
    # another backend than the recommended one: its full-quality scheme
    return make_plan(spec, machine, "bf16", context, backend=choice.backend)


def resolve(choice: ModelChoice, machine: Machine) -> tuple[ModelSpec, Plan]:
    spec = load_spec(choice.model)
    return spec, plan_for(choice, spec, machine)


def weights_spec(choice: ModelChoice, spec: ModelSpec, on_progress: Callable[[LoadProgress], None]) -> ModelSpec:
    """The spec to load: imports the default model on first use; refuses a catalog-only entry."""
    if spec.path is not None:
        return spec
    if choice.model is None or choice.model.lower() == DEFAULT_MODEL_ID.lower():
        from runner.default_model import import_default_model

        import_default_model(on_progress)
        return load_spec(choice.model)
    raise ModelNotFound(
        f"{spec.name}: runner knows its shape (so its plan is real) but its weights are not on this "
        f"machine; download them first, e.g. `hf download {spec.name}`, then pick it again"
    )


def load_session(
    choice: ModelChoice, spec: ModelSpec, plan: Plan, on_progress: Callable[[LoadProgress], None]
) -> Session:
    if plan.verdict == DOES_NOT_FIT:
        raise DoesNotFit(f"{spec.name} does not fit this machine as planned ({plan.quant}, context {plan.context:,})")
    backend = get_backend(plan.backend)
    request = LoadRequest(
        spec,
        quant=plan.quant,
        context=plan.context,
        plan=plan,
        allow_offload=choice.allow_offload,
        on_progress=on_progress,
    )
    return backend.load(request)


class ModelSource(Protocol):
    """Where the chat app's sessions come from."""

    def plan(self, choice: ModelChoice, machine: Machine) -> tuple[ModelSpec, Plan]:
        """The spec and the plan to show before loading (pure arithmetic, quick)."""

    def load(self, choice: ModelChoice, spec: ModelSpec, plan: Plan,
             on_progress: Callable[[LoadProgress], None]) -> Session:
        """A loaded session, as planned (the spec has its weights: see `weights_spec`)."""


class LocalSource:
    """Models loaded by a backend in this process, on this machine."""

    def plan(self, choice: ModelChoice, machine: Machine) -> tuple[ModelSpec, Plan]:
        return resolve(choice, machine)

    def load(self, choice: ModelChoice, spec: ModelSpec, plan: Plan,
             on_progress: Callable[[LoadProgress], None]) -> Session:
        return load_session(choice, spec, plan, on_progress)

"""From what the user asked for to a loaded Session, through the core's `resolve` and
`open_session` (runner.choice): the chat decides nothing itself.

Plain functions with no Textual in them; the chat screen runs them in a thread worker and turns
their progress callbacks into messages. The backend, not this module, imports torch or mlx.

Where the session comes from is a `ModelSource`: this machine (`LocalSource`, what `runner chat`
uses), or the ranks that `runner launch` starts on several hosts (`runner_mlx.remote.LaunchSource`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from runner.backend import LoadProgress, Session
from runner.budget import Plan
from runner.choice import Choice, LoadOptions, open_session, resolve, spec_with_weights
from runner.hardware import Machine
from runner.model import DEFAULT_MODEL_ID, ModelSpec, load_spec

@dataclass(frozen=True)
class ModelChoice:
    """What the user asked for; None means 'let runner decide'."""

    model: str | None = None          # id or folder; None: the default model
    backend: str | None = None        # a registry name; None: the plan's choice
    quant: str | None = None          # None: the plan's choice
    context: int | None = None        # None: min(DEFAULT_CONTEXT, the model's maximum)
    allow_offload: bool = False
    kv_bits: int | None = None
    fast_decode: bool = True
    kernel: str | None = None

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL_ID


def this_machine() -> Machine:
    from runner.hardware import detect_machine

    return detect_machine()


def core_choice(choice: ModelChoice, spec: ModelSpec, machine: Machine) -> Choice:
    """The core's resolution of what the user asked for (the same as every other front end's)."""
    return resolve(spec, machine, choice.backend, choice.quant, choice.context, kv_bits=choice.kv_bits)


def plan_for(choice: ModelChoice, spec: ModelSpec, machine: Machine) -> Plan:
    return core_choice(choice, spec, machine).plan


def spec_and_plan(choice: ModelChoice, machine: Machine) -> tuple[ModelSpec, Plan]:
    spec = load_spec(choice.model)
    return spec, plan_for(choice, spec, machine)


def weights_spec(spec: ModelSpec, plan: Plan, on_progress: Callable[[LoadProgress], None]) -> ModelSpec:
    """The spec to load as planned (`choice.spec_with_weights`)."""
    return spec_with_weights(spec, plan.backend, on_progress)


def load_session(
    choice: ModelChoice, spec: ModelSpec, plan: Plan, on_progress: Callable[[LoadProgress], None]
) -> Session:
    planned = Choice(spec, plan.machine, plan.backend, plan.quant, plan.context, plan, "as planned", plan.kv_bits)
    options = LoadOptions(allow_offload=choice.allow_offload, fast_decode=choice.fast_decode, kernel=choice.kernel)
    return open_session(planned, options, on_progress)


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
        return spec_and_plan(choice, machine)

    def load(self, choice: ModelChoice, spec: ModelSpec, plan: Plan,
             on_progress: Callable[[LoadProgress], None]) -> Session:
        return load_session(choice, spec, plan, on_progress)

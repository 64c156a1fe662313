"""The part of a plan that differs per backend, and the defaults most backends share.

budget.py does the arithmetic every backend shares (KV cache, activations, placement over devices,
roofline, verdict). What belongs to one backend's libraries (the bytes of each scheme it loads,
what stays unquantized, how it lays layers out, what it warns about, which of its schemes it
offers on a machine) is a `PlanRules` subclass in that backend's package, reached through the
registry as `<Backend>.plan_rules`. Pure Python: no torch, no mlx.

    rules = rules_for("cuda")
    rules.weights_breakdown(model, "nf4", machine)      # exact bytes as bitsandbytes stores them
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from runner.errors import UserInputError
from runner.model import Linear, ModelSpec

if TYPE_CHECKING:
    from runner.hardware import Machine

# the layouts a plan knows (budget places each its own way)
GPUS = "gpus"      # accelerate's: whole layers over one host's GPUs, then CPU RAM, then disk
HOSTS = "hosts"    # each host's unified memory (or RAM on Linux): layer ranges per host, no offload

# the schemes every safetensors backend loads as they are (no quantization)
PLAIN_DESCRIPTIONS = {"bf16": "bfloat16, 2 bytes per weight", "fp16": "float16, 2 bytes per weight",
                      "fp32": "float32, 4 bytes per weight"}

SMALL_MODEL_PARAMETERS = 1_000_000_000   # below this, 4-bit ruins answers (measured on SmolLM2-135M)


@dataclass(frozen=True)
class WeightsBreakdown:
    """Where the weight bytes are: the input embeddings, one decoder layer, the head."""

    embeddings: int
    layer: int            # one decoder layer (all layers are the same size)
    head: int             # final norm + lm_head (lm_head is 0 when tied to the embeddings)
    num_layers: int
    layer_unquantized: int  # one layer kept in the compute dtype (bitsandbytes offload keeps it so)

    @property
    def total(self) -> int:
        return self.embeddings + self.num_layers * self.layer + self.head


@dataclass(frozen=True)
class Candidate:
    """A scheme a backend offers on a machine: `rank` orders the candidates of all backends
    (lower first); `why` is the reason the plan gives in words."""

    rank: float
    quant: str
    why: str


class PlanRules:
    """Defaults: weights as transformers stores them in a plain dtype, every layer on the device
    that holds it, the KV cache exactly `context` tokens, logits of the last position only."""

    descriptions: dict[str, str] = {}    # quant -> what it is, in words
    smallest = ""                        # the scheme tried with offload when nothing fits
    loads_gguf = False                   # runs GGUF files as stored (else safetensors folders)

    def suits(self, machine: "Machine") -> float | None:
        """How well this backend suits `machine` for a safetensors model (lower: preferred); None:
        it is not for this machine."""
        return None

    def layout(self, machine: "Machine") -> str:
        return GPUS

    def compute_bytes(self, model: ModelSpec, quant: str) -> int:
        """Bytes per element of what stays unquantized (embeddings, norms, biases)."""
        return 4 if quant == "fp32" else 2

    def linear_bytes(self, linear: Linear, quant: str, unquantized_bytes: int = 2) -> int:
        """Bytes of one Linear layer as the library stores it under `quant`; `unquantized_bytes`
        is the element size of what stays in the compute dtype (the bias, scales)."""
        bias = linear.out_features * unquantized_bytes if linear.bias else 0
        if quant in ("bf16", "fp16"):
            return linear.weight_elements * 2 + bias
        if quant == "fp32":
            return linear.weight_elements * 4 + bias
        raise UserInputError(f"unknown quantization '{quant}'")

    def stored_as(self, linear: Linear, quant: str) -> str:
        """The scheme `linear` is stored in under `quant` (a library may skip some layers)."""
        return quant

    def quantizes_embeddings(self, quant: str) -> bool:
        return False

    def planned_quant(self, quant: str, machine: "Machine") -> str:
        """The scheme the weights take on this machine (a library may load another one here)."""
        return quant

    def weights_breakdown(self, model: ModelSpec, quant: str, machine: "Machine | None" = None) -> WeightsBreakdown:
        if machine is not None:
            quant = self.planned_quant(quant, machine)
        plain = self.compute_bytes(model, quant)
        norms = model.layer_norm_elements() * plain

        def layer_with(scheme: str) -> int:
            return norms + sum(self.linear_bytes(linear, self.stored_as(linear, scheme), plain)
                               for linear in model.layer_linears())

        embedding = Linear("embed_tokens", model.vocab_size, model.hidden_size)
        if self.quantizes_embeddings(quant):
            embeddings = self.linear_bytes(embedding, quant, plain)
            lm_head = 0 if model.tie_embeddings else self.linear_bytes(embedding, quant, plain)
        else:
            embeddings = model.embedding_elements * plain
            lm_head = model.lm_head_elements * plain
        return WeightsBreakdown(
            embeddings=embeddings,
            layer=layer_with(quant),
            head=model.hidden_size * plain + lm_head,
            num_layers=model.num_layers,
            layer_unquantized=layer_with("fp32" if quant == "fp32" else "bf16"),
        )

    def kv_tokens(self, context: int) -> int:
        """Tokens the KV cache is allocated for when the session holds `context`."""
        return context

    def logits_bytes(self, model: ModelSpec, batch: int) -> int:
        """The last position's logits: the lm_head's output in the compute dtype and its fp32 copy."""
        return model.vocab_size * batch * (2 + 4)

    def kv_read_bytes(self, model: ModelSpec, context: int, batch: int, quant: str, kv_bits: int | None) -> int:
        """Scratch beyond the activations that reading a quantized KV cache (`kv_bits`) for one
        layer's attention takes at `context` positions (counted with the activations); 0 where the
        attention reads it as stored."""
        return 0

    def attention_scratch_bytes(self, model: ModelSpec, machine: "Machine", context: int, batch: int, quant: str,
                                kv_bits: int | None) -> int:
        """Scratch beyond the activations that one layer's attention over `context` cached positions
        takes on `machine` (counted with the activations): by default the quantized read's."""
        return self.kv_read_bytes(model, context, batch, quant, kv_bits)

    def offloads_unquantized(self, quant: str) -> str:
        """Why layers offloaded to CPU or disk stay in the compute dtype under `quant`, in words
        (bitsandbytes does that); "" where they keep the scheme."""
        return ""

    def dequantizes_in_flight(self, quant: str) -> bool:
        """A matmul dequantizes its weight into a temporary copy (counted in the activations)."""
        return False

    def check(self, model: ModelSpec, machine: "Machine", quant: str) -> None:
        """Raise UserInputError for a request this backend cannot run at all."""

    def warnings(self, model: ModelSpec, machine: "Machine", quant: str) -> list[str]:
        return []

    def scheme_note(self, model: ModelSpec, machine: "Machine", quant: str) -> str:
        """One line under the plan's table about how this scheme is counted here ("" for none)."""
        return ""

    def plan_details(self, plan) -> dict:
        """What `runner plan --json` adds for a plan that fits, in this backend's own terms."""
        return {}

    def candidates(self, model: ModelSpec, machine: "Machine") -> list[Candidate]:
        """The schemes this backend offers for `model` on `machine`, for the plan's recommendation."""
        return []

    def shown(self, model: ModelSpec | None, machine: "Machine") -> list[tuple[float, str]]:
        """(rank, quant) rows worth showing in the plan's table on `machine` (lower rank first)."""
        return []


def small_model_warning(model: ModelSpec) -> list[str]:
    """What a 4-bit scheme does to a small model, in words (empty for a large one)."""
    if model.parameter_count() >= SMALL_MODEL_PARAMETERS:
        return []
    return [f"{model.name} is small ({model.parameter_count() / 1e6:.0f}M parameters): small models do not survive "
            "4-bit (SmolLM2-135M at MLX 4-bit answered garbage here; 8-bit and bf16 answered right)"]


def installed_rules() -> dict[str, PlanRules]:
    """name -> plan rules of every backend installed here, in registry order."""
    from runner.backend import installed_backends

    return {name: cls.plan_rules for name, cls in installed_backends().items()}


def rules_for(backend: str) -> PlanRules:
    """The plan rules of backend `backend`, from the registry (its package's light __init__)."""
    from runner.backend import backend_class

    return backend_class(backend).plan_rules

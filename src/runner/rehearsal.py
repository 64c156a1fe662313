"""What a rehearsal measured, the same shape from every backend (`runner rehearse` prints it).

The backends (runner_cuda.rehearse, runner_mlx.rehearse) fill these; no torch or mlx here.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runner.errors import UserInputError

if TYPE_CHECKING:
    from runner.budget import Plan
    from runner.model import ModelSpec


@dataclass(frozen=True)
class DeviceMemory:
    """One device's plan against what was measured there."""

    device: str                 # "cuda:0", "cpu", "metal"
    planned_weights: int
    planned_kv_cache: int
    planned_total: int          # weights + KV cache + overhead (the plan's capacity use)
    weights: int                # measured after materializing all weights
    kv_cache: int               # measured: the bytes of the KV cache's tensors after the prefill and decode
    resident: int               # measured after the decode: all the allocator holds for us
    peak: int                   # allocator peak over load, prefill and decode (0 where unknown)
    load_peak: int              # allocator peak during materialization alone (0 where unknown)
    reserved_peak: int = 0      # CUDA: peak of what the caching allocator took (fragmentation included)

    @classmethod
    def against(cls, device: str, planned, **measured) -> "DeviceMemory":
        """`measured` on `device` next to `planned`: the plan's share for the device (a DeviceShare,
        or the Plan itself for one device; None: nothing was planned there)."""
        return cls(
            device=device,
            planned_weights=planned.weights_bytes if planned else 0,
            planned_kv_cache=planned.kv_cache_bytes if planned else 0,
            planned_total=planned.total_bytes if planned else 0,
            **measured,
        )


@dataclass(frozen=True)
class BlockMemory:
    name: str                   # "embeddings", "layer 3", "head"
    device: str
    bytes: int                  # memory growth when this block was materialized


@dataclass(frozen=True)
class RehearsalResult:
    model: str
    quant: str
    context: int
    num_layers: int
    method: str                 # how bytes were measured: "allocator", "tensor bytes", "mlx allocator"
    devices: tuple[DeviceMemory, ...]
    blocks: tuple[BlockMemory, ...]
    planned_layer_bytes: float  # the plan's bytes for one decoder layer's weights
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_step_seconds: tuple[float, ...]
    roofline_tokens_per_s: float
    load_seconds: float
    versions: dict[str, str] = field(default_factory=dict)
    device_names: dict[str, str] = field(default_factory=dict)

    @property
    def layer_bytes(self) -> tuple[int, ...]:
        return tuple(b.bytes for b in self.blocks if b.name.startswith("layer "))

    @property
    def measured_layer_bytes(self) -> float:
        """Mean measured bytes of one decoder layer's weights."""
        sizes = self.layer_bytes
        return sum(sizes) / len(sizes) if sizes else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Warm decode speed: 1 / the median step time (the first step after prefill is slower)."""
        if not self.decode_step_seconds:
            return 0.0
        return 1.0 / statistics.median(self.decode_step_seconds)

    @property
    def notes(self) -> tuple[str, ...]:
        """Lines a backend adds below the report's table."""
        return ()

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "quant": self.quant,
            "context": self.context,
            "num_layers": self.num_layers,
            "method": self.method,
            "devices": [vars(d) for d in self.devices],
            "blocks": [vars(b) for b in self.blocks],
            "planned_layer_bytes": self.planned_layer_bytes,
            "measured_layer_bytes": self.measured_layer_bytes,
            "prefill_tokens": self.prefill_tokens,
            "prefill_seconds": self.prefill_seconds,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens": self.decode_tokens,
            "decode_step_seconds": list(self.decode_step_seconds),
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "roofline_tokens_per_s": self.roofline_tokens_per_s,
            "load_seconds": self.load_seconds,
            "versions": self.versions,
            "device_names": self.device_names,
        }


def check_lengths(plan: "Plan", decode_tokens: int, prefill_chunk: int | None, default_chunk: int) -> int:
    """Refuse decode and prefill lengths a rehearsal of `plan` cannot run; the prefill chunk to use."""
    if not 1 <= decode_tokens < plan.context:
        raise UserInputError(f"--decode-tokens must be between 1 and {plan.context - 1} (the context)")
    prefill_chunk = prefill_chunk or default_chunk
    if prefill_chunk < 1:
        raise UserInputError("--prefill-chunk must be at least 1 token")
    return prefill_chunk


def plan_fields(plan: "Plan") -> dict:
    """The fields of a RehearsalResult that come from the plan, not from measuring."""
    return {
        "model": plan.model.name,
        "quant": plan.quant,
        "context": plan.context,
        "num_layers": plan.model.num_layers,
        "planned_layer_bytes": float(plan.layer_bytes),
        "roofline_tokens_per_s": plan.roofline_tokens_per_s,
    }


def architecture_config(spec: "ModelSpec") -> dict:
    """A copy of the config.json of `spec` (folder, HF cache or catalog) with its layer count, which
    `--layers` may have shrunk: the architecture a rehearsal builds."""
    from runner.model import catalog_config, read_config

    if spec.path is not None:
        config = read_config(spec.path / "config.json", spec.name)
    else:
        config = catalog_config(spec.name)
        if config is None:
            raise UserInputError(f"{spec.name}: no config.json to build the architecture from")
    return {**config, "num_hidden_layers": spec.num_layers}

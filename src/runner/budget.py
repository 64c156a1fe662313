"""Plan: the memory arithmetic. Pure Python: no torch, no mlx.

INTERFACE CONTRACT (other modules rely on these names; the foundation work fills the bodies).
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.hardware import Machine
from runner.model import ModelSpec

# quant name -> what it is; the CLI accepts these names
QUANTS = ("bf16", "fp16", "fp32", "fp8", "int8", "nf4", "nf4-nodq", "fp4", "q8", "q4")

FITS = "fits"
OFFLOAD = "offload"           # fits only with CPU or disk offload
DOES_NOT_FIT = "does-not-fit"


@dataclass(frozen=True)
class DeviceShare:
    """One device's part of a placement."""

    device: str                   # "cuda:0", "cpu", "disk", "metal", "host2:metal"
    kind: str                     # "gpu", "cpu", "disk", "unified"
    capacity_bytes: int           # what the plan lets this device use
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    layers: tuple[int, int]       # decoder layers [start, stop) placed here; (0, 0) for none
    embeddings: bool = False      # holds the input embeddings
    head: bool = False            # holds the final norm and lm_head

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    machine: Machine
    quant: str
    context: int
    batch: int
    backend: str                  # "cuda" or "mlx"
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    placement: tuple[DeviceShare, ...]
    verdict: str                  # FITS, OFFLOAD or DOES_NOT_FIT
    warnings: tuple[str, ...]
    roofline_tokens_per_s: float  # decode, batch 1: bandwidth / bytes read per token

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    def max_memory(self) -> dict[int | str, int]:
        """accelerate's `max_memory` for this placement: {gpu index: bytes, "cpu": bytes}."""
        raise NotImplementedError

    def device_map(self) -> dict[str, int | str]:
        """transformers' `device_map`: module name -> gpu index, "cpu" or "disk"."""
        raise NotImplementedError


def make_plan(
    model: ModelSpec, machine: Machine, quant: str, context: int, batch: int = 1, backend: str | None = None
) -> Plan:
    raise NotImplementedError

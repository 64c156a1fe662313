"""How a model is split over several hosts: the Plan's placement plus what MLX itself requires.
Pure arithmetic (runner.budget's numbers), no mlx.

Two splits:
- tensor: mlx-lm's `shard()`: every layer's attention heads and MLP columns are divided among the
  hosts. Needs the attention heads and the KV heads divisible by the number of hosts and, when
  quantized, each host's slice a whole number of quantization groups.
- pipeline: runner's own (`runner_mlx.pipeline`): contiguous layer ranges, one per host, sized by
  each host's memory. Every host also keeps the embeddings, the final norm and the head (as
  mlx-lm's pipelines do), so each host can sample the next token itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.download import human_size as size   # 10^9-byte units, as every other command prints
from runner.errors import DoesNotFit, UserInputError
from runner.model import ModelSpec

from runner_mlx import GROUP_SIZE, QUANT_BITS
from runner.words import counted

PIPELINE_TYPES = ("llama", "mistral", "qwen2")   # the decoder layout runner's pipeline knows
TENSOR_TYPES = ("llama", "mistral", "qwen2")     # mlx-lm models with shard() that runner checked


@dataclass(frozen=True)
class LaunchHost:
    name: str           # as the user wrote it (ssh name or IP)
    ip: str             # where the ring connects
    local: bool         # this machine (started without ssh)
    ram_bytes: int
    os: str             # "darwin" or "linux"


@dataclass(frozen=True)
class HostShare:
    host: str
    layers: tuple[int, int]      # [start, stop)
    weights_bytes: int           # its layers (or slice of every layer), the embeddings and the head
    kv_cache_bytes: int          # for the context
    overhead_bytes: int          # activations and logits
    capacity_bytes: int          # 0.9 x the host's memory (above that a Mac swaps)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    def describe(self, num_layers: int, split: str) -> str:
        start, stop = self.layers
        what = (f"layers {start}-{stop - 1} ({stop - start} of {num_layers})" if split == "pipeline"
                else f"its slice of all {counted(num_layers, 'layer')}")
        return f"{self.host}: {what}, {size(self.total_bytes)} of {size(self.capacity_bytes)} usable"


def default_launch_quant(spec: ModelSpec) -> str:
    """q4 spreads a big model over the fewest hosts; small models do not survive it (budget's threshold)."""
    from runner.plan_rules import SMALL_MODEL_PARAMETERS

    return "q8" if spec.parameter_count() < SMALL_MODEL_PARAMETERS else "q4"


def tensor_split_problem(spec: ModelSpec, hosts: int, quant: str) -> str | None:
    """Why mlx-lm's tensor-parallel `shard()` cannot split this model over `hosts`; None if it can."""
    if spec.model_type not in TENSOR_TYPES:
        return f"runner has not checked mlx-lm's tensor split for model_type '{spec.model_type}'"
    if spec.num_heads % hosts or spec.num_kv_heads % hosts:
        return (f"{spec.num_heads} attention heads and {spec.num_kv_heads} KV heads do not divide "
                f"among {hosts} hosts, and mlx-lm would shard it anyway and crash in attention")
    if quant in QUANT_BITS:
        for name, width in (("attention output", spec.num_heads * spec.head_dim),
                            ("MLP", spec.intermediate_size)):
            if (width // hosts) % GROUP_SIZE:
                return (f"each host's {name} slice ({width // hosts} columns) is not a whole number of "
                        f"{GROUP_SIZE}-wide quantization groups (use bf16)")
    return None


def pipeline_split_problem(spec: ModelSpec, hosts: int) -> str | None:
    if spec.model_type not in PIPELINE_TYPES:
        return f"runner's pipeline split knows {', '.join(PIPELINE_TYPES)}, not '{spec.model_type}'"
    if spec.num_layers < hosts:
        return f"{counted(spec.num_layers, 'layer')} cannot give each of {hosts} hosts one"
    return None


def choose_split(spec: ModelSpec, quant: str, count: int, wanted: str) -> tuple[str, str]:
    """(split, why): the one asked for, or with "auto" tensor where it works, else pipeline."""
    tensor = tensor_split_problem(spec, count, quant)
    pipeline = pipeline_split_problem(spec, count)
    problems = {"tensor": tensor, "pipeline": pipeline}
    if wanted == "auto":
        if tensor is None:
            return "tensor", f"tensor split: heads and KV heads divide among {count} hosts"
        if pipeline is None:
            return "pipeline", f"pipeline split, because {tensor}"
        raise UserInputError(f"{spec.name} cannot be split over {count} hosts: {tensor}; {pipeline}")
    if problems[wanted] is not None:
        other = "pipeline" if wanted == "tensor" else "tensor"
        advice = (f"; use --split {other}" if problems[other] is None
                  else f"; --split {other} does not work either: {problems[other]}")
        raise UserInputError(f"{spec.name}: the {wanted} split does not work: {problems[wanted]}{advice}")
    return wanted, f"{wanted} split, as asked"


def pipeline_ranges(num_layers: int, room: list[float]) -> list[tuple[int, int]]:
    """Contiguous layer ranges, one per host, in proportion to each host's `room`, at least one each."""
    total = sum(room)
    if total <= 0 or num_layers < len(room):
        raise DoesNotFit("no room for the layers on these hosts")
    exact = [num_layers * r / total for r in room]
    counts = [max(1, int(x)) for x in exact]
    by_remainder = sorted(range(len(room)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for host in by_remainder[:max(num_layers - sum(counts), 0)]:   # what rounding down left over
        counts[host] += 1
    while sum(counts) > num_layers:          # the "at least one" rule can overshoot
        largest = max(range(len(room)), key=lambda i: counts[i])
        counts[largest] -= 1
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def plan_hosts(spec: ModelSpec, quant: str, context: int, hosts: list[LaunchHost], split: str,
               kv_bits: int | None = None) -> list[HostShare]:
    """Each host's share, with the Plan's arithmetic (runner.budget); DoesNotFit when one is too full.

    Pipeline: layers in proportion to each host's room after the embeddings and head it keeps, so
    a 192 GB and a 128 GB Mac share a model that an even split would not fit."""
    from runner.budget import (MAC_WORKING_SET_SAFE, activation_bytes, kv_cache_bytes, logits_bytes,
                               weights_breakdown)

    names = [h.name if [x.name for x in hosts].count(h.name) == 1 else f"{h.name}#{rank}"
             for rank, h in enumerate(hosts)]
    parts = weights_breakdown(spec, quant, "mlx")
    kv_per_layer = kv_cache_bytes(spec, context, 1, quant, "mlx", kv_bits) // spec.num_layers
    overhead = activation_bytes(spec, context, 1, quant, "mlx") + logits_bytes(spec, 1, "mlx")
    fixed = parts.embeddings + parts.head + overhead
    capacities = [int(h.ram_bytes * MAC_WORKING_SET_SAFE) for h in hosts]
    if split == "pipeline":
        if all(c <= fixed for c in capacities):
            raise DoesNotFit(f"{spec.name} ({quant}, {counted(context, 'token')} of context): the embeddings, head and "
                             f"activations alone ({size(fixed)}) fill every host's usable memory "
                             f"({', '.join(size(c) for c in capacities)})")
        per_layer = parts.layer + kv_per_layer
        ranges = pipeline_ranges(spec.num_layers, [max(c - fixed, 0) / per_layer for c in capacities])
        counts = [stop - start for start, stop in ranges]
        weights = [parts.embeddings + parts.head + count * parts.layer for count in counts]
        kv = [count * kv_per_layer for count in counts]
    else:
        ranges = [(0, spec.num_layers)] * len(hosts)
        weights = [parts.embeddings + parts.head + spec.num_layers * parts.layer // len(hosts)] * len(hosts)
        kv = [spec.num_layers * kv_per_layer // len(hosts)] * len(hosts)
    shares = [HostShare(n, r, w, k, overhead, c) for n, r, w, k, c in zip(names, ranges, weights, kv, capacities)]
    if any(s.total_bytes > s.capacity_bytes for s in shares):
        raise DoesNotFit(f"{spec.name} ({quant}, {counted(context, 'token')} of context) does not fit these hosts with "
                         f"the {split} split: " + "; ".join(s.describe(spec.num_layers, split) for s in shares))
    return shares

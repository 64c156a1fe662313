"""How a model is split over several hosts: pure arithmetic, no mlx.

Two splits:
- tensor: mlx-lm's `shard()`: every layer's attention heads and MLP columns are divided among the
  hosts. Needs the attention heads and the KV heads divisible by the number of hosts (and, when
  quantized, each host's slice a whole number of quantization groups).
- pipeline: runner's own: contiguous layer ranges, one per host, sized by each host's memory.
  Every host also keeps the embeddings, the final norm and the output head (as mlx-lm's pipelines
  do), so the sampled token is known everywhere without another message.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.errors import DoesNotFit, UserInputError
from runner.model import ModelSpec

from runner_mlx import GROUP_SIZE, QUANT_BITS

# bits per weight element as mlx stores it: quantized weights carry a 16-bit scale and bias per group
BITS_PER_ELEMENT = {"q4": 4 + 32 / GROUP_SIZE, "q8": 8 + 32 / GROUP_SIZE, "bf16": 16, "fp16": 16, "fp32": 32}
USABLE_FRACTION = 0.75     # of a host's RAM that the model may use (macOS' default GPU working set)
PIPELINE_TYPES = ("llama", "mistral", "qwen2")   # the decoder layout runner's pipeline knows
GB = 1024**3


@dataclass(frozen=True)
class HostShare:
    host: str
    layers: tuple[int, int]     # [start, stop)
    weights_bytes: int
    kv_cache_bytes: int
    capacity_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes

    def describe(self, num_layers: int, split: str) -> str:
        start, stop = self.layers
        what = (f"layers {start}-{stop - 1} ({stop - start} of {num_layers})" if split == "pipeline"
                else f"its slice of all {num_layers} layers")
        return (f"{self.host}: {what}, {size(self.total_bytes)} (weights {size(self.weights_bytes)} + "
                f"KV cache {size(self.kv_cache_bytes)}) of {size(self.capacity_bytes)} usable")


def size(count: int) -> str:
    return f"{count / GB:.2f} GB" if count >= GB else f"{count / 1024**2:.1f} MB"


def layer_bytes(spec: ModelSpec, quant: str) -> int:
    elements = sum(lin.weight_elements for lin in spec.layer_linears())
    return int(elements * BITS_PER_ELEMENT[quant] / 8 + spec.layer_norm_elements() * 2)


def shared_bytes(spec: ModelSpec, quant: str) -> int:
    """Embeddings, final norm and head: held by every host."""
    return int((spec.embedding_elements + spec.lm_head_elements) * BITS_PER_ELEMENT[quant] / 8)


def kv_bytes_per_layer(spec: ModelSpec, quant: str, context: int) -> int:
    element = 4 if quant == "fp32" else 2
    return 2 * spec.num_kv_heads * spec.head_dim * element * context


def tensor_split_problem(spec: ModelSpec, hosts: int, quant: str) -> str | None:
    """Why mlx-lm's tensor-parallel `shard()` cannot split this model over `hosts`; None if it can."""
    if spec.model_type not in ("llama", "mistral", "qwen2", "mixtral"):
        return f"runner has not checked tensor parallelism for model_type '{spec.model_type}'"
    if spec.num_heads % hosts or spec.num_kv_heads % hosts:
        return (f"{spec.num_heads} attention heads and {spec.num_kv_heads} KV heads do not divide "
                f"among {hosts} hosts")
    if quant in QUANT_BITS:
        for name, width in (("attention output", spec.num_heads * spec.head_dim),
                            ("MLP", spec.intermediate_size)):
            if (width // hosts) % GROUP_SIZE:
                return (f"each host's {name} slice ({width // hosts} columns) is not a whole number of "
                        f"{GROUP_SIZE}-wide quantization groups; use --quant bf16 or the pipeline split")
    return None


def pipeline_split_problem(spec: ModelSpec, hosts: int) -> str | None:
    if spec.model_type not in PIPELINE_TYPES:
        return f"runner's pipeline split knows {', '.join(PIPELINE_TYPES)}, not '{spec.model_type}'"
    if spec.num_layers < hosts:
        return f"{spec.num_layers} layers cannot give each of {hosts} hosts one"
    return None


def pipeline_ranges(num_layers: int, weights: list[float]) -> list[tuple[int, int]]:
    """Contiguous layer ranges, one per host, in proportion to `weights`, each at least one layer."""
    total = sum(weights)
    if total <= 0:
        raise UserInputError("no host has memory left for layers")
    exact = [num_layers * w / total for w in weights]
    counts = [max(1, int(x)) for x in exact]
    # hand out (or take back) the remaining layers by largest (or smallest) remainder
    order = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    while sum(counts) < num_layers:
        for i in order:
            if sum(counts) < num_layers:
                counts[i] += 1
    while sum(counts) > num_layers:
        for i in reversed(order):
            if sum(counts) > num_layers and counts[i] > 1:
                counts[i] -= 1
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def plan_split(spec: ModelSpec, quant: str, context: int, hosts: list[str], ram_bytes: list[int],
               split: str) -> list[HostShare]:
    """Each host's share; raise DoesNotFit (with every host's numbers) when one does not fit."""
    if quant not in BITS_PER_ELEMENT:
        raise UserInputError(f"runner launch runs {', '.join(BITS_PER_ELEMENT)}; not '{quant}'")
    n = len(hosts)
    problem = tensor_split_problem(spec, n, quant) if split == "tensor" else pipeline_split_problem(spec, n)
    if problem:
        other = "pipeline" if split == "tensor" else "tensor"
        other_problem = (pipeline_split_problem(spec, n) if other == "pipeline"
                         else tensor_split_problem(spec, n, quant))
        advice = f"; use --split {other}" if other_problem is None else f"; --split {other} fails too: {other_problem}"
        raise UserInputError(f"{spec.name}: the {split} split does not work: {problem}{advice}")
    capacities = [int(ram * USABLE_FRACTION) for ram in ram_bytes]
    per_layer = layer_bytes(spec, quant)
    kv_layer = kv_bytes_per_layer(spec, quant, context)
    shared = shared_bytes(spec, quant)
    shares = []
    if split == "pipeline":
        room = [max(c - shared, 0) for c in capacities]
        for host, capacity, (start, stop) in zip(hosts, capacities, pipeline_ranges(spec.num_layers, room)):
            count = stop - start
            shares.append(HostShare(host, (start, stop), shared + count * per_layer, count * kv_layer, capacity))
    else:
        for host, capacity in zip(hosts, capacities):
            shares.append(HostShare(host, (0, spec.num_layers), shared + spec.num_layers * per_layer // n,
                                    spec.num_layers * kv_layer // n, capacity))
    too_big = [s for s in shares if s.total_bytes > s.capacity_bytes]
    if too_big:
        lines = "; ".join(s.describe(spec.num_layers, split) for s in shares)
        raise DoesNotFit(f"{spec.name} ({quant}) does not fit these hosts with the {split} split: {lines}")
    return shares

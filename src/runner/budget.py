"""Plan: the memory arithmetic. Pure Python: no torch, no mlx.

INTERFACE CONTRACT (other modules rely on these names; the foundation work fills the bodies).

What a plan counts, per device:
  weights   exact bytes as each library stores them (see `linear_bytes`), checked in
            tests/test_budget_libraries.py against the real libraries on a tiny model;
  KV cache  context x batch x 2 (K and V) x layers x KV heads x head_dim x KV dtype bytes;
  overhead  the CUDA context (per GPU), an activation workspace for one prefill chunk of
            PREFILL_CHUNK tokens (both backends prefill in such chunks), the dequantized copy of the
            largest weight (bitsandbytes/FP8 dequantize one matrix at a time), and the logits on the
            device that holds lm_head: of the last position only on CUDA (the session asks
            transformers for `logits_to_keep=1`), of a whole chunk on MLX (mlx-lm computes them).
Placement follows accelerate's auto device map: whole decoder layers, embeddings first on GPU 0,
the final norm and lm_head last, headroom left on every GPU for its layers' KV cache and the
activations; what does not fit goes to CPU RAM, then to disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from runner.errors import UserInputError
from runner.hardware import GB, Host, Machine
from runner.model import Linear, ModelSpec
from runner.plan_rules import GPUS, HOSTS, WeightsBreakdown, installed_rules, rules_for
from runner.words import counted

GGUF = "gguf"   # a GGUF file's tensors as stored (llama.cpp): sized from the file, not by a rule

FITS = "fits"
OFFLOAD = "offload"           # fits only with CPU or disk offload
DOES_NOT_FIT = "does-not-fit"

# ---- the constants of the arithmetic (each one is a fact of a library or a stated assumption) ----
CUDA_CONTEXT_BYTES = 500 * 1024**2   # CUDA context + cuBLAS workspace per GPU used (torch)
PREFILL_CHUNK = 2048                 # tokens processed at once while reading the prompt (CUDA session, mlx-lm)
GPU_RESERVE = 0.05                   # of each GPU's free memory: allocator fragmentation, other users
                                     # (measured at a 405B-shaped prefill peak on an H200: 3.6 GB with the
                                     # CUDA backend's expandable segments, 6.3 GB without; 5 % = 7.5 GB there)
RAM_RESERVE = 0.10                   # of RAM: the OS and the rest of the Python process
MAC_WORKING_SET_SAFE = 0.90          # above ~0.9 x the GPU working set a Mac swaps, 40-150x slower
MACOS_RESERVE = 8 * GB               # what macOS itself needs when the wired limit is raised
PCIE_BANDWIDTH = 25 * GB             # PCIe 4.0 x16 in practice: what CPU-offloaded weights stream at
DISK_BANDWIDTH = 3 * GB              # a fast NVMe SSD
MAX_CONTEXT_LIMIT = 10_000_000       # above this a context is a typo


def compute_bytes(model: ModelSpec, quant: str, backend: str) -> int:
    """Bytes per element of what stays unquantized (embeddings, norms, biases, MLX scales)."""
    return rules_for(backend).compute_bytes(model, quant)


# ---- weights ------------------------------------------------------------------------------------

def linear_bytes(linear: Linear, quant: str, unquantized_bytes: int = 2, backend: str | None = None) -> int:
    """Bytes of one Linear layer as the library of `backend` (default: the one taking `quant`)
    stores it; `unquantized_bytes` is the element size of what stays in the compute dtype."""
    return rules_for(backend or default_backend_for(quant)).linear_bytes(linear, quant, unquantized_bytes)


def weights_breakdown(model: ModelSpec, quant: str, backend: str | None = None,
                      machine: Machine | None = None) -> WeightsBreakdown:
    """Where the weight bytes are under `quant` on `backend` (default: the one taking `quant`)."""
    backend = backend or default_backend_for(quant)
    check_scheme(quant, backend)
    return rules_for(backend).weights_breakdown(model, quant, machine)


def weights_bytes(model: ModelSpec, quant: str, backend: str | None = None) -> int:
    return weights_breakdown(model, quant, backend).total


KV_BITS = (8, 4)                     # a quantized KV cache: bits per stored K or V value
KV_GROUP_SIZE = 64                   # ... with one scale and one bias (compute dtype) per 64 values


def kv_dtype_bytes(quant: str, kv_bits: int | None = None) -> float:
    """Bytes per cached K or V value: the compute dtype's; with `kv_bits`, the packed value and its
    share of its group's scale and bias (mlx-lm's QuantizedKVCache, and the cuda backend's own)."""
    plain = 4 if quant == "fp32" else 2
    if kv_bits is None:
        return plain
    return kv_bits / 8 + 2 * plain / KV_GROUP_SIZE


def check_kv_bits(model: ModelSpec, kv_bits: int | None) -> None:
    if kv_bits is None:
        return
    if kv_bits not in KV_BITS:
        raise UserInputError(f"--kv-bits must be {' or '.join(map(str, KV_BITS))}, not {kv_bits}")
    if model.head_dim % KV_GROUP_SIZE:
        raise UserInputError(f"--kv-bits quantizes the KV cache in groups of {KV_GROUP_SIZE} values; "
                             f"{model.name}'s head size {model.head_dim} is not a multiple of {KV_GROUP_SIZE}")


def kv_cache_bytes(model: ModelSpec, context: int, batch: int = 1, quant: str = "bf16", backend: str | None = None,
                   kv_bits: int | None = None) -> int:
    """K and V for `context` tokens, as many as `backend` allocates for them (mlx-lm: in steps)."""
    check_kv_bits(model, kv_bits)
    tokens = rules_for(backend).kv_tokens(context) if backend else context
    return round(model.kv_bytes_per_token(kv_dtype_bytes(quant, kv_bits))) * tokens * batch


# ---- overhead -----------------------------------------------------------------------------------

def activation_bytes(model: ModelSpec, context: int, batch: int, quant: str, backend: str | None = None) -> int:
    """Activations of one prefill chunk through one layer (flash / memory-efficient attention assumed).

    Residual + normed hidden state, q/k/v and attention output, and the MLP's gate, up and product.
    bitsandbytes and FP8 also dequantize the weight of the matmul in flight: add the largest one.
    """
    tokens = min(context, PREFILL_CHUNK) * batch
    width = 2 * model.hidden_size
    width += 2 * model.num_heads * model.head_dim + 2 * model.num_kv_heads * model.head_dim
    width += 3 * model.intermediate_size * max(1, model.experts_per_token if model.num_experts > 1 else 1)
    element = 4 if quant == "fp32" else 2
    workspace = tokens * width * element
    if rules_for(backend or default_backend_for(quant)).dequantizes_in_flight(quant):
        workspace += max(linear.weight_elements for linear in model.layer_linears()) * 2
    return workspace


def logits_bytes(model: ModelSpec, batch: int, backend: str | None = None) -> int:
    """Logits of a prefill chunk on the device holding the head (runner's CUDA session and mlx-lm
    compute them for the last position only)."""
    return rules_for(backend).logits_bytes(model, batch) if backend else model.vocab_size * batch * (2 + 4)


# ---- the plan -----------------------------------------------------------------------------------

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
    bandwidth_bytes_per_s: float = 0.0   # how fast this share's weights are read per token

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    machine: Machine
    quant: str
    context: int
    batch: int
    backend: str                  # a registry name (runner.backend.BACKENDS)
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    placement: tuple[DeviceShare, ...]
    verdict: str                  # FITS, OFFLOAD or DOES_NOT_FIT
    warnings: tuple[str, ...]
    roofline_tokens_per_s: float  # decode, batch 1: bandwidth / bytes read per token
    parallel: str = "single"      # "single", "layers" (accelerate across GPUs), "pipeline", "tensor" (MLX hosts)
    notes: tuple[str, ...] = ()   # facts worth saying that are not warnings (which MLX split works, ...)
    layer_bytes: int = 0          # one decoder layer's weights under this scheme
    largest_module_bytes: int = 0  # the biggest of a layer, the embeddings, lm_head (accelerate reserves it)
    kv_bits: int | None = None    # None: the KV cache in the compute dtype; 8 or 4: quantized
    layout: str = GPUS            # GPUS (one host's GPUs, then RAM, then disk) or HOSTS (per host, no offload)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    @property
    def offloaded(self) -> bool:
        return any(share.kind in ("cpu", "disk") for share in self.placement) and bool(self.machine.gpus)

    def max_memory(self) -> dict[int | str, int]:
        """accelerate's `max_memory` for this placement: {gpu index: bytes, "cpu": bytes}.

        Each device gets exactly the weights the plan puts there, so the KV cache and the
        activations keep the room the plan leaves them. accelerate also holds back its largest
        module on its "main" devices (the first GPU and the CPU, for offload buffers): that is added
        there, so that `infer_auto_device_map(model, max_memory=plan.max_memory())` lands on the
        plan's placement for unquantized weights (tests/test_budget.py checks it). For quantized
        weights accelerate sizes modules its own way: pass `device_map=plan.device_map()` too, which
        is the placement itself.
        """
        if self.layout != GPUS:
            raise ValueError(f"max_memory() is for accelerate's layout; this plan is the {self.backend} backend's")
        rotary_buffers = self.model.head_dim // 2 * 4 * 2   # inv_freq and original_inv_freq, fp32
        memory: dict[int | str, int] = {}
        main_gpu_seen = False
        for share in self.placement:
            cap = share.weights_bytes + (rotary_buffers if share.head else 0)
            if share.kind == "gpu":
                if not main_gpu_seen:
                    cap += self.largest_module_bytes
                    main_gpu_seen = True
                memory[int(share.device.split(":")[1])] = cap
            elif share.kind == "cpu":
                memory["cpu"] = cap + self.largest_module_bytes
        return memory

    def device_map(self) -> dict[str, int | str]:
        """transformers' `device_map`: module name -> gpu index, "cpu" or "disk".

        Module names are those of transformers 5's LlamaForCausalLM (also Mistral, Mixtral, Qwen2):
        model.embed_tokens, model.rotary_emb, model.layers.N, model.norm, lm_head.
        """
        if self.layout != GPUS:
            raise ValueError(f"device_map() is for accelerate's layout; this plan is the {self.backend} backend's")
        if self.verdict == DOES_NOT_FIT:
            raise ValueError("the plan does not fit: there is no device map to give")

        def target(share: DeviceShare) -> int | str:
            return int(share.device.split(":")[1]) if share.kind == "gpu" else share.kind

        mapping: dict[str, int | str] = {}
        first = next(share for share in self.placement if share.embeddings)
        last = next(share for share in self.placement if share.head)
        mapping["model.embed_tokens"] = target(first)
        for share in self.placement:
            for layer in range(*share.layers):
                mapping[f"model.layers.{layer}"] = target(share)
        mapping["model.norm"] = target(last)
        mapping["model.rotary_emb"] = target(last)   # no weights; accelerate puts it after the norm
        # a tied lm_head is the embedding's weight: accelerate keeps tied weights on one device
        mapping["lm_head"] = target(first) if self.model.tie_embeddings else target(last)
        return mapping


def preferred_backend(machine: Machine) -> str:
    """The backend that suits this machine best for a safetensors model (its rules' `suits`)."""
    from runner.backend import backend_names

    ranked = [(rank, name) for name, rules in installed_rules().items() if (rank := rules.suits(machine)) is not None]
    return min(ranked, key=lambda pair: pair[0])[1] if ranked else backend_names()[0]


def backends_taking(quant: str, machine: Machine | None = None, allowed=None) -> list[str]:
    """The backends whose schemes (`allowed(name)`, default: all they load) include `quant`, the one
    the plan prefers on `machine` first; a backend that is not installed takes nothing."""
    from runner.backend import backend_quants, installed_backends

    allowed = allowed or backend_quants
    installed = list(installed_backends())
    first = [preferred_backend(machine)] if machine is not None else []
    return [name for name in dict.fromkeys(first + installed) if name in installed and quant in allowed(name)]


def default_backend_for(quant: str, machine: Machine | None = None) -> str:
    """The backend that loads `quant` here (the plan's preferred one where several do); where none
    does, the preferred backend, whose check then says so."""
    from runner.backend import backend_names

    takers = backends_taking(quant, machine)
    return takers[0] if takers else (preferred_backend(machine) if machine is not None else backend_names()[0])


def check_scheme(quant: str, backend: str) -> None:
    """`backend` is known and loads `quant`; one clear line otherwise."""
    from runner.backend import all_quants, backend_names, backend_quants

    if backend not in backend_names():
        raise UserInputError(f"unknown backend '{backend}' (known: {', '.join(backend_names())})")
    if quant not in all_quants():
        raise UserInputError(f"unknown quantization '{quant}' (known: {', '.join(all_quants())})")
    takes = backend_quants(backend)
    if quant not in takes:
        others = [name for name in backend_names() if quant in backend_quants(name)]
        raise UserInputError(f"--quant {quant} is not a {backend} scheme (it is {'/'.join(others)}'s); "
                             f"the {backend} backend takes {', '.join(takes)}")


def check_request(model: ModelSpec, quant: str, context: int, batch: int, backend: str) -> None:
    check_scheme(quant, backend)
    if model.source == "gguf" and not rules_for(backend).loads_gguf:
        takers = [name for name, rules in installed_rules().items() if rules.loads_gguf]
        raise UserInputError(f"{model.name} is a GGUF file: the {'/'.join(takers) or '(none installed)'} backend runs it as "
                             f"stored (--backend {takers[0] if takers else '...'} --quant {GGUF}); "
                             f"the {backend} backend loads safetensors folders")
    if context < 1:
        raise UserInputError(f"--context must be a positive number of tokens, not {context}")
    if context > MAX_CONTEXT_LIMIT or context > model.max_context:
        raise UserInputError(
            f"--context {context:,} is more than {model.name} was trained for ({model.max_context:,} tokens)"
        )
    if not 1 <= batch <= 4096:
        raise UserInputError(f"--batch must be between 1 and 4096, not {batch}")


@dataclass
class _Slot:
    """A device being filled while placing (mutable scratch; the result is a DeviceShare)."""

    device: str
    kind: str
    capacity: int
    fixed: int                 # overhead always paid on this device if it is used
    bandwidth: float
    layers: list[int] = field(default_factory=list)
    embeddings: bool = False
    head: bool = False
    weights: int = 0
    kv: int = 0
    extra: int = 0             # overhead paid because of what it holds (activations, logits)

    @property
    def used(self) -> int:
        return self.weights + self.kv + self.extra + (self.fixed if self.holds_anything else 0)

    @property
    def holds_anything(self) -> bool:
        return bool(self.layers) or self.embeddings or self.head


def _fill(slots: list[_Slot], pieces: list[tuple[str, int, int, int, int]], fraction: float = 1.0) -> list[_Slot] | None:
    """Place pieces in order, each on the first slot (from the current one on) with room.

    A piece is (what, weights bytes by device kind, kv bytes, extra overhead, layer index): its
    weights may depend on where it lands (bitsandbytes keeps offloaded layers unquantized); the
    extra overhead (activations, logits) is paid once on a device, by its first layer or the head.
    `fraction` scales the accelerators' capacity (to spread layers evenly over GPUs).
    Returns the filled slots, or None when a piece fits nowhere.
    """
    filled = [_Slot(s.device, s.kind, s.capacity, s.fixed, s.bandwidth) for s in slots]
    current = 0
    for what, weights, kv, extra, layer in pieces:
        while current < len(filled):
            slot = filled[current]
            limit = slot.capacity * (fraction if slot.kind in ("gpu", "unified") else 1.0)
            first_layer_here = what == "layer" and not slot.layers and slot.kind != "disk"
            needs_extra = extra if first_layer_here or what == "head" else 0
            pay_fixed = 0 if slot.holds_anything else slot.fixed
            if slot.used + pay_fixed + weights[slot.kind] + kv + needs_extra <= limit:
                slot.weights += weights[slot.kind]
                slot.kv += kv
                slot.extra += needs_extra
                if what == "embeddings":
                    slot.embeddings = True
                elif what == "head":
                    slot.head = True
                else:
                    slot.layers.append(layer)
                break
            current += 1
        else:
            return None
    return filled


def make_plan(
    model: ModelSpec,
    machine: Machine,
    quant: str,
    context: int,
    batch: int = 1,
    backend: str | None = None,
    parallel: str | None = None,
    balance: bool = True,
    kv_bits: int | None = None,
) -> Plan:
    """Count the bytes, place them over the machine's devices, and judge.

    `parallel` only matters for MLX on several hosts: "pipeline" (default; contiguous layer ranges
    sized by each host's memory) or "tensor" (equal shares; heads and KV heads must divide).
    `balance=False` fills devices one after another instead of evenly: the same verdict, faster
    (used when searching for the longest context that fits). `kv_bits` (8 or 4) counts the KV
    cache quantized (`kv_dtype_bytes`); None counts it in the compute dtype.
    """
    backend = backend or default_backend_for(quant, machine)
    check_request(model, quant, context, batch, backend)
    rules = rules_for(backend)
    rules.check(model, machine, quant)
    breakdown = rules.weights_breakdown(model, quant, machine)
    kv_total = kv_cache_bytes(model, context, batch, quant, backend, kv_bits)
    kv_per_layer = kv_total // model.num_layers
    activations = activation_bytes(model, context, batch, quant, backend) + rules.attention_scratch_bytes(
        model, machine, context, batch, quant, kv_bits)
    logits = logits_bytes(model, batch, backend)
    warnings: list[str] = []
    notes: list[str] = []

    layout = rules.layout(machine)
    offload_words = rules.offloads_unquantized(quant)   # "": offloaded layers keep the scheme
    if layout == HOSTS:
        placement, verdict, parallel_used = _place_on_hosts(
            model, machine, breakdown, kv_per_layer, activations, logits, parallel, warnings, notes, balance
        )
    else:
        placement, verdict, parallel_used = _place_on_gpus(
            model, machine, breakdown, kv_per_layer, activations, logits, bool(offload_words),
            warnings, balance, backend
        )

    weights_total = sum(s.weights_bytes for s in placement) if verdict != DOES_NOT_FIT else breakdown.total
    kv_placed = sum(s.kv_cache_bytes for s in placement) if verdict != DOES_NOT_FIT else kv_total
    overhead = sum(s.overhead_bytes for s in placement) if verdict != DOES_NOT_FIT else activations + logits
    roofline = _roofline(model, placement, parallel_used) if verdict != DOES_NOT_FIT else 0.0
    warnings += rules.warnings(model, machine, quant)
    _offload_warnings(placement, verdict, roofline, offload_words, machine, warnings)
    for host in machine.hosts:
        if host.swap_used_bytes > 1 * GB and not machine.hypothetical:
            warnings.append(
                f"swap in use on {host.name}: {host.swap_used_bytes / GB:.1f} GB. Memory is already short; "
                f"a model that spills into swap runs 10-100x slower. Close other programs first."
            )
    return Plan(
        model=model, machine=machine, quant=quant, context=context, batch=batch, backend=backend,
        weights_bytes=weights_total, kv_cache_bytes=kv_placed, overhead_bytes=overhead,
        placement=tuple(placement), verdict=verdict, warnings=tuple(warnings),
        roofline_tokens_per_s=roofline, parallel=parallel_used, notes=tuple(notes), layer_bytes=breakdown.layer,
        largest_module_bytes=max(breakdown.layer, breakdown.embeddings, breakdown.head), kv_bits=kv_bits,
        layout=layout,
    )


def _layer_pieces(model: ModelSpec, breakdown: WeightsBreakdown, kv_per_layer: int, activations: int,
                  logits: int, offload_unquantized: bool, embeddings_copy_in_head: bool = False):
    def sizes(quantized: int, unquantized: int) -> dict[str, int]:
        off = unquantized if offload_unquantized else quantized
        return {"gpu": quantized, "unified": quantized, "cpu": off, "disk": off}

    pieces = [("embeddings", sizes(breakdown.embeddings, breakdown.embeddings), 0, 0, -1)]
    for layer in range(model.num_layers):
        pieces.append(("layer", sizes(breakdown.layer, breakdown.layer_unquantized), kv_per_layer, activations, layer))
    head = breakdown.head + (breakdown.embeddings if embeddings_copy_in_head else 0)
    pieces.append(("head", sizes(head, head), 0, logits, -1))
    return pieces


def _share(slot: _Slot) -> DeviceShare:
    layers = (min(slot.layers), max(slot.layers) + 1) if slot.layers else (0, 0)
    return DeviceShare(
        device=slot.device, kind=slot.kind, capacity_bytes=int(slot.capacity), weights_bytes=slot.weights,
        kv_cache_bytes=slot.kv, overhead_bytes=slot.extra + (slot.fixed if slot.holds_anything else 0),
        layers=layers, embeddings=slot.embeddings, head=slot.head, bandwidth_bytes_per_s=slot.bandwidth,
    )


def _ram_capacity(host: Host, hypothetical: bool) -> int:
    available = host.ram_bytes if hypothetical else host.ram_available_bytes
    return int(available * (1 - RAM_RESERVE))


def _spread(slots: list[_Slot], pieces, balance: bool = True) -> list[_Slot] | None:
    """Fill accelerators to the same fraction, the smallest that holds everything on them
    (accelerate's balanced map); None if they cannot hold it all even when full."""
    accelerators = [s for s in slots if s.kind in ("gpu", "unified")]
    if not balance or len(accelerators) < 2 or _fill(accelerators, pieces) is None:
        return None
    low, high = 0.0, 1.0
    for _ in range(14):   # to 1/16384 of each device's memory
        middle = (low + high) / 2
        if _fill(accelerators, pieces, middle) is None:
            low = middle
        else:
            high = middle
    return _fill(accelerators, pieces, high)


def _place_on_gpus(model, machine, breakdown, kv_per_layer, activations, logits, offload_unquantized, warnings,
                   balance, backend):
    """One host's GPUs filled evenly, then its RAM, then its disk (accelerate's auto device map)."""
    host = next((h for h in machine.hosts if any(d.kind == "cuda" for d in h.devices)), machine.hosts[0])
    if len([h for h in machine.hosts if any(d.kind == "cuda" for d in h.devices)]) > 1:
        warnings.append(
            f"the {backend} backend runs on one host: only {host.name}'s GPUs are planned "
            f"(it does not span computers)"
        )
    gpus = [d for d in host.devices if d.kind == "cuda"]
    slots = []
    for gpu in gpus:
        memory = gpu.total_bytes if machine.hypothetical else gpu.free_bytes
        slots.append(_Slot(gpu.name, "gpu", int(memory * (1 - GPU_RESERVE)), CUDA_CONTEXT_BYTES, gpu.bandwidth_bytes_per_s))
    cpu_bandwidth = PCIE_BANDWIDTH if gpus else (host.cpu_bandwidth_bytes_per_s or PCIE_BANDWIDTH)
    slots.append(_Slot("cpu", "cpu", _ram_capacity(host, machine.hypothetical), 0, cpu_bandwidth))
    slots.append(_Slot("disk", "disk", int(host.disk_free_bytes * 0.9), 0, DISK_BANDWIDTH))
    pieces = _layer_pieces(model, breakdown, kv_per_layer, activations, logits,
                           offload_unquantized=offload_unquantized and bool(gpus))
    filled = _spread(slots, pieces, balance) or _fill(slots, pieces)
    if filled is None:
        return [], DOES_NOT_FIT, "single"
    shares = [_share(slot) for slot in filled if slot.holds_anything]
    on_gpu_only = all(s.kind == "gpu" for s in shares)
    on_ram_only = not gpus and all(s.kind == "cpu" for s in shares)
    verdict = FITS if on_gpu_only or on_ram_only else OFFLOAD
    parallel = "layers" if len([s for s in shares if s.kind == "gpu"]) > 1 else "single"
    return shares, verdict, parallel


def _place_on_hosts(model, machine, breakdown, kv_per_layer, activations, logits, parallel, warnings, notes, balance):
    """Each host's unified memory (its GPU working set; RAM on Linux): layer ranges per host or
    equal shares of every layer (tensor), no offload beyond a raised wired limit."""
    hosts = list(machine.hosts)
    slots = []
    for host in hosts:
        prefix = f"{host.name}:" if len(hosts) > 1 else ""
        if host.unified_memory:
            device = host.devices[0] if host.devices else None
            limit = host.wired_limit_bytes or (device.total_bytes if device else host.ram_bytes)
            bandwidth = device.bandwidth_bytes_per_s if device else host.cpu_bandwidth_bytes_per_s
            capacity = int(limit * MAC_WORKING_SET_SAFE)
            if not machine.hypothetical:
                capacity = min(capacity, int(host.ram_available_bytes * (1 - RAM_RESERVE)))
            slots.append(_Slot(prefix + "metal", "unified", capacity, 0, bandwidth))
        else:   # Linux: mlx[cpu] runs from RAM
            slots.append(_Slot(prefix + "cpu", "cpu", _ram_capacity(host, machine.hypothetical), 0,
                               host.cpu_bandwidth_bytes_per_s or PCIE_BANDWIDTH))
    host_count = len(hosts)
    tensor_ok = host_count > 1 and model.num_heads % host_count == 0 and model.num_kv_heads % host_count == 0
    if host_count > 1:
        if tensor_ok:
            notes.append(f"tensor parallel over {host_count} hosts works: {model.num_heads} heads and "
                         f"{model.num_kv_heads} KV heads divide by {host_count}")
        else:
            notes.append(f"tensor parallel over {host_count} hosts does not work: {model.num_heads} heads / "
                         f"{model.num_kv_heads} KV heads do not divide by {host_count}; pipeline (layers per host) does")
    mode = parallel or "pipeline"
    if mode not in ("pipeline", "tensor"):
        raise UserInputError(f"parallel must be 'pipeline' or 'tensor', not '{parallel}'")
    if mode == "tensor" and host_count > 1:
        if not tensor_ok:
            raise UserInputError(notes[-1])
        return _place_tensor(model, slots, breakdown, kv_per_layer, activations, logits)
    # a tied lm_head needs the embedding on the last host too (pipeline: embeddings on the first)
    pieces = _layer_pieces(model, breakdown, kv_per_layer, activations, logits, offload_unquantized=False,
                           embeddings_copy_in_head=model.tie_embeddings and host_count > 1)
    filled = _spread(slots, pieces, balance) or _fill(slots, pieces)
    if filled is None:
        # does it fit in RAM beyond the GPU working set? Then raising the wired limit would do.
        bigger = [_Slot(s.device, s.kind, _ram_capacity(h, machine.hypothetical) - MACOS_RESERVE if s.kind == "unified"
                        else s.capacity, s.fixed, s.bandwidth) for s, h in zip(slots, hosts)]
        filled = _spread(bigger, pieces, balance) or _fill(bigger, pieces)
        if filled is None or not all(h.unified_memory for h in hosts):
            return [], DOES_NOT_FIT, "pipeline" if host_count > 1 else "single"
        shares = [_share(slot) for slot in filled if slot.holds_anything]
        return shares, OFFLOAD, "pipeline" if host_count > 1 else "single"
    shares = [_share(slot) for slot in filled if slot.holds_anything]
    return shares, FITS, "pipeline" if len(shares) > 1 else "single"


def _place_tensor(model, slots, breakdown, kv_per_layer, activations, logits):
    """Each host holds 1/n of every layer (heads split), and a full copy of embeddings and head."""
    n = len(slots)
    shares = []
    fits = True
    for slot in slots:
        weights = breakdown.embeddings + breakdown.head + math.ceil(breakdown.layer * model.num_layers / n)
        kv = kv_per_layer * model.num_layers // n
        overhead = activations // n + logits
        fits = fits and weights + kv + overhead <= slot.capacity
        shares.append(DeviceShare(slot.device, slot.kind, slot.capacity, weights, kv, overhead,
                                  (0, model.num_layers), True, True, slot.bandwidth))
    return (shares if fits else []), (FITS if fits else DOES_NOT_FIT), "tensor"


def _roofline(model: ModelSpec, placement, parallel: str) -> float:
    """Decode tokens/s at batch 1: each device reads its weights and KV cache once per token.

    Devices that run one after another add their times; tensor-parallel hosts work at once.
    For a mixture of experts only the routed experts' weights are read.
    """
    active = model.active_parameter_count() / model.parameter_count()
    times = []
    for share in placement:
        if share.bandwidth_bytes_per_s <= 0:
            return 0.0
        bytes_read = share.weights_bytes * active + share.kv_cache_bytes
        times.append(bytes_read / share.bandwidth_bytes_per_s)
    if not times:
        return 0.0
    seconds = max(times) if parallel == "tensor" else sum(times)
    return 1 / seconds if seconds > 0 else 0.0


def _offload_warnings(placement, verdict, roofline, offload_unquantized: str, machine, warnings) -> None:
    if verdict != OFFLOAD:
        return
    cpu = [s for s in placement if s.kind == "cpu"]
    disk = [s for s in placement if s.kind == "disk"]
    unified = [s for s in placement if s.kind == "unified"]
    speed = f"~{roofline:.2f} tok/s at best" if roofline < 1 else f"~{roofline:.1f} tok/s at best"
    if cpu and machine.gpus:
        hbm = max(g.bandwidth_bytes_per_s for g in machine.gpus) / 1e12
        layers = sum(s.num_layers for s in cpu)
        warnings.append(
            f"OFFLOAD: {counted(layers, 'layer')} ({sum(s.weights_bytes for s in cpu) / GB:.1f} GB) would sit in CPU RAM and "
            f"cross PCIe (~{PCIE_BANDWIDTH / GB:.0f} GB/s, vs {hbm:.1f} TB/s GPU memory) for every token: {speed}. "
            f"runner refuses this unless you pass --allow-offload"
        )
        if offload_unquantized:
            warnings.append(offload_unquantized)
    if disk:
        warnings.append(
            f"OFFLOAD TO DISK: {sum(s.weights_bytes for s in disk) / GB:.1f} GB read from disk "
            f"(~{DISK_BANDWIDTH / GB:.0f} GB/s) for every token: {speed}; practically unusable"
        )
    if unified:
        for share, host in zip(unified, machine.hosts):
            limit = host.wired_limit_bytes
            need = share.total_bytes
            mb = math.ceil(need * 1.1 / 1024**2 / 1024) * 1024
            warnings.append(
                f"{share.device}: needs {need / GB:.1f} GB of unified memory, above the GPU working set "
                f"({limit / GB:.1f} GB x {MAC_WORKING_SET_SAFE}); as is it swaps and runs 40-150x slower. "
                f"Raise the limit with `sudo sysctl iogpu.wired_limit_mb={mb}` (until reboot). Risk: wiring "
                f"too much leaves macOS no memory and freezes the machine"
            )


# ---- what to use -------------------------------------------------------------------------------

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class Recommendation:
    backend: str
    quant: str
    context: int           # the context the recommendation was judged at
    max_context: int       # the longest context that still fits with this backend and quant
    reason: str
    plan: Plan


def max_context_that_fits(model: ModelSpec, machine: Machine, quant: str, backend: str, batch: int = 1,
                          allowed: tuple[str, ...] = (FITS,), kv_bits: int | None = None) -> int:
    """The longest context (up to the model's) whose plan's verdict is in `allowed`; 0 if none."""
    def ok(context: int) -> bool:
        return make_plan(model, machine, quant, context, batch, backend, balance=False, kv_bits=kv_bits).verdict in allowed

    if not ok(1):
        return 0
    if ok(model.max_context):
        return model.max_context
    low, high = 1, model.max_context
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if ok(middle) else (low, middle)
    return low


def candidate_schemes(model: ModelSpec, machine: Machine) -> list[tuple[str, str, str]]:
    """(backend, quant, why) in order of preference for this machine: every installed backend's
    candidates (its rules'), ranked together."""
    ranked = [(candidate.rank, order, name, candidate.quant, candidate.why)
              for order, (name, rules) in enumerate(_rules_for_model(model))
              for candidate in rules.candidates(model, machine)]
    return [(name, quant, why) for _, _, name, quant, why in sorted(ranked)]


def _rules_for_model(model: ModelSpec | None) -> list:
    """(name, rules) of the installed backends that load `model`'s format, in registry order."""
    return [(name, rules) for name, rules in installed_rules().items()
            if model is None or rules.loads_gguf or model.source != GGUF]


def recommend(model: ModelSpec, machine: Machine, context: int | None = None, kv_bits: int | None = None) -> Recommendation:
    """The backend, quant and context that fit this machine best, and why.

    The first scheme (in the order of `candidate_schemes`) that fits without offload at the asked
    context (default: 4096 or the model's maximum) wins; if none does, the smallest with offload.
    """
    asked = context or min(DEFAULT_CONTEXT, model.max_context)
    candidates = candidate_schemes(model, machine)
    for backend, quant, why in candidates:
        plan = make_plan(model, machine, quant, asked, 1, backend, kv_bits=kv_bits)
        if plan.verdict == FITS:
            longest = max_context_that_fits(model, machine, quant, backend, kv_bits=kv_bits)
            reason = f"{why}; fits with {counted(asked, 'token', ',')} of context (up to {longest:,})"
            return Recommendation(backend, quant, asked, longest, reason, plan)
    # nothing fits in fast memory: the first backend's smallest scheme, with offload if that is possible at all
    backend = candidates[0][0] if candidates else preferred_backend(machine)
    rules = rules_for(backend)
    smallest = rules.smallest
    plan = make_plan(model, machine, smallest, asked, 1, backend, kv_bits=kv_bits)
    if plan.verdict == OFFLOAD:
        longest = max_context_that_fits(model, machine, smallest, backend, allowed=(FITS, OFFLOAD), kv_bits=kv_bits)
        reason = (f"nothing fits in {'GPU' if machine.gpus else 'fast'} memory; {smallest} is the smallest and "
                  f"needs offload: ~{plan.roofline_tokens_per_s:.2f} tok/s at best")
        return Recommendation(backend, smallest, asked, longest, reason, plan)
    return Recommendation(backend, smallest, asked, 0,
                          f"{model.name} does not fit this machine, not even as {smallest}"
                          + (" with offload" if rules.layout(machine) == GPUS else ""), plan)


# the article's three set-ups (shipped as machine files in runner/machines/ too)
ARTICLE_SETUPS = {
    "4x A100 80GB": "4xA100-80GB",
    "8x RTX 4090 24GB": "8xRTX4090",
    "2x Mac Studio M2 Ultra 192GB": "2xM2Ultra-192GB",
}


def article_setups(model: ModelSpec, context: int | None = None) -> list[tuple[str, Recommendation]]:
    """Which of the article's set-ups would run this model, and how."""
    from runner.hardware import parse_machine

    return [(label, recommend(model, parse_machine(spec), context)) for label, spec in ARTICLE_SETUPS.items()]


def schemes_for(machine: Machine, backend: str | None = None, model: ModelSpec | None = None) -> list[tuple[str, str]]:
    """(backend, quant) rows worth showing for this machine (and `model`: a GGUF file has one);
    with `backend`, all of its schemes."""
    if backend is not None:
        rules = rules_for(backend)
        if model is not None and model.source == GGUF and not rules.loads_gguf:
            return []
        from runner.backend import backend_quants

        return [(backend, quant) for quant in dict.fromkeys([*rules.descriptions, *backend_quants(backend)])]
    ranked = [(rank, order, name, quant) for order, (name, rules) in enumerate(_rules_for_model(model))
              for rank, quant in rules.shown(model, machine)]
    return [(name, quant) for _, _, name, quant in sorted(ranked)]


def scheme_note(model: ModelSpec, machine: Machine, plan: Plan) -> str:
    """One line about how `plan`'s scheme is counted on this machine ("" for none)."""
    note = rules_for(plan.backend).scheme_note(model, machine, plan.quant)
    if not note and plan.verdict == OFFLOAD and plan.weights_bytes > weights_bytes(model, plan.quant, plan.backend):
        note = (f"{plan.quant}: {weights_bytes(model, plan.quant, plan.backend) / GB:,.1f} GB as a scheme; "
                f"offloaded layers stay in bf16")
    return note


# ---- the network between hosts (runner launch's splits) ------------------------------------------

@dataclass(frozen=True)
class Link:
    """The network between hosts as the ring backend uses it (TCP): one message's latency and the bandwidth."""

    name: str
    latency_s: float                  # a small message from one host to the next
    bandwidth_bytes_per_s: float

    def message_seconds(self, size: float) -> float:
        return self.latency_s + size / self.bandwidth_bytes_per_s

    def describe(self) -> str:
        return f"{self.name}: {self.latency_s * 1e6:,.0f} µs per message, {self.bandwidth_bytes_per_s / GB:,.2f} GB/s"


# assumptions for TCP over each link (not RDMA); `runner launch --probe` measures a real one
LINKS = {
    "1gbe": Link("1 Gb Ethernet (assumed)", 100e-6, 0.117 * GB),
    "10gbe": Link("10 Gb Ethernet (assumed)", 50e-6, 1.1 * GB),
    "tb4": Link("Thunderbolt 4 bridge (assumed)", 50e-6, 2.5 * GB),
    "tb5": Link("Thunderbolt 5 bridge (assumed)", 40e-6, 5.0 * GB),
}


def parse_link(text: str) -> Link:
    """A link by name (LINKS) or measured: "LATENCY,BANDWIDTH", e.g. "85us,0.9GB/s" (us or ms; GB/s or MB/s)."""
    import re

    if text.lower() in LINKS:
        return LINKS[text.lower()]
    match = re.fullmatch(r"\s*([\d.]+)\s*(us|µs|ms)\s*,\s*([\d.]+)\s*(GB/s|MB/s)\s*", text, re.IGNORECASE)
    try:
        latency = float(match.group(1)) * (1e-3 if match.group(2).lower() == "ms" else 1e-6)
        bandwidth = float(match.group(3)) * (GB if match.group(4).upper() == "GB/S" else GB / 1000)
    except (AttributeError, ValueError):
        latency = bandwidth = 0.0
    if not (0 < latency < 10 and 0 < bandwidth < 1e15):
        raise UserInputError(f"--link '{text}': expected one of {', '.join(LINKS)}, or a measured latency and "
                             "bandwidth such as 85us,0.9GB/s (runner launch --probe prints it)")
    return Link(f"measured {text.strip()}", latency, bandwidth)


@dataclass(frozen=True)
class NetworkTime:
    """What one decoded token costs on the network under a split."""

    seconds_per_token: float
    messages_per_token: int           # messages in a row on the critical path
    bytes_per_message: int

    def tokens_per_s(self, compute_tokens_per_s: float) -> float:
        """Decode speed with the network time added to the compute time of a token."""
        if compute_tokens_per_s <= 0:
            return 0.0
        return 1 / (1 / compute_tokens_per_s + self.seconds_per_token)


def network_time(plan: Plan, link: Link) -> NetworkTime:
    """Per-token network time of a plan over several hosts (runner launch, decode at batch 1).

    Both splits agree after every token whether to stop: one all-reduce of one number. An all-reduce
    over the ring is 2(n-1) messages of 1/n of the array. Pipeline: the hidden state goes from host
    to host (n-1 messages), then every host gathers the last host's (n-1 more). Tensor (mlx-lm's
    sharding): two all-reduces of the hidden state per layer (attention and MLP outputs), so it is
    bound by the link's latency."""
    hosts = len(plan.placement)
    if plan.parallel not in ("pipeline", "tensor") or hosts < 2:
        return NetworkTime(0.0, 0, 0)
    hidden = plan.model.hidden_size * compute_bytes(plan.model, plan.quant, plan.backend) * plan.batch
    steps = 2 * (hosts - 1)

    def all_reduce(size: int) -> float:
        return steps * link.message_seconds(size / hosts)

    if plan.parallel == "tensor":
        reduces = 2 * plan.model.num_layers
        return NetworkTime(reduces * all_reduce(hidden) + all_reduce(4), (reduces + 1) * steps, hidden // hosts)
    return NetworkTime(2 * (hosts - 1) * link.message_seconds(hidden) + all_reduce(4), 2 * (hosts - 1) + steps, hidden)

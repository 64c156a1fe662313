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

from runner.errors import BackendUnavailable, UserInputError
from runner.hardware import GB, Host, Machine
from runner.model import Linear, ModelSpec

# quant name -> what it is; the CLI accepts these names
QUANTS = ("bf16", "fp16", "fp32", "fp8", "int8", "nf4", "nf4-nodq", "fp4", "q8", "q4")
GGUF = "gguf"   # a GGUF file's tensors as stored (llama.cpp): sized from the file, not by a rule

QUANT_DESCRIPTIONS = {
    "bf16": "bfloat16, 2 bytes per weight",
    "fp16": "float16, 2 bytes per weight",
    "fp32": "float32, 4 bytes per weight",
    "fp8": "FP8 e4m3 weights + fp32 scale per output row (torchao; embeddings and lm_head bf16)",
    "int8": "bitsandbytes LLM.int8: int8 weights + fp32 scale per row",
    "nf4": "bitsandbytes NF4, double quant: 4-bit + uint8 absmax per 64 (+ fp32 per 256 blocks)",
    "nf4-nodq": "bitsandbytes NF4 without double quant: 4-bit + fp32 absmax per 64",
    "fp4": "bitsandbytes FP4, double quant",
    "q8": "MLX affine 8-bit, group 64: scales + biases per group (embeddings and head too)",
    "q4": "MLX affine 4-bit, group 64: scales + biases per group (embeddings and head too)",
    "gguf": "a GGUF file as stored (llama.cpp): each tensor in the file's own type (Q4_1, Q4_K, Q8_0, F16 ...)",
}

BNB_4BIT = ("nf4", "nf4-nodq", "fp4")

FITS = "fits"
OFFLOAD = "offload"           # fits only with CPU or disk offload
DOES_NOT_FIT = "does-not-fit"

# ---- the constants of the arithmetic (each one is a fact of a library or a stated assumption) ----
BNB_BLOCK = 64                 # bitsandbytes 4-bit: one absmax per 64 weights
BNB_NESTED_BLOCK = 256         # double quant: absmax quantized to uint8 in blocks of 256
BNB_CODE_4BIT = 16 * 4         # the 16-entry NF4/FP4 code table (fp32), one per weight tensor
BNB_CODE_NESTED = 256 * 4      # the 256-entry dynamic code table of the nested state (fp32)
BNB_OFFSET = 4                 # the fp32 mean subtracted from absmax before nesting
FP8_ALIGN = 16                 # torchao FP8: Linears with a side not a multiple of 16 stay bf16 (_scaled_mm)
MLX_GROUP = 64                 # mlx-lm's default group size

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


def dtype_bytes(dtype: str) -> int:
    """Bytes of one element of a dtype name as config.json writes it."""
    name = dtype.lower().replace("torch.", "")
    return {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}.get(name, 2)


def compute_bytes(model: ModelSpec, quant: str, backend: str) -> int:
    """Bytes per element of what stays unquantized (embeddings, norms, biases, scales on MLX).

    CUDA: fp32 for the fp32 scheme, else 2 (bitsandbytes and FP8 keep the rest in bf16/fp16).
    MLX: the checkpoint's dtype (mlx-lm keeps it; scales and biases take it too).
    """
    if quant == "fp32":
        return 4
    if backend == "mlx" and quant in ("q4", "q8"):
        return dtype_bytes(model.dtype)
    return 2


# ---- weights ------------------------------------------------------------------------------------

def linear_bytes(linear: Linear, quant: str, unquantized_bytes: int = 2) -> int:
    """Bytes of one Linear layer as the library stores it under `quant`.

    `unquantized_bytes` is the element size of what stays in the compute dtype (the bias, MLX scales).
    """
    n = linear.weight_elements
    out_features, in_features = linear.out_features, linear.in_features
    bias = out_features * unquantized_bytes if linear.bias else 0
    if quant in ("bf16", "fp16"):
        return n * 2 + bias
    if quant == "fp32":
        return n * 4 + bias
    if quant == "fp8":   # torchao Float8Tensor, per-row: e4m3 weights + one fp32 scale per output row
        if out_features % FP8_ALIGN or in_features % FP8_ALIGN:
            return n * unquantized_bytes + bias
        return n + out_features * 4 + bias
    if quant == "int8":
        return n + out_features * 4 + bias           # int8 weights + SCB (fp32 per output row)
    if quant in BNB_4BIT:
        blocks = math.ceil(n / BNB_BLOCK)
        packed = math.ceil(n / 2)                     # two 4-bit weights per uint8
        if quant == "nf4-nodq":
            return packed + blocks * 4 + BNB_CODE_4BIT + bias
        nested = math.ceil(blocks / BNB_NESTED_BLOCK) * 4
        return packed + blocks + BNB_CODE_4BIT + BNB_OFFSET + nested + BNB_CODE_NESTED + bias
    if quant in ("q4", "q8"):
        if in_features % MLX_GROUP:                   # mlx-lm leaves such layers unquantized
            return n * unquantized_bytes + bias
        bits = 4 if quant == "q4" else 8
        packed = out_features * (in_features * bits // 32) * 4   # uint32 words
        scales_and_biases = 2 * out_features * (in_features // MLX_GROUP) * unquantized_bytes
        return packed + scales_and_biases + bias
    raise UserInputError(f"unknown quantization '{quant}' (known: {', '.join(QUANTS)})")


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


def weights_breakdown(model: ModelSpec, quant: str, backend: str = "cuda") -> WeightsBreakdown:
    if quant == GGUF:   # the bytes the file's tensor table says (runner.gguf)
        from runner.gguf import gguf_breakdown

        return gguf_breakdown(model)
    if quant not in QUANTS:
        raise UserInputError(f"unknown quantization '{quant}' (known: {', '.join(QUANTS)})")
    plain = compute_bytes(model, quant, backend)
    mlx_quant = quant in ("q4", "q8")
    norms = model.layer_norm_elements() * plain

    def layer_with(scheme: str) -> int:
        total = norms
        for linear in model.layer_linears():
            router = linear.name.endswith("block_sparse_moe.gate")
            expert = ".experts." in linear.name
            kept = scheme != "fp32" and not mlx_quant and (
                router                                              # the router is not an nn.Linear
                or (expert and scheme in BNB_4BIT + ("int8",))      # fused 3D experts: bnb skips them
            )
            total += linear_bytes(linear, "bf16" if kept else scheme, plain)
        return total

    embedding_linear = Linear("embed_tokens", model.vocab_size, model.hidden_size)
    if mlx_quant:   # mlx-lm quantizes the embedding (QuantizedEmbedding) and lm_head too
        embeddings = linear_bytes(embedding_linear, quant, plain)
        lm_head = 0 if model.tie_embeddings else linear_bytes(embedding_linear, quant, plain)
    else:           # transformers keeps embeddings and lm_head in the compute dtype
        embeddings = model.embedding_elements * plain
        lm_head = model.lm_head_elements * plain
    return WeightsBreakdown(
        embeddings=embeddings,
        layer=layer_with(quant),
        head=model.hidden_size * plain + lm_head,
        num_layers=model.num_layers,
        layer_unquantized=layer_with("fp32" if quant == "fp32" else "bf16"),
    )


def weights_bytes(model: ModelSpec, quant: str, backend: str | None = None) -> int:
    return weights_breakdown(model, quant, backend or default_backend_for(quant)).total


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


MLX_KV_STEP = 256                    # mlx-lm's KVCache grows in steps of this many tokens


def kv_cache_bytes(model: ModelSpec, context: int, batch: int = 1, quant: str = "bf16", backend: str = "cuda",
                   kv_bits: int | None = None) -> int:
    """K and V for `context` tokens; mlx-lm allocates its cache in whole steps of MLX_KV_STEP tokens."""
    check_kv_bits(model, kv_bits)
    tokens = -(-context // MLX_KV_STEP) * MLX_KV_STEP if backend == "mlx" else context
    return round(model.kv_bytes_per_token(kv_dtype_bytes(quant, kv_bits))) * tokens * batch


# ---- overhead -----------------------------------------------------------------------------------

def activation_bytes(model: ModelSpec, context: int, batch: int, quant: str) -> int:
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
    if quant in BNB_4BIT + ("int8", "fp8"):
        workspace += max(linear.weight_elements for linear in model.layer_linears()) * 2
    return workspace


LLAMACPP_BATCH = 512   # runner_llamacpp's n_batch and n_ubatch: tokens per llama_decode


def logits_bytes(model: ModelSpec, batch: int, backend: str = "cuda") -> int:
    """Logits of a prefill chunk: runner's CUDA session and mlx-lm both compute them for the last
    position only: the lm_head's output in the compute dtype and its fp32 copy. llama.cpp reserves
    float32 logits for every token of a ubatch in its compute buffer (measured: 98 MiB of the
    default model's 98.25 MiB, with flash attention, at any context)."""
    if backend == "llamacpp":
        return LLAMACPP_BATCH * model.vocab_size * 4
    return model.vocab_size * batch * (2 + 4)


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
    backend: str                  # "cuda" or "mlx"
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
        if self.backend != "cuda":
            raise ValueError("max_memory() is for the cuda backend (accelerate); this plan is for mlx")
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
        if self.backend != "cuda":
            raise ValueError("device_map() is for the cuda backend (accelerate); this plan is for mlx")
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
    """The backend whose schemes `candidate_schemes` offers on this machine."""
    return "mlx" if machine.is_apple else "cuda"


def backends_taking(quant: str, machine: Machine | None = None, allowed=None) -> list[str]:
    """The backends whose schemes (`allowed(name)`, default: all they load) include `quant`, the one
    the plan prefers on `machine` first; a backend that is not installed takes nothing."""
    from runner.backend import backend_names, backend_quants

    allowed = allowed or backend_quants
    first = [preferred_backend(machine)] if machine is not None else []
    takers = []
    for name in dict.fromkeys(first + backend_names()):
        try:
            if quant in allowed(name):
                takers.append(name)
        except BackendUnavailable:
            continue
    return takers


def default_backend_for(quant: str, machine: Machine | None = None) -> str:
    """The backend that loads `quant` here (the plan's preferred one where several do); where none
    does, the preferred backend, whose check then says so."""
    takers = backends_taking(quant, machine)
    return takers[0] if takers else (preferred_backend(machine) if machine is not None else "cuda")


def check_request(model: ModelSpec, quant: str, context: int, batch: int, backend: str) -> None:
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
    if model.source == "gguf" and quant != "gguf":
        raise UserInputError(f"{model.name} is a GGUF file: llama.cpp runs it as stored (--backend llamacpp "
                             f"--quant gguf); the {backend} backend loads safetensors folders")
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
    if backend == "cuda" and machine.is_apple:
        raise UserInputError(f"--quant {quant}: the cuda backend (bitsandbytes, accelerate) is for NVIDIA GPUs; "
                             "on Apple silicon runner uses mlx")
    breakdown = weights_breakdown(model, "bf16" if fp8_dequantized(quant, backend, machine) else quant, backend)
    kv_total = kv_cache_bytes(model, context, batch, quant, backend, kv_bits)
    kv_per_layer = kv_total // model.num_layers
    activations = activation_bytes(model, context, batch, quant)
    logits = logits_bytes(model, batch, backend)
    warnings: list[str] = []
    notes: list[str] = []

    if backend == "mlx" or (backend == "llamacpp" and machine.is_apple):   # llama.cpp: Metal, unified memory
        placement, verdict, parallel_used = _place_mlx(
            model, machine, breakdown, kv_per_layer, activations, logits, parallel, warnings, notes, balance
        )
    else:
        placement, verdict, parallel_used = _place_cuda(
            model, machine, quant, breakdown, kv_per_layer, activations, logits, warnings, balance
        )

    weights_total = sum(s.weights_bytes for s in placement) if verdict != DOES_NOT_FIT else breakdown.total
    kv_placed = sum(s.kv_cache_bytes for s in placement) if verdict != DOES_NOT_FIT else kv_total
    overhead = sum(s.overhead_bytes for s in placement) if verdict != DOES_NOT_FIT else activations + logits
    roofline = _roofline(model, placement, parallel_used) if verdict != DOES_NOT_FIT else 0.0
    _scheme_warnings(model, machine, quant, backend, warnings)
    _offload_warnings(placement, verdict, roofline, model, quant, machine, warnings)
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


def _place_cuda(model, machine, quant, breakdown, kv_per_layer, activations, logits, warnings, balance):
    host = next((h for h in machine.hosts if any(d.kind == "cuda" for d in h.devices)), machine.hosts[0])
    if len([h for h in machine.hosts if any(d.kind == "cuda" for d in h.devices)]) > 1:
        warnings.append(
            f"the cuda backend runs on one host: only {host.name}'s GPUs are planned "
            f"(accelerate does not span computers)"
        )
    gpus = [d for d in host.devices if d.kind == "cuda"]
    slots = []
    for gpu in gpus:
        memory = gpu.total_bytes if machine.hypothetical else gpu.free_bytes
        slots.append(_Slot(gpu.name, "gpu", int(memory * (1 - GPU_RESERVE)), CUDA_CONTEXT_BYTES, gpu.bandwidth_bytes_per_s))
    cpu_bandwidth = PCIE_BANDWIDTH if gpus else (host.cpu_bandwidth_bytes_per_s or PCIE_BANDWIDTH)
    slots.append(_Slot("cpu", "cpu", _ram_capacity(host, machine.hypothetical), 0, cpu_bandwidth))
    slots.append(_Slot("disk", "disk", int(host.disk_free_bytes * 0.9), 0, DISK_BANDWIDTH))
    # bitsandbytes leaves layers it offloads to CPU/disk unquantized (llm_int8_enable_fp32_cpu_offload)
    bnb = quant in BNB_4BIT + ("int8",)
    pieces = _layer_pieces(model, breakdown, kv_per_layer, activations, logits, offload_unquantized=bnb and bool(gpus))
    filled = _spread(slots, pieces, balance) or _fill(slots, pieces)
    if filled is None:
        return [], DOES_NOT_FIT, "single"
    shares = [_share(slot) for slot in filled if slot.holds_anything]
    on_gpu_only = all(s.kind == "gpu" for s in shares)
    on_ram_only = not gpus and all(s.kind == "cpu" for s in shares)
    verdict = FITS if on_gpu_only or on_ram_only else OFFLOAD
    parallel = "layers" if len([s for s in shares if s.kind == "gpu"]) > 1 else "single"
    return shares, verdict, parallel


def _place_mlx(model, machine, breakdown, kv_per_layer, activations, logits, parallel, warnings, notes, balance):
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


def fp8_dequantized(quant: str, backend: str, machine: Machine) -> bool:
    """transformers loads FP8 checkpoints dequantized to bf16 without a GPU of compute capability 8.9+."""
    if quant != "fp8" or backend != "cuda":
        return False
    gpus = machine.gpus
    return not gpus or any(g.compute_capability is not None and g.compute_capability < (8, 9) for g in gpus)


def _scheme_warnings(model: ModelSpec, machine: Machine, quant: str, backend: str, warnings: list[str]) -> None:
    gpus = machine.gpus
    if quant == "fp8" and backend == "cuda":
        if fp8_dequantized(quant, backend, machine):
            warnings.append("fp8 needs an NVIDIA GPU with compute capability 8.9+ (Ada, Hopper); without one "
                            "transformers dequantizes FP8 checkpoints to bf16 on load: counted here as bf16")
        warnings.append("fp8 on the cuda backend is torchao's (e4m3 weights and activations, per-row scales): "
                        "it needs torchao installed (pip install torchao)")
    if quant == "bf16" and backend == "cuda" and any(g.compute_capability and g.compute_capability < (8, 0) for g in gpus):
        warnings.append("these GPUs have no bfloat16 (compute capability below 8.0): use --quant fp16")
    if quant in ("q4", "fp4", "nf4", "nf4-nodq") and model.parameter_count() < 1_000_000_000:
        warnings.append(f"{model.name} is small ({model.parameter_count() / 1e6:.0f}M parameters): small models "
                        "do not survive 4-bit (SmolLM2-135M at MLX 4-bit answered garbage here; 8-bit and bf16 "
                        "answered right)")
    if backend == "mlx" and quant in ("q4", "q8") and not machine.is_apple:
        warnings.append("mlx on a Linux CPU runs quantized matmuls slowly (SmolLM2-135M: 8-bit 1.2 tok/s vs "
                        "bf16 8.7 tok/s measured here); use the cuda backend (torch, also on CPU) instead")
    if quant in BNB_4BIT + ("int8",) and backend == "cuda" and model.num_experts > 1:
        warnings.append(f"transformers 5 stores {model.name}'s experts as fused 3D tensors that bitsandbytes does "
                        f"not quantize: they stay in bf16 and {quant} shrinks only attention (counted so here)")
    if quant in BNB_4BIT + ("int8",) and backend == "cuda" and not gpus:
        warnings.append("bitsandbytes on a CPU works but is slow; with no GPU prefer bf16/fp32 if it fits")


def _offload_warnings(placement, verdict, roofline, model, quant, machine, warnings) -> None:
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
            f"OFFLOAD: {layers} layers ({sum(s.weights_bytes for s in cpu) / GB:.1f} GB) would sit in CPU RAM and "
            f"cross PCIe (~{PCIE_BANDWIDTH / GB:.0f} GB/s, vs {hbm:.1f} TB/s GPU memory) for every token: {speed}. "
            f"runner refuses this unless you pass --allow-offload"
        )
        if quant in BNB_4BIT + ("int8",):
            warnings.append("bitsandbytes does not quantize offloaded layers: they stay in bf16 in RAM "
                            "(transformers needs llm_int8_enable_fp32_cpu_offload=True)")
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
SMALL_MODEL_PARAMETERS = 1_000_000_000   # below this, 4-bit ruins answers (measured on SmolLM2-135M)


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
    """(backend, quant, why) in order of preference for this machine."""
    if model.source == "gguf":
        return [("llamacpp", "gguf", "a GGUF file: llama.cpp runs it as stored")]
    small = model.parameter_count() < SMALL_MODEL_PARAMETERS
    if machine.is_apple:
        options = [("mlx", "bf16", "bf16 on MLX: full quality, Metal reads the weights as they are"),
                   ("mlx", "q8", "MLX 8-bit: half the bytes of bf16, near-identical answers")]
        if not small:
            options.append(("mlx", "q4", "MLX 4-bit (group 64): a quarter of bf16; large models keep their quality"))
        return options
    gpus = machine.gpus
    if gpus:
        half = "fp16" if any(g.compute_capability and g.compute_capability < (8, 0) for g in gpus) else "bf16"
        options = [("cuda", half, f"{half} on the GPU: full quality and the fastest path in transformers"),
                   ("cuda", "nf4", "NF4 with double quant (bitsandbytes): a quarter of bf16 with small loss")]
        if small:
            options.append(("cuda", "int8", "LLM.int8: half of bf16 (small models do not survive 4-bit)"))
        return options
    # CPU only (Linux): torch runs on CPU too, and fast; mlx's CPU quantized matmul is slow here.
    # llama.cpp decodes the default model ~5x faster, but its 8-bit activations change the 135M
    # model's answers (README's first question: "L'Étoile…" instead of Paris), so it comes after
    # the torch schemes that keep them.
    llamacpp = [("llamacpp", "gguf", LLAMACPP_DEFAULT_WHY)] if default_model_on_llamacpp(model) else []
    return [
        ("cuda", "fp32", "no GPU: torch on CPU in fp32 is the fast CPU path that keeps the model's answers "
                         "(SmolLM2-135M: ~16 tok/s measured here; mlx on CPU: bf16 8.7, 8-bit 1.2 tok/s; "
                         "llama.cpp's GGUF ~5x faster but with changed answers: --backend llamacpp)"),
        ("cuda", "bf16", "no GPU: torch on CPU in bf16 halves the memory of fp32"),
        *llamacpp,
        ("cuda", "nf4", "no GPU and bf16 does not fit: bitsandbytes NF4 runs on CPU, slowly"),
    ]


# measured by bench/llamacpp_cpu.py on the 2-core VM (bench/RESULTS.md)
LLAMACPP_DEFAULT_WHY = ("no GPU and torch's fp32/bf16 do not fit: llama.cpp runs the default model's own GGUF "
                        "(Q4_1) as stored, ~5x the tokens/s of torch fp32 on this CPU (bench/llamacpp_cpu.py)")


def default_model_on_llamacpp(model: ModelSpec) -> bool:
    """The default model, the llamacpp backend installed and its GGUF file present: llama.cpp
    runs it on a CPU far faster than torch does."""
    from runner.model import DEFAULT_MODEL_ID

    if model.name.lower() != DEFAULT_MODEL_ID.lower():
        return False
    from runner.backend import get_backend
    from runner.gguf import default_model_gguf

    return get_backend("llamacpp", check=False).availability().ok and default_model_gguf() is not None


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
            reason = f"{why}; fits with {asked:,} tokens of context (up to {longest:,})"
            return Recommendation(backend, quant, asked, longest, reason, plan)
    # nothing fits in fast memory: the smallest scheme, with offload if that is possible at all
    smallest = "q4" if machine.is_apple else "nf4"
    backend = "mlx" if machine.is_apple else "cuda"
    if model.source == "gguf":
        smallest, backend = "gguf", "llamacpp"
    plan = make_plan(model, machine, smallest, asked, 1, backend, kv_bits=kv_bits)
    if plan.verdict == OFFLOAD:
        longest = max_context_that_fits(model, machine, smallest, backend, allowed=(FITS, OFFLOAD), kv_bits=kv_bits)
        reason = (f"nothing fits in {'GPU' if machine.gpus else 'fast'} memory; {smallest} is the smallest and "
                  f"needs offload: ~{plan.roofline_tokens_per_s:.2f} tok/s at best")
        return Recommendation(backend, smallest, asked, longest, reason, plan)
    return Recommendation(backend, smallest, asked, 0,
                          f"{model.name} does not fit this machine, not even as {smallest}"
                          + ("" if backend == "mlx" else " with offload"), plan)


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
    with `backend`, all of its schemes the plan counts."""
    if model is not None and model.source == "gguf":
        return [("llamacpp", "gguf")]
    if backend is not None:
        from runner.backend import backend_quants

        return [(backend, quant) for quant in (*QUANTS, GGUF) if quant in backend_quants(backend)]
    if machine.is_apple:
        return [("mlx", "bf16"), ("mlx", "q8"), ("mlx", "q4")]
    rows = [("cuda", "bf16"), ("cuda", "fp8"), ("cuda", "int8"), ("cuda", "nf4"), ("cuda", "nf4-nodq"), ("cuda", "fp4")]
    if not machine.gpus:
        rows = [("cuda", "fp32")] + rows + [("mlx", "q8"), ("mlx", "q4")]
        if model is not None and default_model_on_llamacpp(model):
            rows.insert(0, ("llamacpp", "gguf"))
    return rows


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

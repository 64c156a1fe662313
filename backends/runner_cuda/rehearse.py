"""Rehearse a load: the model's real architecture with random weights, on the plan's devices.

`rehearse(plan)` answers "will it really run here, and how fast?" before any download:

1. build the architecture from config.json on the meta device (no memory), and for NF4/int8 swap
   its Linear layers for bitsandbytes' through transformers' own quantizer, as `from_pretrained`
   does;
2. place it with the plan's device map, resolved by transformers' own `_get_device_map` (so a
   string map with `max_memory` is resolved exactly as a real load would);
3. materialize the weights block by block (embeddings, each decoder layer, the head): each Linear
   gets a random bf16 matrix on its target device, which transformers' own quantize operation
   (`Bnb4bitQuantize`: `Params4bit(...).to(device)`, double quant) turns into 4-bit there; the bf16
   copy is freed before the next. There is never a full-precision copy of the model nor a file;
4. prefill `context - decode_tokens` random tokens (in chunks of budget.PREFILL_CHUNK) and decode
   `decode_tokens` more, one at a time, so the KV cache ends holding exactly `context` tokens, through
   the decode path a session on these devices uses: on the GPUs the fast path (`runner_cuda.fast`:
   static KV cache, CUDA graphs, runner's NF4 kernels; one graph segment per GPU where the layers are
   split), its compile and graph capture timed apart; elsewhere (the CPU, `fast_decode=False`) the
   CUDA session's own `forward_in_chunks`;
5. measure: on CUDA the allocator (`torch.cuda.memory_allocated` / `max_memory_allocated` per
   device), on CPU (which has no allocator statistics) the bytes of the live tensors, quantization
   state included.

torch, transformers and bitsandbytes are imported inside the functions.
"""

from __future__ import annotations

import gc
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from runner.backend import LoadProgress
from runner.errors import BackendUnavailable, LoadError, UserInputError
from runner.rehearsal import (BlockMemory, DeviceMemory, RehearsalResult, architecture_config, check_lengths,
                              plan_fields)
from runner_cuda import compat

if TYPE_CHECKING:
    import torch

    from runner.budget import Plan

INIT_STD = 0.02          # random weights ~ N(0, 0.02), Llama's initializer_range: activations stay sane
SEED = 0
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class RehearsalOutOfMemory(LoadError):
    """A device ran out of memory during a rehearsal; the message says where and how far it got."""


@dataclass(frozen=True)
class CudaRehearsalResult(RehearsalResult):
    """A CUDA rehearsal: which decode path ran (the one a session on these devices uses)."""

    decode_path: str = "transformers"      # "fast" (runner_cuda.fast) or "transformers" (forward_in_chunks)
    decode_path_reason: str = ""          # in words: why this path
    warm_up_seconds: float = 0.0          # the fast path's compile and first graph capture (a session does it at load)

    @property
    def notes(self) -> tuple[str, ...]:
        if self.decode_path == "fast":
            return (f"decode through runner's fast path ({self.decode_path_reason}), as generate and the chat decode "
                    f"here; its compile and first graph capture took {self.warm_up_seconds:.1f} s (at load in a session)",)
        return (f"decode through transformers' loop: {self.decode_path_reason}",)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "decode_path": self.decode_path, "decode_path_reason": self.decode_path_reason,
                "warm_up_seconds": self.warm_up_seconds}


# ---- building the model on the meta device --------------------------------------------------


def model_config(spec) -> dict:
    """The architecture's config.json dict (runner.rehearsal.architecture_config) for transformers."""
    config = architecture_config(spec)
    # A rehearsal measures the planned dtype, not the checkpoint's float32 if any.
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    config.pop("quantization_config", None)
    return config


def build_meta_model(spec, scheme, attention: str):
    """The architecture on the meta device, with bitsandbytes Linears for a quantized scheme.

    `scheme` is the CUDA backend's own (`loading.scheme_for`): the same dtype and the same
    BitsAndBytesConfig a real load uses. Returns (model, hf_quantizer or None); nothing is allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**model_config(spec))
    quantizer = None
    if scheme.quantization_config is not None:
        from transformers.quantizers.auto import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(scheme.quantization_config, pre_quantized=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=scheme.dtype, attn_implementation=attention)
        if quantizer is not None:
            quantizer.preprocess_model(model=model, dtype=scheme.dtype, device_map=None, checkpoint_files=None,
                                       use_kernels=False)
    model.eval()
    return model, quantizer


# ---- placement ------------------------------------------------------------------------------


def forced_device_map(spec, gpus: int) -> dict[str, int | str]:
    """For `--force` when the plan has no placement that fits: every layer on the GPUs anyway
    (contiguous, even shares; embeddings on the first, head on the last), or all on the CPU."""
    if gpus == 0:
        return {"": "cpu"}
    mapping: dict[str, int | str] = {"model.embed_tokens": 0, "model.rotary_emb": 0}
    for layer in range(spec.num_layers):
        mapping[f"model.layers.{layer}"] = layer * gpus // spec.num_layers
    mapping["model.norm"] = gpus - 1
    mapping["lm_head"] = 0 if spec.tie_embeddings else gpus - 1
    return mapping


def resolve_device_map(model, plan: "Plan", quantizer) -> dict[str, int | str]:
    """The plan's device map and max_memory, as the CUDA backend passes them to `from_pretrained`,
    resolved by transformers' own `_get_device_map`. A plan that does not fit (only with `--force`)
    has no placement: then `forced_device_map`."""
    import torch
    from transformers.integrations.accelerate import _get_device_map

    from runner.budget import FITS

    if plan.verdict == FITS:
        device_map, max_memory = plan.device_map(), plan.max_memory()
    else:
        device_map, max_memory = forced_device_map(plan.model, torch.cuda.device_count()), None
    device_map = _get_device_map(model, device_map, max_memory, quantizer)
    if quantizer is not None:
        quantizer.validate_environment(device_map=device_map)   # refuses NF4 on CPU+GPU, as a load does
    if "disk" in device_map.values():
        raise UserInputError("the plan offloads to disk; a rehearsal has no checkpoint to offload from "
                             "(choose a smaller quant or context)")
    return device_map


def torch_device(value: int | str) -> str:
    return f"cuda:{value}" if isinstance(value, int) else str(value)


def device_of(name: str, device_map: dict[str, int | str]) -> str:
    """The device of parameter `name`: its longest module prefix in the device map."""
    candidate = name
    while True:
        if candidate in device_map:
            return torch_device(device_map[candidate])
        if not candidate:
            raise LoadError(f"the device map places no module that holds '{name}'")
        candidate = candidate.rpartition(".")[0]


def check_devices_exist(device_map: dict[str, int | str]) -> None:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for value in set(device_map.values()):
        if isinstance(value, int) and value >= gpus:
            raise UserInputError(
                f"the plan places weights on cuda:{value} but this machine has {gpus} CUDA GPU(s); "
                "plan for this machine (drop --machine)"
            )


# ---- materializing --------------------------------------------------------------------------


def block_of(name: str) -> str:
    """Which block a parameter belongs to: "embeddings", "layer N" or "head"."""
    match = _LAYER.search("." + name)
    if match:
        return f"layer {match.group(1)}"
    if "embed" in name:
        return "embeddings"
    return "head"


def materialize_parameter(model, name: str, device: str, dtype, quantizer, generator) -> None:
    """Give parameter `name` random values (in `dtype`, as a checkpoint holds them) on `device`,
    quantized there as transformers would."""
    import torch

    module_path, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_path)
    meta = getattr(module, attribute)
    if "norm" in type(module).__name__.lower():
        value = torch.ones(meta.shape, dtype=dtype, device=device)
    else:
        value = torch.empty(meta.shape, dtype=dtype, device=device)
        value.normal_(0.0, INIT_STD, generator=generator.on(device))
    if quantizer is not None and quantizer.param_needs_quantization(model, name):
        # transformers' own operation: Params4bit(value, **meta.__dict__).to(device) (or Int8Params)
        quantized = quantizer.get_quantize_ops().convert({name: [value]}, model=model, full_layer_name=name)
        new = quantized[name]
    else:
        new = torch.nn.Parameter(value, requires_grad=False)
    del value
    compat.mark_initialized(new)
    setattr(module, attribute, new)


def materialize_buffers(model, device_map) -> None:
    """Rotary embeddings hold the only buffers: rebuild them on their device from the config."""
    import torch

    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if "RotaryEmbedding" not in type(module).__name__:
                raise LoadError(f"cannot materialize the buffers of {name} ({type(module).__name__})")
            with torch.device(device_of(name + ".inv_freq", device_map)):
                model.set_submodule(name, type(module)(config=module.config))


class Generators:
    """One seeded random generator per device, so that rehearsals are repeatable."""

    def __init__(self) -> None:
        self.by_device: dict = {}

    def on(self, device: str):
        import torch

        if device not in self.by_device:
            self.by_device[device] = torch.Generator(device=device).manual_seed(SEED)
        return self.by_device[device]


def finish_model(model, quantizer, device_map) -> None:
    """What from_pretrained does after the weights: tie them, add accelerate's hooks where the model
    spans several devices (its `accelerate_dispatch` is this call when nothing is offloaded), and
    let the quantizer finish."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    if len(set(device_map.values())) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=device_map, skip_keys=compat.device_placement_skip_keys(model))
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)


def random_model(spec, quant: str, device: str = "cuda:0"):
    """`spec`'s architecture with random weights on one device, quantized as a load quantizes them:
    the rehearsal's model without its measuring (for benchmarks: no checkpoint to write or read)."""
    import torch

    from runner_cuda.loading import attention_for, gpu_capabilities, scheme_for

    gpus = gpu_capabilities() if torch.cuda.is_available() else []
    scheme = scheme_for(quant, gpus, allow_offload=False)
    model, quantizer = build_meta_model(spec, scheme, attention_for(scheme.dtype, gpus))
    device_map = {"": device}
    generators = Generators()
    materialize_buffers(model, device_map)
    with torch.no_grad():
        for name, _ in list(model.named_parameters()):
            materialize_parameter(model, name, device, scheme.dtype, quantizer, generators)
    finish_model(model, quantizer, device_map)
    return model


# ---- measuring ------------------------------------------------------------------------------


def _param_tensors(param):
    """The tensors a parameter owns: its data and bitsandbytes' quantization state."""
    yield param
    state = getattr(param, "quant_state", None)
    if state is not None:
        for tensor in (state.absmax, state.code):
            if tensor is not None:
                yield tensor
        nested = getattr(state, "state2", None)
        if nested is not None:
            for tensor in (nested.absmax, nested.code):
                if tensor is not None:
                    yield tensor
    scb = getattr(param, "SCB", None)
    if scb is not None:
        yield scb


def tensor_bytes(tensors) -> dict[str, int]:
    """Bytes of the distinct storages of `tensors`, per device (tied weights counted once)."""
    seen = set()
    per_device: dict[str, int] = {}
    for tensor in tensors:
        if tensor is None or tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        per_device[str(tensor.device)] = per_device.get(str(tensor.device), 0) + storage.nbytes()
    return per_device


def model_tensors(model):
    for param in model.parameters():
        yield from _param_tensors(param)
    yield from model.buffers()


def cache_tensors(cache):
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                yield tensor


def allocated(device: str) -> int:
    import torch

    return torch.cuda.memory_allocated(device) if device.startswith("cuda") else 0


def synchronize(devices) -> None:
    import torch

    for device in devices:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)


class Meter:
    """Bytes per device for the rehearsal. On CUDA the allocator's, above what it held when the meter
    started (peaks reset then); on the CPU, which has no allocator statistics, those of the live
    tensors, quantization state included."""

    def __init__(self, devices: list[str]) -> None:
        import torch

        self.devices = devices
        self.on_cuda = any(d.startswith("cuda") for d in devices)
        for device in devices:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(device)
        self.baseline = {d: allocated(d) for d in devices}
        self.baseline_reserved = {d: torch.cuda.memory_reserved(d) if d.startswith("cuda") else 0 for d in devices}

    @property
    def method(self) -> str:
        return "allocator" if self.on_cuda else "tensor bytes"

    def block_bytes(self, model, names: list[str], device: str, before: int) -> tuple[int, str]:
        """The bytes of the block just materialized (its parameters `names` on `device`, where the
        allocator held `before` ahead of it), and what its device holds now, in words (CUDA only)."""
        if self.on_cuda:
            held = (allocated(device) - self.baseline[device]) / 1e9
            return allocated(device) - before, f"; {device} holds {held:.2f} GB"
        params = [model.get_parameter(n) for n in names]
        return sum(tensor_bytes(t for p in params for t in _param_tensors(p)).values()), ""

    def measure_load(self, model) -> None:
        """The weights, and the peak while they were materialized."""
        import torch

        if self.on_cuda:
            self.weights = {d: allocated(d) - self.baseline[d] for d in self.devices}
            self.load_peak = {d: torch.cuda.max_memory_allocated(d) - self.baseline[d] for d in self.devices}
        else:
            self.weights = tensor_bytes(model_tensors(model))
            self.load_peak = {d: 0 for d in self.devices}

    def measure_run(self, kv_tensors) -> None:
        """After the prefill and decode: the KV cache, what stays resident, the peaks of the whole run."""
        import torch

        self.kv_cache = tensor_bytes(kv_tensors)
        if self.on_cuda:
            self.resident = {d: allocated(d) - self.baseline[d] for d in self.devices}
            self.peak = {d: torch.cuda.max_memory_allocated(d) - self.baseline[d] for d in self.devices}
            self.reserved_peak = {d: torch.cuda.max_memory_reserved(d) - self.baseline_reserved[d] for d in self.devices}
        else:
            self.resident = {d: self.weights.get(d, 0) + self.kv_cache.get(d, 0) for d in self.devices}
            self.peak = self.reserved_peak = {d: 0 for d in self.devices}

    def against(self, plan: "Plan") -> tuple[DeviceMemory, ...]:
        """Each device's measurements next to the plan's share for it."""
        shares = {share.device: share for share in plan.placement}
        return tuple(
            DeviceMemory.against(
                device, shares.get(device),
                weights=self.weights.get(device, 0),
                kv_cache=self.kv_cache.get(device, 0),
                resident=self.resident.get(device, 0),
                peak=self.peak.get(device, 0),
                load_peak=self.load_peak.get(device, 0),
                reserved_peak=self.reserved_peak.get(device, 0),
            )
            for device in self.devices
        )


def versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("accelerate", "bitsandbytes"):
        try:   # read from the installed metadata: importing bitsandbytes for a bf16 rehearsal printed its
            found[name] = version(name)   # warning about the optional `kernels` package on AVX512-BF16 CPUs
        except PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
        found["allocator"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF") or "default"
    return found


# ---- decoding ---------------------------------------------------------------------------------


class TransformersDecode:
    """Prefill and decode through the CUDA session's own `forward_in_chunks` (a DynamicCache)."""

    path = "transformers"
    warm_up_seconds = 0.0

    def __init__(self, model, prefill_chunk: int, device: str):
        from transformers import DynamicCache

        from runner_cuda.session import cache_argument

        self.model, self.chunk, self.device = model, prefill_chunk, device
        self.cache_name = cache_argument(model)
        self.cache = DynamicCache(config=model.config)

    def prefill(self, ids: list[int]):
        return self.step(ids)

    def step(self, ids: "int | list[int]"):
        import torch

        from runner_cuda.session import forward_in_chunks

        tokens = torch.tensor([ids if isinstance(ids, list) else [ids]], device=self.device)
        return forward_in_chunks(self.model, tokens, self.cache, self.chunk, self.cache_name)[0, -1]

    @staticmethod
    def pick(logits) -> int:
        return int(logits.argmax())

    def kv_tensors(self):
        return cache_tensors(self.cache)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()


class FastDecode:
    """Prefill and decode through runner's fast path (runner_cuda.fast.FastDecoder), as a session
    on the GPUs does; warmed up (compile, first graph) as a session does at load, and timed."""

    path = "fast"

    def __init__(self, decoder, prefill_chunk: int):
        self.decoder = decoder
        decoder.prefill_chunk = prefill_chunk
        started = time.perf_counter()
        decoder.warm_up()
        synchronize([str(device) for device in decoder.devices])
        self.warm_up_seconds = time.perf_counter() - started

    def prefill(self, ids: list[int]):
        return self.decoder.prefill(ids)

    def step(self, token: int):
        return self.decoder.step(token)

    @staticmethod
    def pick(logits) -> int:
        return int(logits.argmax())

    def kv_tensors(self):
        return self.decoder.keys + self.decoder.values

    @property
    def length(self) -> int:
        return self.decoder.length


def decode_steps(model, context: int, prefill_chunk: int, device: str, fast_decode: bool = True,
                 kernel: str | None = None):
    """The decode path a session on the model's devices uses (runner_cuda.fast.attach's choice),
    and why, in words."""
    import torch

    if not fast_decode:
        return TransformersDecode(model, prefill_chunk, device), "the fast path is off (--no-fast-decode)"
    if not torch.cuda.is_available():
        return TransformersDecode(model, prefill_chunk, device), "no CUDA GPU (a session on the CPU decodes this way too)"
    from runner_cuda import fast

    decoder = fast.decoder_for(model, context, kernel)
    if decoder is None:
        return (TransformersDecode(model, prefill_chunk, device),
                "the fast path does not take this model here; a session here decodes this way too")
    return FastDecode(decoder, prefill_chunk), fast.describe(decoder)


# ---- the rehearsal --------------------------------------------------------------------------


def rehearse(
    plan: "Plan",
    decode_tokens: int = 16,
    on_progress: Callable[[LoadProgress], None] | None = None,
    prefill_chunk: int | None = None,
    fast_decode: bool = True,
    kernel: str | None = None,
) -> RehearsalResult:
    """Materialize `plan.model` with random weights as planned, prefill, decode, and measure.

    The decode runs through the path a session on the plan's devices uses (`fast_decode` and
    `kernel` as LoadRequest's: runner's fast path on the GPUs), so its speed is the one a user gets.

    The prefill feeds `prefill_chunk` tokens per forward (default budget.PREFILL_CHUNK: what the
    CUDA session does and what the Plan's activation estimate counts).

    Out of memory anywhere (a layer's weights, the prefill, a decode step) is caught: the model is
    freed and RehearsalOutOfMemory says which stage, which device, and the bytes in use then."""
    from runner.budget import PREFILL_CHUNK
    from runner_cuda.loading import use_expandable_segments

    use_expandable_segments()   # before torch is imported, as a real load does
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as error:
        raise BackendUnavailable(f"rehearse needs torch and transformers ({error}); "
                                 "install them with: pip install 'runner[cuda]'") from None
    prefill_chunk = check_lengths(plan, decode_tokens, prefill_chunk, PREFILL_CHUNK)
    where = {"what": "building the model", "device": "cpu", "layers": 0}
    try:
        return _rehearse(plan, decode_tokens, on_progress or (lambda progress: None), where, prefill_chunk,
                         fast_decode, kernel)
    except torch.OutOfMemoryError:
        in_use = _cuda_in_use()
    except RuntimeError as error:  # the CPU allocator's out-of-memory is a plain RuntimeError
        if "can't allocate memory" not in str(error):
            raise
        in_use = _cuda_in_use()
    # The traceback (and with it the model) is gone once the except clause ends.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    use = "; ".join(f"{device} had {size / 1e9:.2f} GB in use" for device, size in in_use.items())
    raise RehearsalOutOfMemory(
        f"out of memory on {where['device']} while {where['what']} ({where['layers']}/{plan.model.num_layers} "
        f"layers materialized{'; ' + use if use else ''}); the plan said {plan.verdict} "
        f"({plan.total_bytes / 1e9:.2f} GB): use fewer --layers, a smaller --quant or a shorter --context"
    )


def _cuda_in_use() -> dict[str, int]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())}


def _rehearse(plan: "Plan", decode_tokens: int, report, where: dict, prefill_chunk: int, fast_decode: bool,
              kernel: str | None) -> RehearsalResult:
    import torch

    started = time.perf_counter()
    placed = place_model(plan)
    meter = Meter(placed.devices)
    generators = Generators()
    blocks = parameter_blocks(placed.model, plan.model.num_layers)
    measured_blocks = materialize_blocks(placed, blocks, meter, generators, where, report)
    finish_model(placed.model, placed.quantizer, placed.device_map)
    synchronize(meter.devices)
    load_seconds = time.perf_counter() - started
    meter.measure_load(placed.model)

    # Prefill in chunks, then decode one token at a time, through the decode path a session on these
    # devices uses. The cache ends holding exactly `context` tokens.
    prefill = plan.context - decode_tokens
    first_device = device_of(next(iter(blocks.values()))[0], placed.device_map)
    ids = torch.randint(0, plan.model.vocab_size, (prefill,), generator=generators.on("cpu")).tolist()
    where.update(what="compiling the fast decode path and capturing its first graph", device=first_device)
    steps, reason = decode_steps(placed.model, plan.context, prefill_chunk, first_device, fast_decode, kernel)
    where.update(what=f"prefilling {prefill} tokens", device=first_device)
    logits, prefill_seconds = timed_prefill(steps, ids, prefill_chunk, decode_tokens, meter.devices, report)
    step_seconds = timed_decode(steps, logits, decode_tokens, meter.devices, where, report)
    del logits, ids
    gc.collect()
    synchronize(meter.devices)
    meter.measure_run(steps.kv_tensors())
    if steps.length != plan.context:
        raise LoadError(f"the KV cache holds {steps.length} tokens, not the {plan.context} planned")

    result = CudaRehearsalResult(
        **plan_fields(plan),
        method=meter.method,
        devices=meter.against(plan),
        blocks=tuple(measured_blocks),
        prefill_tokens=prefill,
        prefill_seconds=prefill_seconds,
        decode_tokens=decode_tokens,
        decode_step_seconds=tuple(step_seconds),
        load_seconds=load_seconds,
        versions=versions(),
        device_names={d: torch.cuda.get_device_name(d) for d in meter.devices if d.startswith("cuda")},
        decode_path=steps.path,
        decode_path_reason=reason,
        warm_up_seconds=steps.warm_up_seconds,
    )
    del placed, steps
    gc.collect()
    if meter.on_cuda:
        torch.cuda.empty_cache()
    return result


@dataclass(frozen=True)
class PlacedModel:
    """The architecture on the meta device, and where the plan puts each of its modules."""

    model: "torch.nn.Module"
    quantizer: object | None             # transformers' HfQuantizer for NF4/int8; None for a float dtype
    dtype: "torch.dtype"                 # the dtype a checkpoint holds the weights in (the real load's)
    device_map: dict[str, int | str]

    @property
    def devices(self) -> list[str]:
        return sorted({torch_device(value) for value in self.device_map.values()})


def place_model(plan: "Plan") -> PlacedModel:
    """Build the plan's architecture with the real load's dtype and quantization config, and place it."""
    import torch

    from runner_cuda.loading import attention_for, gpu_capabilities, scheme_for

    gpus = gpu_capabilities() if torch.cuda.is_available() else []
    scheme = scheme_for(plan.quant, gpus, allow_offload=False)
    model, quantizer = build_meta_model(plan.model, scheme, attention_for(scheme.dtype, gpus))
    device_map = resolve_device_map(model, plan, quantizer)
    check_devices_exist(device_map)
    return PlacedModel(model, quantizer, scheme.dtype, device_map)


def parameter_blocks(model, num_layers: int) -> dict[str, list[str]]:
    """Parameter names grouped by block, the blocks in the order a forward pass meets them."""
    blocks: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        blocks.setdefault(block_of(name), []).append(name)
    order = ["embeddings"] + [f"layer {i}" for i in range(num_layers)] + ["head"]
    return {block: blocks[block] for block in order if block in blocks}


def materialize_blocks(placed: PlacedModel, blocks: dict[str, list[str]], meter: "Meter", generators: Generators,
                       where: dict, report) -> list[BlockMemory]:
    """Random weights block by block, each block measured as it lands and reported."""
    measured: list[BlockMemory] = []
    materialize_buffers(placed.model, placed.device_map)
    for index, (block, names) in enumerate(blocks.items(), start=1):
        device = device_of(names[0], placed.device_map)
        where.update(what=f"materializing {block}", device=device)
        synchronize(meter.devices)
        before = allocated(device)
        for name in names:
            materialize_parameter(placed.model, name, device_of(name, placed.device_map), placed.dtype,
                                  placed.quantizer, generators)
        synchronize(meter.devices)
        size, holds = meter.block_bytes(placed.model, names, device, before)
        measured.append(BlockMemory(block, device, size))
        if block.startswith("layer "):
            where["layers"] += 1
        report(LoadProgress(f"{block} on {device}: {size / 1e6:.1f} MB{holds}", index, len(blocks), "blocks"))
    return measured


def timed_prefill(steps, ids: list[int], prefill_chunk: int, decode_tokens: int, devices, report):
    """The prefill's last logits and its seconds."""
    chunks = f" in chunks of {prefill_chunk}" if len(ids) > prefill_chunk else ""
    report(LoadProgress(f"prefill of {len(ids)} tokens{chunks}", 0, decode_tokens, "tokens"))
    synchronize(devices)
    tick = time.perf_counter()
    logits = steps.prefill(ids)
    synchronize(devices)
    return logits, time.perf_counter() - tick


def timed_decode(steps, logits, decode_tokens: int, devices, where: dict, report) -> list[float]:
    """Greedy decode of `decode_tokens` tokens after `logits`: each step's seconds (the token pick
    before the clock starts)."""
    step_seconds: list[float] = []
    for step in range(decode_tokens):
        where.update(what=f"decoding token {step + 1}/{decode_tokens}")
        token = steps.pick(logits)
        tick = time.perf_counter()
        logits = steps.step(token)
        synchronize(devices)
        step_seconds.append(time.perf_counter() - tick)
        if (step + 1) % 8 == 0 or step + 1 == decode_tokens:
            report(LoadProgress(f"decoded {step + 1}/{decode_tokens} tokens", step + 1, decode_tokens, "tokens"))
    return step_seconds

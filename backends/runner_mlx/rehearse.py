"""Rehearse an MLX load: the model's real architecture (mlx-lm's own class) with random weights.

`rehearse(plan)` answers "will it run here under mlx, and how fast?" before any download:

1. build mlx-lm's model class from the config dict (catalog or config.json, `--layers` applied).
   mlx is lazy: the class's own initializers (float32 `mx.random.uniform`) are graphs, not memory;
2. quantize it with mlx-lm's own `quantize_model` (group 64, 4 or 8 bits, mlx-lm's predicate):
   still lazy, so the float32 weights are never computed;
3. block by block (embeddings, each decoder layer, the head) replace every array with random
   values of its final shape and dtype (packed uint32 words, bf16 scales and biases, bf16 norms)
   and evaluate that block alone. The lazy float32 graph each array replaces is dropped unevaluated,
   so the only memory ever allocated is the target weights, one block at a time; the values are
   made from random bits (`mx.random.split` is mlx's RandomBits primitive) with no wider temporary,
   so the load's peak is the weights themselves;
4. prefill `context - decode_tokens` random tokens as mlx-lm's `generate_step` does (all but the
   last in chunks of `prefill_step_size`, evaluating only the KV cache; then the last token with
   its logits), decode `decode_tokens` more, so mlx-lm's KVCache ends holding `context` tokens;
5. measure with mlx's allocator: `mx.get_active_memory` after each block, after the prefill and
   after the decode, `mx.get_peak_memory` per stage.

mlx and mlx-lm are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import platform
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from runner.backend import LoadProgress
from runner.errors import BackendUnavailable, LoadError, UserInputError
from runner.rehearsal import (BlockMemory, DeviceMemory, RehearsalResult, architecture_config, check_lengths,
                              plan_fields)

from runner_mlx.plan_rules import KV_STEP  # mlx-lm's KVCache grows in steps of this many tokens
from runner_mlx import GROUP_SIZE, INSTALL, QUANT_BITS, QUANT_DTYPES

if TYPE_CHECKING:
    from runner.budget import Plan

INIT_STD = 0.02            # random weights ~ N(0, 0.02), Llama's initializer_range: activations stay sane
SEED = 0
PREFILL_STEP = 2048        # mlx-lm's generate_step default prefill_step_size
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class RehearsalOutOfMemory(LoadError):
    """mlx ran out of memory during a rehearsal; the message says where and how far it got."""


@dataclass(frozen=True, kw_only=True)
class MlxRehearsalResult(RehearsalResult):
    """The shared result (runner.rehearsal) plus what mlx-lm's KV cache and mlx's peak add."""

    kv_tokens: int              # tokens the cache holds (its offset): the context
    kv_slots: int               # tokens it has room for (mlx-lm allocates in steps of 256)
    kv_cache_tokens_bytes: int  # bytes of the `kv_tokens` held (the plan counts the slots)
    prefill_peak: int           # peak active memory during prefill and decode

    @property
    def notes(self) -> tuple[str, ...]:
        """What the shared report adds below its table for an MLX rehearsal."""
        (device,) = self.devices
        lines = [
            f"KV cache: {self.kv_tokens} tokens held ({self.kv_cache_tokens_bytes / 1e6:.1f} MB) in "
            f"{self.kv_slots} slots: mlx-lm's KVCache grows in steps of {KV_STEP} tokens, and the plan counts "
            f"those slots",
            f"peak: mx.get_peak_memory over the load ({device.load_peak / 1e6:.1f} MB), the prefill in chunks as "
            f"mlx-lm's generate_step does and the decode ({self.prefill_peak / 1e6:.1f} MB)",
        ]
        return tuple(lines)

    def to_dict(self) -> dict:
        return super().to_dict() | {
            "prefill_peak": self.prefill_peak,
            "kv_tokens": self.kv_tokens,
            "kv_slots": self.kv_slots,
            "kv_cache_tokens_bytes": self.kv_cache_tokens_bytes,
        }


# ---- building the model, lazily ---------------------------------------------------------------


def model_config(spec) -> dict:
    """The architecture's config.json dict (runner.rehearsal.architecture_config) with the settings
    mlx-lm would miss (transformers 5's rope_parameters)."""
    from runner_mlx.convert import config_fixes

    config = architecture_config(spec)
    config.update(config_fixes(config))
    for key in ("quantization", "quantization_config"):   # the rehearsal quantizes as planned
        config.pop(key, None)
    return config


def compute_dtype(spec, quant: str):
    """The dtype of everything that is not packed: as mlx_lm.convert casts it (bf16 for --quant bf16;
    the checkpoint's float dtype for q4/q8, which the scales and biases then take)."""
    import mlx.core as mx

    name = QUANT_DTYPES.get(quant) or spec.dtype
    return getattr(mx, name) if name in ("float16", "bfloat16", "float32") else mx.bfloat16


def build_lazy_model(spec, quant: str):
    """mlx-lm's model class for this config, quantized by mlx-lm's own `quantize_model`.

    Nothing is evaluated: every parameter is still an unevaluated graph (mlx is lazy)."""
    from mlx_lm.utils import quantize_model

    from runner_mlx.compat import model_classes
    from runner_mlx.convert import mlx_lm_version

    config = model_config(spec)
    classes = model_classes(config)
    if classes is None:
        raise UserInputError(f"{spec.name}: mlx-lm {mlx_lm_version()} cannot run model_type '{config.get('model_type')}'")
    model_class, args_class = classes
    model = model_class(args_class.from_dict(config))
    if quant in QUANT_BITS:
        with contextlib.redirect_stdout(io.StringIO()):   # mlx-lm prints "[INFO] Quantized ..."
            model, _ = quantize_model(model, config, GROUP_SIZE, QUANT_BITS[quant])
    return model


def block_of(path: str) -> str:
    """Which block a module belongs to: "embeddings", "layer N" or "head"."""
    match = _LAYER.search("." + path + ".")
    if match:
        return f"layer {match.group(1)}"
    if "embed" in path:
        return "embeddings"
    return "head"


def blocks_of(model) -> dict[str, list[tuple[str, object]]]:
    """The modules that own arrays, grouped by block, in the order a forward pass meets them."""
    import mlx.core as mx

    blocks: dict[str, list[tuple[str, object]]] = {}
    for path, module in model.named_modules():
        if any(isinstance(v, mx.array) and not k.startswith("_") for k, v in module.items()):
            blocks.setdefault(block_of(path), []).append((path, module))
    layers = sorted((b for b in blocks if b.startswith("layer ")), key=lambda b: int(b.split()[1]))
    order = [b for b in ["embeddings", *layers, "head"] if b in blocks]
    return {b: blocks[b] for b in order}


# ---- random weights in the target format --------------------------------------------------------


class Keys:
    """A seeded chain of mlx random keys, so that rehearsals are repeatable."""

    def __init__(self, seed: int = SEED) -> None:
        import mlx.core as mx

        self.key = mx.random.key(seed)
        mx.eval(self.key)

    def next(self):
        import mlx.core as mx

        self.key, sub = mx.random.split(self.key)
        return sub


def random_words(shape, keys: Keys):
    """Uniformly random uint32 words (packed 4- or 8-bit codes), with no wider temporary.

    `mx.random.split(key, n)` is mlx's RandomBits primitive: n x 2 random uint32 words."""
    import mlx.core as mx

    count = math.prod(shape)
    words = mx.random.split(keys.next(), (count + 1) // 2).reshape(-1)
    if count % 2:
        words = words[:count]
    return words.reshape(shape)


def random_like(module, name: str, value, dtype, keys: Keys):
    """A random array with the shape and final dtype that `module.<name>` has after a real load."""
    import mlx.core as mx

    bits = getattr(module, "bits", None)
    quantized = bits is not None and hasattr(module, "scales")
    if quantized and name == "weight":
        return random_words(value.shape, keys)           # packed codes, uniform in [0, 2^bits - 1]
    if quantized and name in ("scales", "biases"):
        # affine dequantization w = scale * code + bias: codes uniform in [0, 2^bits - 1] have std
        # 2^bits / sqrt(12), so scales near INIT_STD * sqrt(12) / 2^bits give weights of std ~INIT_STD;
        # the biases centre them on 0. Made from the scales' own random bits: no float32 temporary.
        scale = INIT_STD * math.sqrt(12) / (2 ** bits)
        if name == "scales" and half_layout(dtype) is None:   # a float32 checkpoint keeps float32 scales
            return mx.random.uniform(scale, 2 * scale, value.shape, dtype=dtype, key=keys.next())
        if name == "scales":
            return random_half(value.shape, dtype, keys, magnitude=scale, signed=False)
        return module.scales * mx.array(-(2 ** bits - 1) / 2, dtype)   # materialize_block sets scales first
    if not mx.issubdtype(value.dtype, mx.floating):
        return mx.zeros(value.shape, value.dtype)
    if "norm" in type(module).__name__.lower():
        return mx.ones(value.shape, dtype=dtype)
    if name == "bias":
        return mx.zeros(value.shape, dtype=dtype)
    if half_layout(dtype) is not None:
        return random_half(value.shape, dtype, keys, magnitude=INIT_STD / 2)
    return mx.random.normal(value.shape, dtype=dtype, scale=INIT_STD, key=keys.next())


def half_layout(dtype) -> tuple[int, int, int] | None:
    """(sign bit, mantissa bits, exponent bias and shift) of a 16-bit float dtype; None otherwise."""
    import mlx.core as mx

    if dtype == mx.bfloat16:      # 1 sign, 8 exponent (bias 127), 7 mantissa bits
        return 0x8000, 0x007F, 127, 7
    if dtype == mx.float16:       # 1 sign, 5 exponent (bias 15), 10 mantissa bits
        return 0x8000, 0x03FF, 15, 10
    return None


def random_half(shape, dtype, keys: Keys, magnitude: float, signed: bool = True):
    """Random bf16/fp16 values in [m, 2m) (m: `magnitude` rounded down to a power of two), with a
    random sign if `signed`, built from random bits: no float32 temporary (mx.random.normal in bf16
    goes through one, doubling the peak while a large vocabulary's 0.5-1 GB embeddings are made)."""
    import mlx.core as mx

    sign, mantissa, bias, shift = half_layout(dtype)
    exponent = (bias + math.floor(math.log2(magnitude))) << shift
    keep = mantissa | (sign if signed else 0)
    count = math.prod(shape)
    words = mx.random.split(keys.next(), (count + 3) // 4).reshape(-1)
    halves = mx.view(words, mx.uint16)
    if count % 4:
        halves = halves[:count]
    halves = mx.bitwise_or(mx.bitwise_and(halves, mx.array(keep, mx.uint16)), mx.array(exponent, mx.uint16))
    return mx.view(halves, dtype).reshape(shape)


def materialize_block(modules, dtype, keys: Keys) -> None:
    """Replace every array of these modules with its random final value, and evaluate them.

    The lazy float32 initializer (and mlx-lm's lazy `mx.quantize` of it) that each array replaces
    is dropped unevaluated: it never takes memory."""
    import mlx.core as mx

    fresh = []
    for _, module in modules:
        arrays = [(n, v) for n, v in module.items() if isinstance(v, mx.array) and not n.startswith("_")]
        for name, value in sorted(arrays, key=lambda item: item[0] == "biases"):   # biases follow scales
            new = random_like(module, name, value, dtype, keys)
            setattr(module, name, new)
            fresh.append(new)
    mx.eval(fresh, keys.key)   # the key too, so that the next block's measurement starts clean


# ---- measuring ------------------------------------------------------------------------------------


def active() -> int:
    import mlx.core as mx

    return int(mx.get_active_memory())


def peak() -> int:
    import mlx.core as mx

    return int(mx.get_peak_memory())


def versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {"python": platform.python_version()}
    for name in ("mlx", "mlx-lm"):
        try:
            found[name] = version(name)
        except Exception:   # noqa: BLE001 - a version we cannot read is left out
            pass
    return found


def where_it_runs() -> str:
    import mlx.core as mx

    return "Metal GPU" if mx.metal.is_available() else "CPU (mlx[cpu])"


def plan_device(plan: "Plan") -> str:
    """The plan's name for mlx's memory pool on this host."""
    import mlx.core as mx

    if plan.placement:
        if len(plan.placement) > 1:
            raise UserInputError(
                f"the plan spreads the model over {len(plan.placement)} hosts; a rehearsal runs on this one "
                "(use --layers to rehearse one host's share)"
            )
        return plan.placement[0].device
    return "metal" if mx.metal.is_available() else "cpu"


# ---- the rehearsal --------------------------------------------------------------------------------


def rehearse(
    plan: "Plan",
    decode_tokens: int = 16,
    on_progress: Callable[[LoadProgress], None] | None = None,
    prefill_chunk: int | None = None,
) -> MlxRehearsalResult:
    """Build `plan.model` under mlx-lm with random weights in `plan.quant`, prefill, decode, measure.

    The prefill takes `prefill_chunk` tokens per forward (default 2048, mlx-lm's prefill_step_size).
    Out of memory anywhere is caught: RehearsalOutOfMemory says which stage and the bytes in use."""
    try:
        import mlx.core as mx
        import mlx_lm  # noqa: F401
    except ImportError as error:
        raise BackendUnavailable(f"rehearse --backend mlx needs mlx and mlx-lm ({error}); "
                                 f"install them with: {INSTALL}") from None
    if plan.backend != "mlx":
        raise UserInputError(f"this plan is for the {plan.backend} backend, not mlx")
    if plan.quant not in QUANT_BITS and plan.quant not in QUANT_DTYPES:
        raise UserInputError(f"the mlx backend runs {', '.join([*QUANT_BITS, *QUANT_DTYPES])}; not '{plan.quant}'")
    prefill_chunk = check_lengths(plan, decode_tokens, prefill_chunk, PREFILL_STEP)
    where = {"what": "building the model", "layers": 0}
    try:
        return _rehearse(plan, decode_tokens, on_progress or (lambda progress: None), where, prefill_chunk)
    except (RuntimeError, MemoryError) as error:
        text = str(error).lower()
        if not isinstance(error, MemoryError) and not any(w in text for w in ("alloc", "out of memory", "memory")):
            raise
        in_use = active()
    gc.collect()
    mx.clear_cache()
    raise RehearsalOutOfMemory(
        f"out of memory while {where['what']} ({where['layers']}/{plan.model.num_layers} layers materialized; "
        f"mlx had {in_use / 1e9:.2f} GB active); the plan said {plan.verdict} ({plan.total_bytes / 1e9:.2f} GB): "
        "use fewer --layers, a smaller --quant or a shorter --context"
    )


def _rehearse(plan: "Plan", decode_tokens: int, report, where: dict, prefill_chunk: int) -> MlxRehearsalResult:
    import mlx.core as mx

    device = plan_device(plan)
    release_memory()
    started = time.perf_counter()
    baseline = active()
    mx.reset_peak_memory()
    model, keys, measured_blocks = random_model(plan, device, baseline, where, report)
    load_seconds = time.perf_counter() - started
    weights = active() - baseline
    load_peak = peak() - baseline

    prefill = plan.context - decode_tokens
    cache, prefill_seconds, step_seconds = run_prompt(model, plan, keys, prefill, decode_tokens, prefill_chunk,
                                                      where, report)
    release_memory()
    prefill_peak = peak() - baseline
    resident = active() - baseline
    kv_cache, kv_slots, kv_tokens_bytes = kv_cache_bytes(cache, plan.context)

    memory = DeviceMemory.against(
        device, plan.placement[0] if plan.placement else plan,
        weights=weights,
        kv_cache=kv_cache,
        resident=resident,
        peak=max(load_peak, prefill_peak),
        load_peak=load_peak,
    )
    result = MlxRehearsalResult(
        **plan_fields(plan),
        method="mlx allocator",
        devices=(memory,),
        blocks=tuple(measured_blocks),
        prefill_tokens=prefill,
        prefill_seconds=prefill_seconds,
        decode_tokens=decode_tokens,
        decode_step_seconds=tuple(step_seconds),
        load_seconds=load_seconds,
        kv_tokens=plan.context,
        kv_slots=kv_slots,
        kv_cache_tokens_bytes=kv_tokens_bytes,
        prefill_peak=prefill_peak,
        versions=versions(),
        device_names={device: f"mlx, {where_it_runs()}"},
    )
    del model, cache
    release_memory()
    return result


def release_memory() -> None:
    """Free what Python no longer references and mlx's cache of freed buffers, so that the
    active memory measured next is what is really held."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def random_model(plan: "Plan", device: str, baseline: int, where: dict,
                 report) -> tuple[object, Keys, list[BlockMemory]]:
    """mlx-lm's model for the plan with random weights in `plan.quant`: (the model, the random keys
    it was made with, each block's measured memory)."""
    model = build_lazy_model(plan.model, plan.quant)
    dtype = compute_dtype(plan.model, plan.quant)
    keys = Keys()
    measured_blocks = materialize_blocks(model, dtype, keys, device, baseline, where, report)
    return model, keys, measured_blocks


def run_prompt(model, plan: "Plan", keys: Keys, prefill: int, decode_tokens: int, prefill_chunk: int, where: dict,
               report) -> tuple[list, float, list[float]]:
    """Prefill `prefill` random tokens and decode `decode_tokens` more as mlx-lm's generate_step does,
    with mlx's peak reset first: (the KV cache, the prefill's seconds, each decode step's seconds)."""
    import mlx.core as mx
    from mlx_lm.generate import wired_limit
    from mlx_lm.models.cache import make_prompt_cache

    tokens = mx.random.randint(0, plan.model.vocab_size, (prefill,), key=keys.next()).astype(mx.uint32)
    mx.eval(tokens)
    cache = make_prompt_cache(model)
    if not mx.metal.is_available() and plan.quant in QUANT_BITS and prefill > 64:
        warn_of_a_slow_prefill(model, tokens, where, report)
    mx.reset_peak_memory()
    chunks = f" in chunks of {prefill_chunk}" if prefill - 1 > prefill_chunk else ""
    report(LoadProgress(f"prefill of {prefill} tokens{chunks}", 0, decode_tokens, "tokens"))
    with wired_limit(model):
        token, prefill_seconds = timed_prefill(model, tokens, cache, prefill_chunk, where)
        step_seconds = timed_decode(model, token, cache, decode_tokens, where, report)
    return cache, prefill_seconds, step_seconds


def materialize_blocks(model, dtype, keys: Keys, device: str, baseline: int, where: dict, report) -> list[BlockMemory]:
    """Random weights block by block, each block's growth of mlx's active memory measured and reported
    (`baseline`: what mlx held before the rehearsal)."""
    import mlx.core as mx

    blocks = blocks_of(model)
    measured: list[BlockMemory] = []
    for index, (block, modules) in enumerate(blocks.items(), start=1):
        where["what"] = f"materializing {block}"
        before = active()
        materialize_block(modules, dtype, keys)
        size = active() - before
        measured.append(BlockMemory(block, device, size))
        if block.startswith("layer "):
            where["layers"] += 1
        report(LoadProgress(f"{block} on {device}: {size / 1e6:.1f} MB; mlx holds "
                            f"{(active() - baseline) / 1e6:.1f} MB", index, len(blocks), "blocks"))
    mx.eval(model.parameters())   # nothing left to compute: every array was replaced above
    return measured


def warn_of_a_slow_prefill(model, tokens, where: dict, report) -> None:
    """mlx's CPU quantized matmul does not gain from batching: a long prefill can take minutes.
    One token through the layers (into a throwaway cache, evaluated as a prefill chunk is: the head
    is not computed) says how long; tell the user before they wait."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    prefill = len(tokens)
    where["what"] = "timing one token"
    probe = make_prompt_cache(model)
    tick = time.perf_counter()
    model(tokens[:1][None], cache=probe)
    mx.eval([c.state for c in probe])
    per_token = time.perf_counter() - tick
    if per_token * prefill > 30:
        report(LoadProgress(f"mlx's quantized matmul on this CPU: {1 / per_token:.2f} tokens/s, so the prefill "
                            f"of {prefill} tokens takes about {per_token * prefill / 60:.0f} min (a shorter "
                            "--context, or --quant bf16, rehearses faster)", 0, 0))


def timed_prefill(model, tokens, cache, prefill_chunk: int, where: dict):
    """As mlx-lm's generate_step: all but the last token in chunks, evaluating only the KV cache; then
    the last with its logits. The first token (greedy) and the prefill's seconds."""
    import mlx.core as mx

    prefill = len(tokens)
    tick = time.perf_counter()
    done = 0
    while prefill - done > 1:
        where["what"] = f"prefilling tokens {done}-{min(done + prefill_chunk, prefill - 1)} of {prefill}"
        n = min(prefill_chunk, prefill - 1 - done)
        model(tokens[done:done + n][None], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        mx.clear_cache()
    where["what"] = "computing the first token's logits"
    token = model(tokens[done:][None], cache=cache)[:, -1, :].argmax(axis=-1)
    mx.eval(token)
    return token, time.perf_counter() - tick


def timed_decode(model, token, cache, decode_tokens: int, where: dict, report) -> list[float]:
    """Greedy decode of `decode_tokens` tokens after `token`: each step's seconds."""
    import mlx.core as mx

    step_seconds: list[float] = []
    for step in range(decode_tokens):
        where["what"] = f"decoding token {step + 1}/{decode_tokens}"
        tick = time.perf_counter()
        token = model(token[None], cache=cache)[:, -1, :].argmax(axis=-1)
        mx.eval(token)
        step_seconds.append(time.perf_counter() - tick)
        if (step + 1) % 8 == 0 or step + 1 == decode_tokens:
            report(LoadProgress(f"decoded {step + 1}/{decode_tokens} tokens", step + 1, decode_tokens, "tokens"))
    return step_seconds


def kv_cache_bytes(cache, context: int) -> tuple[int, int, int]:
    """(bytes of the KV cache, token slots it has room for, bytes of the `context` tokens it holds),
    after checking that it holds exactly `context` tokens."""
    held = {c.offset for c in cache}
    if held != {context}:
        raise LoadError(f"the KV cache holds {sorted(held)} tokens, not the {context} planned")
    total = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    slots = cache[0].keys.shape[2]
    tokens_bytes = sum((c.keys.nbytes + c.values.nbytes) // c.keys.shape[2] * c.offset for c in cache)
    return total, slots, tokens_bytes

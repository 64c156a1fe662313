"""Load a model as the plan says: the checks before, transformers' `from_pretrained`, the checks after.

    session = load_session(LoadRequest(spec, quant="nf4", context=4096, plan=plan))

Before loading: the quant is one this backend has, the plan does not need offload the user did
not allow, every safetensors shard is there and its header is sound (a corrupt file fails in a
second, not after minutes), the tokenizer loads.
Loading: `AutoModelForCausalLM.from_pretrained` with `use_safetensors=True`, the plan's
`device_map` and `max_memory`, bitsandbytes' config for nf4/int8, the attention kernel chosen here,
and transformers' per-tensor loop reported as progress.
After loading: NF4's compute dtype is what we asked for, the real placement (parameters' devices
and accelerate's offload hooks) has no offload the user did not allow, and the bytes each device
holds are measured (the CUDA allocator; on the CPU the bytes of the live tensors, bitsandbytes'
quantization state included).
"""

from __future__ import annotations


import gc
import importlib.util
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from runner.backend import LoadProgress, LoadRequest
from runner.choice import options_that_fit, plan_line, refuse_by_plan
from runner.errors import BackendUnavailable, CorruptWeights, DoesNotFit, LoadError, UserInputError
from runner.files import TensorEntry, check_model_json, missing_tokenizer, read_json_object, read_safetensors_header
from runner.words import counted, one_line
from runner_cuda import BITSANDBYTES_INSTALL, BITSANDBYTES_QUANTS, CUDA_QUANTS, FP8_INSTALL
from runner_cuda import compat

if TYPE_CHECKING:
    import torch


# ---- checkpoint files -----------------------------------------------------------------------


def checkpoint_shards(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder; a clear error if any is missing."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(name, str) and _plain_shard_name(name) for name in weight_map.values()
        ):
            raise CorruptWeights(f"{index}: not a valid safetensors index (its weight_map must name each "
                                 "tensor's .safetensors file in this folder)")
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise LoadError(
                f"{folder}: {len(missing)} of {len(names)} weight shards missing ({', '.join(missing[:3])}"
                f"{', …' if len(missing) > 3 else ''}); download the model again"
            )
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise LoadError(f"{folder}: only PyTorch pickle weights (.bin); runner loads safetensors only")
    raise LoadError(f"{folder}: no weights (model.safetensors or model.safetensors.index.json)")


def _plain_shard_name(name: str) -> bool:
    """A file name in the checkpoint's own folder: an index cannot point elsewhere ("../../x")."""
    return name.endswith(".safetensors") and "/" not in name and "\\" not in name and name not in (".", "..")


def checkpoint_tensors(shards: list[Path]) -> dict[str, TensorEntry]:
    """Every tensor of the shards, from their checked headers (a corrupt or cut file fails here)."""
    tensors: dict[str, TensorEntry] = {}
    for shard in shards:
        try:
            tensors.update(read_safetensors_header(shard).tensors)
        except CorruptWeights as error:
            raise CorruptWeights(f"{error}; download it again") from None
    return tensors


def checkpoint_mismatch(model, loading_info: dict, tensors: dict[str, TensorEntry]) -> str | None:
    """What of the checkpoint does not fit the model built from its config.json, in words, or None.

    transformers 5 loads such a checkpoint anyway and fills the gaps with random weights (it prints
    a report): `loading_info` holds its missing, unexpected and mismatched keys. It skips the shape
    check for weights it quantizes on the way in (bitsandbytes), so every Linear's weight is also
    held against the shape the checkpoint's header gives it."""
    wrong = [(name, tuple(ckpt), tuple(expected)) for name, ckpt, expected in loading_info.get("mismatched_keys", ())]
    for name, module in model.named_modules():
        entry = tensors.get(f"{name}.weight")
        expected = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if entry is not None and None not in expected and entry.shape != expected:
            wrong.append((f"{name}.weight", entry.shape, expected))
    problems = []
    for what, names in (("missing", sorted(loading_info.get("missing_keys", ()))),
                        ("unexpected", sorted(loading_info.get("unexpected_keys", ())))):
        if names:
            problems.append(f"{len(names)} tensor{'s' if len(names) > 1 else ''} {what} "
                            f"({', '.join(names[:3])}{', …' if len(names) > 3 else ''})")
    if wrong:
        wrong = sorted(set(wrong))
        shown = ", ".join(f"{name} {list(ckpt)} instead of {list(expected)}" for name, ckpt, expected in wrong[:3])
        problems.append(f"{len(wrong)} of the wrong shape ({shown}{', …' if len(wrong) > 3 else ''})")
    if not problems:
        return None
    return ("the checkpoint does not match its config.json: " + "; ".join(problems)
            + "; refusing to answer from random weights")


# ---- quantization schemes -------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    dtype: "torch.dtype"                     # the dtype of everything not quantized (and NF4's compute)
    quantization_config: object | None      # handed to from_pretrained
    description: str                         # for device_summary, e.g. "nf4 (double quant, bf16 compute)"


def gpu_capabilities() -> list[tuple[str, tuple[int, int]]]:
    import torch

    return [
        (torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())
    ]


def scheme_for(quant: str, gpus: list[tuple[str, tuple[int, int]]], allow_offload: bool) -> Scheme:
    import torch

    if quant in ("q4", "q8"):
        raise UserInputError(f"--quant {quant} is an MLX quantization; the cuda backend has nf4, int8, fp8, bf16, fp32")
    if quant not in CUDA_QUANTS:
        raise UserInputError(f"--quant {quant} is not known to the cuda backend ({', '.join(CUDA_QUANTS)})")
    if quant in BITSANDBYTES_QUANTS:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise BackendUnavailable(f"--quant {quant} needs bitsandbytes, which is not installed: {BITSANDBYTES_INSTALL}")
        # On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch an optional kernel from
        # the Hub (the `kernels` package) and warns when it cannot; runner never fetches kernels,
        # and bitsandbytes' built-in CPU path is what runs.
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # BF16 needs Ampere (8.0) or newer; the CPU has it.
    bf16_ok = all(capability >= (8, 0) for _, capability in gpus)
    half = torch.bfloat16 if bf16_ok else torch.float16
    half_name = "bf16" if bf16_ok else "fp16"
    if quant == "fp32":
        return Scheme(torch.float32, None, "fp32")
    if quant == "fp16":
        return Scheme(torch.float16, None, "fp16")
    if quant == "bf16":
        if not bf16_ok:
            old = next(name for name, capability in gpus if capability < (8, 0))
            raise UserInputError(f"{old} has no bf16 (compute capability below 8.0): use --quant fp16 or nf4")
        return Scheme(torch.bfloat16, None, "bf16")
    if quant in ("nf4", "nf4-nodq", "fp4"):
        from transformers import BitsAndBytesConfig

        double = quant != "nf4-nodq"
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4" if quant == "fp4" else "nf4",
            bnb_4bit_use_double_quant=double,
            bnb_4bit_compute_dtype=half,
            llm_int8_enable_fp32_cpu_offload=allow_offload,
        )
        kind = "fp4" if quant == "fp4" else "nf4"
        return Scheme(half, config, f"{kind} ({'double quant, ' if double else ''}{half_name} compute)")
    if quant == "int8":
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=allow_offload)
        return Scheme(torch.float16, config, "int8 (LLM.int8, fp16 compute)")
    return fp8_scheme(gpus)


def fp8_scheme(gpus: list[tuple[str, tuple[int, int]]]) -> Scheme:
    """FP8 through torchao: e4m3 weights with one fp32 scale per output row, activations quantized
    per token on the fly, products by `torch._scaled_mm` (FP8 tensor cores; it ships with torch).

    transformers' own fine-grained FP8 fetches its kernels from the Hugging Face Hub at run time
    (the `kernels` package), so it cannot work offline. torchao's weight-only FP8 dequantizes each
    weight to bf16 before every product (slower than bf16 at decode). embed_tokens and lm_head stay
    bf16 (transformers' torchao quantizer converts nn.Linear only, and skips the output head), as
    do Linears whose sides are not multiples of 16 (`_scaled_mm` needs them)."""
    import torch

    if not gpus:
        raise UserInputError("--quant fp8 needs an NVIDIA GPU with compute capability 8.9 or newer (Ada, Hopper); this machine has none")
    for name, capability in gpus:
        if capability < (8, 9):
            raise UserInputError(
                f"--quant fp8 needs compute capability 8.9 or newer (Ada, Hopper); {name} is "
                f"{capability[0]}.{capability[1]}: use --quant nf4, int8 or bf16"
            )
    if importlib.util.find_spec("torchao") is not None:
        from transformers.utils import is_torchao_available

        if not is_torchao_available():  # installed, but older than transformers accepts
            from importlib.metadata import version

            raise BackendUnavailable(
                f"--quant fp8: torchao {version('torchao')} is too old for transformers (it needs 0.15 or newer): "
                f"{FP8_INSTALL}"
            )
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
        from transformers import TorchAoConfig

        config = TorchAoConfig(quant_type=Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        return Scheme(torch.bfloat16, config, "fp8 (torchao: e4m3 weights and activations, per-row scales, torch._scaled_mm)")
    raise BackendUnavailable(
        "--quant fp8 needs torchao, which is not installed (transformers' own fine-grained FP8 downloads "
        f"its kernels from the Hub at run time, which runner does not do): {FP8_INSTALL}"
    )


def attention_for(dtype, gpus: list[tuple[str, tuple[int, int]]]) -> str:
    """flash-attention-2 where it is installed and every GPU is Ampere or newer (fp16/bf16 only); else SDPA."""
    import torch

    if (
        gpus
        and dtype in (torch.float16, torch.bfloat16)
        and all(capability >= (8, 0) for _, capability in gpus)
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


# ---- progress -------------------------------------------------------------------------------


@contextmanager
def weight_loading_progress(report: Callable[[LoadProgress], None] | None, sizes: dict[str, int]):
    """Route transformers' per-tensor loading loop (a `tqdm` in `core_model_loading`) to `report`,
    in bytes when the checkpoint's tensor names are known, else in tensors."""
    import transformers.core_model_loading as core_loading

    original = getattr(core_loading, "tqdm", None)
    total_bytes = sum(sizes.values())

    def with_progress(items, *args, **kwargs):
        items = list(items)
        done_bytes = 0
        for index, item in enumerate(items):
            yield item
            if report is None:
                continue
            name = item[0] if isinstance(item, tuple) else None
            done_bytes += sizes.get(name, 0)
            if total_bytes:
                report(LoadProgress("loading weights", min(done_bytes, total_bytes), total_bytes, "bytes"))
            else:
                report(LoadProgress("loading weights", index + 1, len(items), "tensors"))
        if report is not None and total_bytes and done_bytes < total_bytes:  # names that did not match
            report(LoadProgress("loading weights", total_bytes, total_bytes, "bytes"))

    if original is not None:
        core_loading.tqdm = with_progress
    try:
        yield
    finally:
        if original is not None:
            core_loading.tqdm = original


# ---- after the load: where things are, how many bytes -------------------------------------


def decoder_layers(model) -> list:
    """The model's decoder layers (model.model.layers for Llama, Mistral, Qwen2, Mixtral)."""
    inner = getattr(model, "model", model)
    return list(getattr(inner, "layers", []))


def module_device(module) -> str:
    """Where a module computes: accelerate's execution device if hooked, else its first parameter's."""
    hook = compat.accelerate_hook(module)
    if hook is not None and getattr(hook, "offload", False):
        return "offload"
    for param in module.parameters():
        return "disk" if param.device.type == "meta" else str(param.device)
    return "none"


def offloaded_modules(model) -> list[str]:
    """Modules whose weights sit off the accelerator: accelerate offload hooks, meta (disk) or CPU
    parameters while GPUs compute. `hf_device_map` can be absent on one device, so look at both."""
    import torch

    found = []
    gpu_run = torch.cuda.is_available()
    for name, module in model.named_modules():
        hook = compat.accelerate_hook(module)
        if hook is not None and getattr(hook, "offload", False):
            found.append(name or "model")
            continue
        for param in module.parameters(recurse=False):
            if param.device.type == "meta" or (gpu_run and param.device.type == "cpu"):
                found.append(name or "model")
                break
    return found


def placement_summary(model) -> str:
    """'cuda:0 (layers 0-15), cuda:1 (layers 16-31)' or 'cpu (all 30 layers)'."""
    devices = [module_device(layer) for layer in decoder_layers(model)]
    if not devices:
        return module_device(model)
    if len(set(devices)) == 1:
        return f"{devices[0]} (all {counted(len(devices), 'layer')})"
    runs, start = [], 0
    for index in range(1, len(devices) + 1):
        if index == len(devices) or devices[index] != devices[start]:
            last = index - 1
            runs.append(f"{devices[start]} (layer{'s' if last > start else ''} {start}{f'-{last}' if last > start else ''})")
            start = index
    return ", ".join(runs)


def _plain_tensors(tensor):
    """A tensor subclass that wraps others (torchao's Float8Tensor: qdata + scale) has no storage
    of its own: its inner tensors, recursively; any other tensor is itself."""
    flatten = getattr(tensor.data if hasattr(tensor, "data") else tensor, "__tensor_flatten__", None)
    if flatten is None:
        yield tensor
        return
    inner = tensor.data
    for name in flatten()[0]:
        yield from _plain_tensors(getattr(inner, name))


def _tensors_with_quant_state(model):
    """Every tensor the model holds: parameters, buffers, torchao's inner tensors, and
    bitsandbytes' quantization state."""
    for held in list(model.parameters()) + list(model.buffers()):
        yield from _plain_tensors(held)
        tensor = held
        state = getattr(tensor, "quant_state", None)  # NF4/FP4: absmax, code, offset, nested state
        while state is not None:
            for part in (state.absmax, state.code, getattr(state, "offset", None)):
                if part is not None:
                    yield part
            state = getattr(state, "state2", None)
        scales = getattr(tensor, "SCB", None)  # LLM.int8: row scales
        if scales is not None:
            yield scales


def tensor_bytes_by_device(model) -> dict[str, int]:
    """Bytes of the model's tensors per device, each storage counted once (tied weights, shared
    codebooks). On the CPU there is no allocator to ask: this is the measure there."""
    seen: set[tuple[str, int]] = set()
    totals: dict[str, int] = {}
    for tensor in _tensors_with_quant_state(model):
        device = "disk" if tensor.device.type == "meta" else str(tensor.device)
        if device != "disk":
            key = (device, tensor.untyped_storage().data_ptr())
            if key in seen:
                continue
            seen.add(key)
            size = tensor.untyped_storage().nbytes()
        else:
            size = tensor.numel() * tensor.element_size()
        totals[device] = totals.get(device, 0) + size
    return totals


def cuda_allocated() -> dict[str, int]:
    import torch

    return {f"cuda:{i}": torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())}


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the load -------------------------------------------------------------------------------


def cpu_threads() -> int:
    """Threads for torch on the CPU: the cores not already busy (1-minute load average).

    torch's default (one thread per core) collapses when other programs keep the cores busy: on
    the 2-core VM at load average 9, SmolLM2-135M decoded 0.28 tokens/s with 2 threads and 6.4
    with 1. An explicit OMP_NUM_THREADS is respected."""
    import os

    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


def offline_mode() -> bool:
    """huggingface_hub's offline switch (HF_HUB_OFFLINE, or the older TRANSFORMERS_OFFLINE)."""
    import os

    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# The caching allocator maps memory in pages of growing segments instead of fixed-size blocks, so
# freed activations merge and fragmentation stays smaller: a 405B-shaped NF4 prefill of 8k tokens
# in 2048-token chunks on an H200 peaked at 3.6 GB reserved above allocated with it, 6.3 GB
# without (bench/RESULTS.md); budget.GPU_RESERVE (5 %) is what holds that.
ALLOCATOR_SETTING = "expandable_segments:True"


def use_expandable_segments() -> str | None:
    """Ask torch's CUDA allocator for expandable segments, unless the user set the allocator up
    (PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF) or torch is already imported (then the setting
    may have been read already: nothing is changed). Returns the setting in force, if known."""
    import os
    import sys

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if name in os.environ:
            return os.environ[name]
    if "torch" in sys.modules:
        return None
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTING
    return ALLOCATOR_SETTING


def load_session(request: LoadRequest):
    """The load, step by step: the checks that cost nothing, the checkpoint's headers, the
    tokenizer, the weights (from runner's NF4 cache where it has them), the checks after, the
    session and its fast decode path."""
    report = request.on_progress or (lambda progress: None)
    torch = start_torch(report)
    check_before_load(request)
    gpus = gpu_capabilities() if torch.cuda.is_available() else []
    if not gpus:
        torch.set_num_threads(cpu_threads())
    scheme = scheme_for(request.quant, gpus, request.allow_offload)
    source, tensors = checked_checkpoint(request.model, report)
    tokenizer = load_tokenizer(source, request, report)
    if gpus:
        free_memory()   # a model dropped before this load but not yet collected would count against this one
    baseline = cuda_allocated() if gpus else {}
    for i in range(len(gpus)):
        torch.cuda.reset_peak_memory_stats(i)
    attention = attention_for(scheme.dtype, gpus)
    model, cached = load_model(source, scheme, tensors, attention, request, gpus)
    if gpus and cached is None and request.fast_decode and request.quant in BITSANDBYTES_QUANTS:
        from runner_cuda import fast

        report(LoadProgress("saving the quantized weights for faster loads next time", 0, 0))
        fast.save_nf4_cache(model, request.model.path, request.quant)  # before any forward; never fails the load
    session = new_session(model, tokenizer, scheme, attention, baseline, request, gpus)
    if cached is not None:
        session.device_summary += "; NF4 from the reload cache"
    if gpus:
        prepare_fast_decode(session, request, report)
    return session


def start_torch(report):
    """Import torch (seconds in a fresh process: ~18 s on the lent H100 machine), with the
    allocator set up first: it reads its setting once."""
    import sys

    if "torch" not in sys.modules:
        report(LoadProgress("starting torch and transformers", 0, 0))
    use_expandable_segments()
    import torch

    return torch


def check_before_load(request: LoadRequest) -> None:
    spec = request.model
    if request.context < 1:
        raise UserInputError("the context must be at least 1 token")
    if request.context > spec.max_context:
        raise UserInputError(f"{spec.name} handles at most {spec.max_context} tokens of context; asked for {request.context}")
    if request.plan is not None:
        refuse_by_plan(request.plan, request.allow_offload)
    if spec.path is None and offline_mode():
        raise LoadError(
            f"{spec.name} is not downloaded (runner knows its config, but its weights are not in the Hugging Face "
            "cache) and offline mode is on (HF_HUB_OFFLINE): download it first, or unset HF_HUB_OFFLINE"
        )


def checked_checkpoint(spec, report) -> tuple[str, dict[str, TensorEntry]]:
    """Where from (a folder, or the id for from_pretrained to find in the HF cache) and every
    tensor of its shards, from their checked headers (a corrupt file fails in a second)."""
    tensors: dict[str, TensorEntry] = {}
    if spec.path is None:
        return spec.name, tensors
    check_model_json(spec.path)
    shards = checkpoint_shards(spec.path)
    for index, shard in enumerate(shards):
        report(LoadProgress("checking shards", index, len(shards), "shards"))
        tensors.update(checkpoint_tensors([shard]))
    report(LoadProgress("checking shards", len(shards), len(shards), "shards"))
    return str(spec.path), tensors


def load_tokenizer(source: str, request: LoadRequest, report):
    from transformers import AutoTokenizer

    report(LoadProgress("loading the tokenizer", 0, 0))
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=request.trust_remote_code)
    except Exception as error:   # transformers' parsers of files from the internet raise anything (KeyError, ...)
        text = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise LoadError(missing_tokenizer(source, request.model.name)
                        or f"{request.model.name}: cannot load the tokenizer ({text})") from None


def load_model(source: str, scheme: Scheme, tensors: dict[str, TensorEntry], attention: str,
               request: LoadRequest, gpus) -> tuple[object, Path | None]:
    """The model on the plan's devices, checked after the load; and the NF4 cache folder it came
    from, if it did. A cache that fails to load for any reason but memory is skipped, and the
    checkpoint is quantized again."""
    from runner_cuda import fast

    if request.plan is not None:
        device_map, max_memory = request.plan.device_map(), request.plan.max_memory()
    else:  # no plan: everything on the first GPU, or on the CPU
        device_map, max_memory = ({"": 0} if gpus else {"": "cpu"}), None
    offload_folder = None
    if isinstance(device_map, dict) and "disk" in device_map.values():  # only with --allow-offload
        from runner.paths import models_dir

        offload_folder = str(models_dir() / "offload")
    load = dict(dtype=scheme.dtype, device_map=device_map, max_memory=max_memory, attention=attention,
                offload_folder=offload_folder, request=request)
    # the cache's config.json carries the quantization, so no quantization_config is passed for it
    cached = fast.cached_nf4_source(request.model.path, request.quant) if gpus and request.fast_decode else None
    model, failure = None, None
    if cached is not None:
        try:
            from runner_cuda.fast import nf4_cache

            model, failure = load_weights(str(cached), None, checkpoint_tensors(checkpoint_shards(cached)), **load,
                                          cache_device=nf4_cache.one_device(device_map))
        except (LoadError, OSError) as error:
            failure = str(error)
        if failure is not None and "out of" not in failure:
            free_memory()
            model, failure, cached = None, None, None
    if model is None and failure is None:
        model, failure = load_weights(source, scheme.quantization_config, tensors, **load)
    if failure is not None:
        free_memory()
        raise LoadError(failure)
    model.eval()
    try:
        check_after_load(model, scheme, request)
    except BaseException:
        model = None        # let go of the weights before freeing
        free_memory()
        raise
    return model, cached


def new_session(model, tokenizer, scheme: Scheme, attention: str, baseline, request: LoadRequest, gpus):
    from runner_cuda.session import CudaSession

    return CudaSession(
        model=model,
        tokenizer=tokenizer,
        spec=request.model,
        quant=request.quant,
        context=request.context,
        plan=request.plan,
        scheme_description=scheme.description,
        attention=attention,
        cuda_baseline=baseline,
        gpu_names=[name for name, _ in gpus],
        kv_bits=request.kv_bits,
    )


def prepare_fast_decode(session, request: LoadRequest, report) -> None:
    """Static KV cache + CUDA graphs (+ fused NF4 GEMV) where the fast path applies; the ordinary
    loop where it does not, said in the session's summary."""
    from runner_cuda import fast

    if not request.fast_decode:
        return
    report(LoadProgress("preparing fast decoding (compiling kernels, capturing CUDA graphs)", 0, 0))
    try:
        fast.attach(session, request.kernel)
    except Exception as error:  # the ordinary loop still works: say so instead of failing
        session.device_summary += f"; fast decode off ({type(error).__name__}: {one_line(str(error), 80)})"

def load_weights(weights: str, quantization_config, tensors: dict[str, TensorEntry], *, dtype, device_map, max_memory,
                 attention: str, offload_folder: str | None, request: LoadRequest, cache_device: str | None = None):
    """transformers' from_pretrained, with progress; returns (model, None) or (None, one-line message).
    `cache_device`: `weights` is runner's NF4 cache and all of it goes to this one device: runner
    reads the files and builds the model itself (nf4_cache.load_on_device).

    The message is made inside `except` and the caller raises it outside: the original traceback
    holds the frames of the half-loaded model, and its memory is only freed once that is gone.
    A checkpoint that does not fit its config (`checkpoint_mismatch`) raises CorruptWeights."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = request.model
    try:
        if cache_device is not None:
            from runner_cuda.fast.nf4_cache import load_on_device

            def reading(done: int, total: int) -> None:
                if request.on_progress is not None:
                    request.on_progress(LoadProgress("reading the NF4 cache", done, total, "bytes"))

            return load_on_device(weights, cache_device, dtype=dtype, attn_implementation=attention, on_bytes=reading), None
        with weight_loading_progress(request.on_progress, {name: t.nbytes for name, t in tensors.items()}), \
                quiet_loading_report():
            model, loading_info = AutoModelForCausalLM.from_pretrained(
                weights,
                dtype=dtype,
                quantization_config=quantization_config,
                device_map=device_map,
                max_memory=max_memory,
                attn_implementation=attention,
                use_safetensors=True,
                trust_remote_code=request.trust_remote_code,
                low_cpu_mem_usage=True,
                offload_folder=offload_folder,
                ignore_mismatched_sizes=True,   # reported in loading_info (refused below), not raised as a table
                output_loading_info=True,
            )
        mismatch = checkpoint_mismatch(model, loading_info, tensors)
        if mismatch is None:
            return model, None
    except (torch.OutOfMemoryError, MemoryError, OSError, ValueError, RuntimeError, KeyError) as error:
        text = str(error).strip()
        if isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text.lower():
            return None, out_of_memory_message(request, "CPU RAM" if isinstance(error, MemoryError) else "GPU")
        if spec.path is None and "offline" in text.lower():
            return None, f"{spec.name} is not in the Hugging Face cache and offline mode is on: download it first"
        return None, f"{spec.name}: loading failed ({text.splitlines()[0] if text else type(error).__name__})"
    del model
    free_memory()
    raise CorruptWeights(f"{spec.name}: {mismatch}")


# transformers' loggers quieted while it loads (checked against transformers 5.24): the table of
# missing/unexpected tensors, which runner says in one line instead (`checkpoint_mismatch`), and the
# tensor-parallel plan check, which 5.24 runs when that table is quieted ("The following layers
# were not sharded: ..."): runner does not use tensor parallelism
QUIETED_LOGGERS = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")


@contextmanager
def quiet_loading_report():
    loggers = [logging.getLogger(name) for name in QUIETED_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def out_of_memory_message(request: LoadRequest, where: str) -> str:
    plan = request.plan
    hint = plan_line(plan) if plan is not None else "no plan was given"
    options = options_that_fit(plan) if plan is not None else []
    fits = f"; options that fit: {', '.join(options)}" if options else ""
    return f"out of {where} memory while loading {request.model.name} in {request.quant}: {hint}{fits}"


def check_after_load(model, scheme: Scheme, request: LoadRequest) -> None:
    """NF4 computes in the dtype we asked (a float32 compute dtype silently halves the speed), and
    nothing is offloaded unless the user allowed it."""
    for name, module in model.named_modules():
        compute = getattr(module, "compute_dtype", None)
        if type(module).__name__ == "Linear4bit" and compute is not None and compute != scheme.dtype:
            raise LoadError(f"{name}: NF4 compute dtype is {compute}, expected {scheme.dtype}; refusing a slow load")
    offloaded = offloaded_modules(model)
    if offloaded and not request.allow_offload:
        shown = ", ".join(offloaded[:3]) + (", …" if len(offloaded) > 3 else "")
        raise DoesNotFit(
            f"{request.model.name}: {len(offloaded)} modules ended up off the GPU ({shown}), which makes "
            "each token very slow; use a smaller --quant or --context, or pass --allow-offload"
        )

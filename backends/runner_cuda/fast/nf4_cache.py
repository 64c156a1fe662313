"""The NF4 reload cache: quantize once, then load the packed weights next time.

Quantizing on load reads every BF16 weight (16 GB for an 8B model) and quantizes it; the cache
holds what bitsandbytes made of them (packed NF4 weights, absmax, the double-quant state, the
unquantized embeddings, norms and head) as safetensors, 5.7 GB for an 8B model. transformers
reads such a folder as a pre-quantized checkpoint (its config.json carries the
`quantization_config`), so the cached model is the same bytes as the one quantized on load.

    folder = nf4_cache.find(source, "nf4")               # None if absent or stale
    if folder is None:
        model = ... quantize on load ...
        nf4_cache.save(model, source, "nf4")             # right after the load, before any forward
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map=..., max_memory=...)

Layout: models_dir()/nf4-cache/<source name>-<quant>-<fingerprint>/, written to a temporary
folder and renamed into place, with `runner-nf4-cache.json` written last (a folder without it is
incomplete and ignored). The fingerprint covers the source folder's path and each weight file's
name, size and modification time, so a changed checkpoint is quantized again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from runner.files import read_safetensors_header
from runner.paths import models_dir
from runner_cuda import compat

MARKER = "runner-nf4-cache.json"
QUANTS = ("nf4", "nf4-nodq", "fp4")


def cache_root() -> Path:
    return models_dir() / "nf4-cache"


def fingerprint(source: Path) -> str:
    source = Path(source).resolve()
    digest = hashlib.sha256(str(source).encode())
    for path in sorted(source.glob("*.safetensors")) + [source / "config.json"]:
        if path.exists():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def folder_for(source: Path, quant: str) -> Path:
    return cache_root() / f"{Path(source).resolve().name}-{quant}-{fingerprint(source)}"


def find(source: Path, quant: str) -> Path | None:
    """The complete cache folder of `source` quantized as `quant`, or None."""
    if quant not in QUANTS:
        return None
    folder = folder_for(source, quant)
    return folder if (folder / MARKER).exists() else None


def save(model, source: Path, quant: str) -> Path:
    """Write `model` (just loaded and quantized by bitsandbytes) into the cache; returns the folder.

    Call it before the model's first forward on CPU: there bitsandbytes repacks the weights for
    its CPU kernel on first use, and its conversion back changes the double-quant state's bytes.
    On CUDA the weights are never repacked."""
    if quant not in QUANTS:
        raise ValueError(f"the NF4 cache holds {', '.join(QUANTS)}, not {quant}")
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            raise ValueError("the model's 4-bit weights were repacked for bitsandbytes' CPU kernel; save before the first forward")
    folder = folder_for(source, quant)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(folder.name + f".partial-{int(time.time() * 1000)}")
    try:
        model.save_pretrained(str(partial), safe_serialization=True)
        for name in ("generation_config.json",):
            if (Path(source) / name).exists():
                shutil.copy2(Path(source) / name, partial / name)
        record = {"source": str(Path(source).resolve()), "quant": quant, "created": time.time()}
        (partial / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def load(folder: Path, **from_pretrained_kwargs):
    """The cached model: transformers reads the packed weights and quantization state as saved.
    When everything goes to one device (`one_device(device_map)`), runner reads the files itself
    (`read_folder`) and builds the model from the tensors (`assemble`)."""
    from transformers import AutoModelForCausalLM

    device = one_device(from_pretrained_kwargs.get("device_map"))
    if device is None:
        return AutoModelForCausalLM.from_pretrained(str(folder), **from_pretrained_kwargs)
    return load_on_device(folder, device, dtype=from_pretrained_kwargs.get("dtype"),
                          attn_implementation=from_pretrained_kwargs.get("attn_implementation"))


def load_on_device(folder: Path, device: str, dtype=None, attn_implementation: str | None = None, on_bytes=None):
    """The cached model, all of it on `device`: the files read by runner (`read_folder`,
    `on_bytes(done, total)` as it goes), the model built around the tensors (`assemble`).
    (Building the model's skeleton while the files are read saved nothing measurable on an H100,
    from the page cache or from disk: bench/RESULTS.md, fourth session.)"""
    return assemble(folder, read_folder(folder, device, on_bytes), device, dtype=dtype,
                    attn_implementation=attn_implementation)


def assemble(folder: Path, state_dict: dict, device: str, dtype=None, attn_implementation: str | None = None):
    """The cached model built from tensors already on `device`: its skeleton (`skeleton`), then
    the tensors put in place (`fill`)."""
    quantized = quantized_linears(state_dict)
    model = skeleton(folder, quantized, dtype=dtype, attn_implementation=attn_implementation)
    return fill(model, folder, state_dict, quantized, device)


def skeleton(folder: Path, quantized: set[str], dtype=None, attn_implementation: str | None = None):
    """The cached model without its weights, built without transformers' loader (its per-tensor
    bookkeeping took ~1 s for an 8B model, longer than reading the 5.7 GB): the architecture on the
    meta device, each Linear named in `quantized` (the cache holds it in 4 bits) replaced by
    bitsandbytes' Linear4bit, still empty."""
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    quant = config.quantization_config if isinstance(config.quantization_config, dict) else config.quantization_config.to_dict()
    compute_dtype = getattr(torch, str(quant.get("bnb_4bit_compute_dtype", "bfloat16")).replace("torch.", ""))
    dtype = dtype if dtype not in (None, "auto") else compute_dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    for name in quantized:
        module = model.get_submodule(name)
        with init_empty_weights():
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=compute_dtype, quant_storage=torch.uint8)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    return model


def quantized_linears(tensor_names) -> set[str]:
    """The Linear modules that a cache holds in 4 bits, from its tensor names."""
    suffixes = (".weight.quant_state.bitsandbytes__nf4", ".weight.quant_state.bitsandbytes__fp4")
    return {name[: -len(suffix)] for name in tensor_names for suffix in suffixes if name.endswith(suffix)}


def fill(model, folder: Path, state_dict: dict, quantized: set[str], device: str):
    """`skeleton(folder, quantized)` with the cache's tensors (on `device`) put in place: each
    Linear4bit gets its packed weight and quantization state (`Params4bit.from_prequantized`, as
    transformers does), every other weight is the saved tensor itself. Tied weights are tied again;
    the buffers computed at construction (RoPE frequencies) move to `device`."""
    import bitsandbytes as bnb
    import torch
    from transformers import GenerationConfig

    stats_of: dict[str, dict] = {name: {} for name in quantized}     # "absmax", "quant_map", ... per Linear
    for key, value in state_dict.items():
        owner, marker, stat = key.partition(".weight.")
        if marker and owner in stats_of:
            stats_of[owner][stat] = value
    for name in quantized:
        layer = model.get_submodule(name)
        layer.weight = bnb.nn.Params4bit.from_prequantized(state_dict[f"{name}.weight"], stats_of[name], requires_grad=False,
                                                           device=device, module=layer)
        if layer.bias is not None:
            layer.bias = torch.nn.Parameter(state_dict[f"{name}.bias"], requires_grad=False)
    for name, param in list(model.named_parameters()):
        owner_name, _, attribute = name.rpartition(".")
        if owner_name in quantized:
            continue
        if name in state_dict:
            setattr(model.get_submodule(owner_name), attribute, torch.nn.Parameter(state_dict[name], requires_grad=False))
    model.tie_weights()
    missing = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if missing:
        raise ValueError(f"{folder}: the cache has no tensor for {', '.join(missing[:3])}")
    compat.move_buffers(model, device)
    if (Path(folder) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()


def one_device(device_map) -> str | None:
    """"cuda:N" (or "cpu") when `device_map` puts every module on that one device, else None."""
    if not isinstance(device_map, dict) or not device_map:
        return None
    devices = set(device_map.values())
    if len(devices) != 1:
        return None
    device = devices.pop()
    if isinstance(device, int):
        return f"cuda:{device}"
    return device if isinstance(device, str) and (device == "cpu" or device.startswith("cuda")) else None


def read_folder(folder: Path, device: str, on_bytes=None) -> dict:
    """Every tensor of the folder's safetensors files, on `device` (`read_safetensors`)."""
    return read_safetensors(sorted(Path(folder).glob("*.safetensors")), device, on_bytes=on_bytes)


SAFETENSORS_DTYPES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "U8": "uint8", "I8": "int8",
    "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


ALIGNMENT = 256     # bytes; each tensor starts on it in the buffer (CUDA kernels load 16-byte vectors)


def read_safetensors(paths, device: str, threads: int = 8, chunk: int = 16 << 20, on_bytes=None) -> dict:
    """Every tensor of the safetensors files `paths` (one path or several) on `device`, as views into
    one buffer per file about the file's size, each tensor starting on a 256-byte boundary (in the
    file they are packed end to end, and a view at an odd offset breaks kernels that load aligned
    vectors). On CUDA the files are cut into pieces of at most `chunk` bytes, read by `threads`
    threads from one queue (so the disk stays busy across the end of one file and the start of the
    next) into pinned staging buffers, each piece copied to the GPU on the thread's own stream while
    the next is read: the speed of the page cache or the disk, where safetensors' per-tensor reads
    go at a fraction of it. `on_bytes(done, total)` after each piece (from the reading threads)."""
    import os
    import threading

    import torch

    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(path) for path in paths]
    device = torch.device(device)
    # where each tensor goes: (file index, name, entry, its place in that file's buffer)
    layout, buffers, pieces = [], [], []      # pieces: (file index, file offset, length, buffer offset)
    for index, path in enumerate(paths):
        header = read_safetensors_header(path)
        start = header.data_start
        size = 0
        for name, entry in header.tensors.items():    # in the order of their data
            size = -(-size // ALIGNMENT) * ALIGNMENT
            layout.append((index, name, entry, size))
            begin, end = entry.start, entry.stop
            for part in range(0, end - begin, chunk):
                pieces.append((index, start + begin + part, min(chunk, end - begin - part), size + part))
            size += end - begin
        buffers.append(torch.empty(size, dtype=torch.uint8, device=device))
    total = sum(length for _, _, length, _ in pieces)
    fds = [os.open(path, os.O_RDONLY) for path in paths]
    try:
        if device.type != "cuda":
            views = [memoryview(buffer.numpy()) for buffer in buffers]
            done = 0
            for index, offset, length, place in pieces:
                _read_fully(fds[index], views[index][place:place + length], offset)
                done += length
                if on_bytes is not None:
                    on_bytes(done, total)
        else:
            queue = list(reversed(pieces))
            lock = threading.Lock()
            errors = []
            read = [0]

            def worker():
                staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
                copied = [None, None]
                stream = torch.cuda.Stream(device=device)
                turn = 0
                try:
                    while True:
                        with lock:
                            if not queue or errors:
                                break
                            index, offset, length, place = queue.pop()
                        if copied[turn] is not None:
                            copied[turn].synchronize()          # the last copy out of this buffer
                        _read_fully(fds[index], memoryview(staging[turn].numpy())[:length], offset)
                        with torch.cuda.stream(stream):
                            buffers[index][place:place + length].copy_(staging[turn][:length], non_blocking=True)
                            copied[turn] = torch.cuda.Event()
                            copied[turn].record(stream)
                        turn = 1 - turn
                        with lock:
                            read[0] += length
                            if on_bytes is not None:
                                on_bytes(read[0], total)
                    stream.synchronize()
                except BaseException as error:  # reported by the caller's thread
                    errors.append(error)

            workers = [threading.Thread(target=worker, daemon=True) for _ in range(min(threads, len(pieces)))]
            for thread in workers:
                thread.start()
            for thread in workers:
                thread.join()
            if errors:
                raise errors[0]
    finally:
        for fd in fds:
            os.close(fd)
    tensors = {}
    for index, name, entry, place in layout:
        dtype = getattr(torch, SAFETENSORS_DTYPES[entry.dtype])
        tensors[name] = buffers[index][place:place + entry.nbytes].view(dtype).view(entry.shape)
    return tensors


def _read_fully(fd: int, into: memoryview, offset: int) -> None:
    import os

    done = 0
    while done < len(into):
        count = os.preadv(fd, [into[done:]], offset + done)
        if count == 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += count

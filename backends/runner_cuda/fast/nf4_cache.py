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

from runner.paths import models_dir

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
    """The cached model: transformers reads the packed weights and quantization state as saved."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), **from_pretrained_kwargs)

"""Fast paths for the CUDA backend: a static KV cache with CUDA-graph decode steps (fused
elementwise ops; NF4 GEMV by bitsandbytes' batch-1 kernel or runner's own in nf4_cuda.py), and
the NF4 reload cache. Each switches on only where CUDA is
present; on CPU the ordinary loop runs. Nothing heavy is imported here.

The backend calls three functions:

    cached = fast.cached_nf4_source(spec.path, quant)   # load from here instead, or None
    fast.save_nf4_cache(model, spec.path, quant)        # after quantizing on load (CUDA only)
    fast.attach(session)                                # swap in the graphed decode step

`--no-fast-decode` (LoadRequest.fast_decode=False) turns all three off (to measure or debug the ordinary path).
"""

from __future__ import annotations

import shutil
from pathlib import Path

def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def decoder_for(model, max_len: int, kernel: str | None = None, kv_bits: int | None = None):
    """A FastDecoder for `model` (static cache, CUDA graphs, fused ops), or None where the
    fast path does not apply: no CUDA, layers offloaded to the CPU or disk, an architecture it does
    not know. A model split over several GPUs decodes in one segment per GPU. `kernel` names the
    NF4 GEMV (decoder.NF4_KERNELS; None: runner's own); `kv_bits` quantizes the static cache."""
    if not _cuda():
        return None
    from runner_cuda.fast.decoder import FastDecoder, Unsupported

    try:
        decoder = FastDecoder(model, max_len, nf4_kernel=kernel, kv_bits=kv_bits)
    except Unsupported:
        return None
    if any(device.type != "cuda" for device in decoder.devices):
        return None
    return decoder


class FastSteps:
    """The session's replaceable steps over a FastDecoder: `new_cache()` starts a reply (the
    static cache is reused from position 0), `forward_step(ids, cache)` prefills a prompt (or the
    part of it after a kept prefix) and runs one graphed step per token after it (the token may be
    the tensor the step before picked on the device: the session feeds it before reading it),
    `trim_cache(cache, length)` keeps a prefix for the next request (and cuts off a step the
    session fed ahead of a reply's end), `greedy(logits)` the id the step's graph picked,
    `host_id(token)` that id read where the step wrote it in host memory."""

    def __init__(self, decoder):
        self.decoder = decoder

    def new_cache(self):
        self.decoder.reset()
        return self.decoder

    def forward_step(self, input_ids, cache):
        ids = input_ids.reshape(-1)
        if cache.length == 0 or ids.numel() > 1:
            return cache.prefill(ids.tolist())
        return cache.step(ids[0])

    def trim_cache(self, cache, length: int) -> bool:
        cache.trim(length)
        return True

    def greedy(self, logits):
        """The id a step picked on the device (the first largest of its logits, fast/pick.py), where
        `logits` are that step's: the next step reads it in place. After a prefill, session.greedy's."""
        if self.decoder.last_pick is not None and logits is self.decoder.logits:
            return self.decoder.last_pick
        from runner_cuda.session import greedy

        return greedy(logits)

    def host_id(self, token):
        """A session.HostId of the id a step picked, called right after that step: read from the
        host memory the step wrote it to (no copy between two steps); of any other id, a copy."""
        from runner_cuda.session import HostId

        decoder = self.decoder
        if decoder.last_pick is not None and token is decoder.last_pick:
            return HostId(token, written=decoder.picked_ids[decoder.length - 1])
        return HostId(token)


def attach(session, kernel: str | None = None) -> bool:
    """Give a CudaSession the fast decode step where it applies (with its quantized static cache
    when the session has `--kv-bits`); True if it did."""
    decoder = decoder_for(session.hf_model, session.context, kernel, session.kv_bits)
    if decoder is None:
        return False
    decoder.warm_up()
    session.use_steps(FastSteps(decoder))
    session.device_summary += f"; fast decode ({describe(decoder)})"
    return True


def describe(decoder) -> str:
    """The fast path in words: its cache, graphs, NF4 kernel and segments."""
    nf4 = decoder.nf4 is not None or type(decoder.layers[0].self_attn.q_proj).__name__ in ("Linear4bit", "LinearNF4")
    kernel = f", {decoder.nf4_kernel} NF4 GEMV" if nf4 else ""
    split = ""
    if len(decoder.devices) > 1:
        split = f", one graph segment per GPU ({', '.join(str(d) for d in decoder.devices)})"
    cache = "static KV cache" if decoder.kv_bits is None else f"static {decoder.kv_bits}-bit KV cache"
    return f"{cache}, CUDA graphs{kernel}{split}"


def cached_nf4_source(path, quant: str) -> Path | None:
    """The NF4 cache folder to load instead of `path` (quantized earlier), or None."""
    if path is None or not _cuda():
        return None
    from runner_cuda.fast import nf4_cache

    return nf4_cache.find(Path(path), quant)


def save_nf4_cache(model, path, quant: str) -> Path | None:
    """After quantizing `path` on load: keep the quantized weights for next time (CUDA only,
    where disk space allows; a failure to save never fails the load)."""
    if path is None or not _cuda():
        return None
    from runner_cuda.fast import nf4_cache

    if quant not in nf4_cache.QUANTS or nf4_cache.find(Path(path), quant) is not None:
        return None
    weights = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    root = nf4_cache.cache_root()
    root.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(root).free < weights // 2:      # NF4 is under a third of BF16
        return None
    try:
        return nf4_cache.save(model, Path(path), quant)
    except (OSError, ValueError):
        return None

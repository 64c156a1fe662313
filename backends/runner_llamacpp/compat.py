"""What runner reads from llama-cpp-python beyond its `Llama` class: llama.cpp's C API through the
package's ctypes bindings. Checked against llama-cpp-python 0.3.36 (llama.cpp of 2026).

  capture_log()          llama.cpp's log (one process-wide callback), kept per load: the buffer
                         sizes it allocated are the session's measured memory
  last_logits(llm)       the last position's logits of the latest llama_decode, without a copy
  all_logits(llm, ids)   every position's logits (a batch asking for all of them), for parity
  cut_cache(llm, keep)   drop the KV cache after its first `keep` positions
  eog_ids(llm)           every id that ends a generation (end of sequence, end of turn, ...)
  token_bytes(llm, id)   one token's text as bytes, however long: Llama.detokenize gives b"" for a
                         piece over its 32-byte buffer (a newline and 32 spaces of code indentation)
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

# "load_tensors:   CPU_Mapped model buffer size =    92.11 MiB", "llama_kv_cache:   CPU KV buffer size = 90.00 MiB"
BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([\d.]+)\s*MiB")
ERROR_LEVEL = 3   # GGML_LOG_LEVEL_ERROR


def device_name(buffer: str) -> str:
    """llama.cpp's buffer type -> runner's device name: CPU, CPU_Mapped, CPU_REPACK, CUDA_Host ->
    "cpu"; CUDA0 -> "cuda:0"; Metal -> "metal"."""
    if buffer.startswith("CUDA") and buffer[4:].isdigit():
        return f"cuda:{buffer[4:]}"
    if buffer.startswith(("Metal", "MTL")):
        return "metal"
    if buffer.startswith("CPU") or buffer.endswith("_Host"):
        return "cpu"
    return buffer.lower()


class LoadLog:
    """The lines llama.cpp logged while one model loaded."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    @contextlib.contextmanager
    def recording(self):
        with _LOCK:
            global _RECIPIENT
            _RECIPIENT = self
        try:
            yield self
        finally:
            with _LOCK:
                _RECIPIENT = None

    def text(self) -> str:
        return "".join(text for _, text in self.lines)

    def buffers(self) -> dict[str, int]:
        """Bytes per device of every buffer llama.cpp reported (weights, KV cache, compute, output)."""
        sizes: dict[str, int] = {}
        for buffer, _kind, mib in BUFFER_LINE.findall(self.text()):
            device = device_name(buffer)
            sizes[device] = sizes.get(device, 0) + round(float(mib) * 1024**2)
        return sizes

    def kinds(self) -> dict[str, int]:
        """Bytes per kind of buffer, over all devices: "model", "KV", "compute", "output"."""
        sizes: dict[str, int] = {}
        for _buffer, kind, mib in BUFFER_LINE.findall(self.text()):
            sizes[kind] = sizes.get(kind, 0) + round(float(mib) * 1024**2)
        return sizes

    def last_error(self) -> str:
        errors = [" ".join(text.split()) for level, text in self.lines if level == ERROR_LEVEL and text.strip()]
        return errors[-1][:300] if errors else ""


_LOCK = threading.Lock()
_RECIPIENT: LoadLog | None = None
_CALLBACK = None   # the ctypes callback must outlive every call llama.cpp makes to it


def capture_log() -> LoadLog:
    """A new LoadLog; the first call points llama.cpp's log at runner (nothing reaches stderr)."""
    global _CALLBACK
    import llama_cpp

    if _CALLBACK is None:
        @llama_cpp.llama_log_callback
        def receive(level: int, text: bytes, user_data) -> None:
            recipient = _RECIPIENT
            if recipient is not None and text:
                recipient.lines.append((level, text.decode("utf-8", "replace")))

        _CALLBACK = receive
        llama_cpp.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
    return LoadLog()


def last_logits(llm) -> "np.ndarray":
    import llama_cpp
    import numpy as np

    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))


def cut_cache(llm, keep: int) -> bool:
    """Drop every cached position from `keep` on (all of them for 0); False where the cache cannot
    be cut there (a recurrent or sliding-window model), leaving it unchanged."""
    import llama_cpp

    memory = llama_cpp.llama_get_memory(llm.ctx)
    if keep == 0:
        llama_cpp.llama_memory_clear(memory, True)
        return True
    return bool(llama_cpp.llama_memory_seq_rm(memory, -1, keep, -1))


def all_logits(llm, token_ids: Sequence[int], chunk: int) -> "np.ndarray":
    """float32 logits (len(token_ids), vocab) from an empty cache, `chunk` tokens per llama_decode."""
    import llama_cpp
    import numpy as np

    vocab = llm.n_vocab()
    out = np.empty((len(token_ids), vocab), dtype=np.float32)
    cut_cache(llm, 0)
    batch = llama_cpp.llama_batch_init(chunk, 0, 1)
    try:
        for start in range(0, len(token_ids), chunk):
            part = token_ids[start:start + chunk]
            batch.n_tokens = len(part)
            for i, token in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            code = llama_cpp.llama_decode(llm.ctx, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code}")
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(len(part), vocab))
            out[start:start + len(part)] = logits
    finally:
        llama_cpp.llama_batch_free(batch)
        cut_cache(llm, 0)
    return out


def eog_ids(llm) -> set[int]:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return {token for token in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, token)}


def token_bytes(llm, token: int) -> bytes:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    size = 32
    while True:
        buffer = ctypes.create_string_buffer(size)
        written = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        if written >= 0:
            return buffer.raw[:written]
        size = -written          # too small: llama.cpp answers with minus the size it needs


def special_token_texts(llm) -> dict[str, str]:
    """The texts a chat template may name (`bos_token`, `eos_token`), as transformers passes them."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    texts = {}
    for name, token in (("bos_token", llama_cpp.llama_vocab_bos(vocab)), ("eos_token", llama_cpp.llama_vocab_eos(vocab))):
        if 0 <= token < llm.n_vocab():
            texts[name] = llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace")
    return texts


__all__ = ["LoadLog", "capture_log", "last_logits", "all_logits", "cut_cache", "eog_ids", "token_bytes",
           "special_token_texts",
           "device_name"]

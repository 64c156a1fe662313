"""The private parts of other libraries that runner's core relies on, in one place (each backend
keeps its own: runner_cuda/compat.py, runner_llamacpp/compat.py). Checked against transformers
5.17 and 5.24.

- transformers: `modeling_gguf_pytorch_utils.tqdm`, the progress bar its GGUF loader walks a file's
  tensors through, replaced for that walk so the default model's import reports its own progress."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def gguf_tensor_progress(step: Callable[[int, int], None]) -> Iterator[None]:
    """Inside it, transformers' GGUF loader calls `step(done, total)` after each tensor it reads
    instead of drawing progress bars on stderr."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    def walk(tensors, desc=""):
        tensors = list(tensors)
        for index, tensor in enumerate(tensors):
            yield tensor
            step(index + 1, len(tensors))

    missing = object()
    original = getattr(gguf_utils, "tqdm", missing)
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = walk
    try:
        yield
    finally:
        if original is missing:
            del gguf_utils.tqdm
        else:
            gguf_utils.tqdm = original
        hf_logging.enable_progress_bar()

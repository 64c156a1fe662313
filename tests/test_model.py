"""ModelSpec: config.json from a folder, the Hugging Face cache or the catalog."""

from __future__ import annotations

import json
import re

import pytest

from runner.errors import ModelNotFound, UnsupportedModel, UserInputError
from runner.model import DEFAULT_MODEL_ID, catalog_config, catalog_ids, load_spec, spec_from_config


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
    with pytest.raises(ModelNotFound, match="~no-such-user-here/x: no such file or folder"):
        load_spec("~no-such-user-here/x")   # ~user of a user this machine lacks: pathlib raised RuntimeError
    for empty in ("", "  "):
        with pytest.raises(UserInputError, match="the model name is empty"):
            load_spec(empty)
    with pytest.raises(ModelNotFound, match="not in runner's catalog"):
        load_spec("someone/unknown-model")
    with pytest.raises(ModelNotFound, match=r"not in runner's catalog \(did you mean meta-llama/Llama-3.1-8B-Instruct\?\)"):
        load_spec("llama-3.1-8b-instruct")
    with pytest.raises(ModelNotFound, match=r"\(write the id alone: meta-llama/Llama-3.1-8B-Instruct\)"):
        load_spec("https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/tree/main")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        load_spec(str(empty))
    (empty / "model.safetensors").write_bytes(b"\0" * (17 << 20))   # more than a config.json may be
    with pytest.raises(ModelNotFound, match="model.safetensors: a weights file; give the folder that holds it"):
        load_spec(str(empty / "model.safetensors"))
    with pytest.raises(ModelNotFound, match="/dev/null: not a folder, a config.json or a GGUF file"):
        load_spec("/dev/null")
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


# ---- every number the plan reads is checked before any arithmetic (issue 21) ----------------------

def _default_config(**changes):
    return dict(catalog_config(DEFAULT_MODEL_ID), **changes)


@pytest.mark.parametrize("changes,message", [
    ({"num_hidden_layers": 10**12}, "num_hidden_layers is 1000000000000; runner takes 1 to 1,024"),
    ({"num_hidden_layers": -3}, "num_hidden_layers is -3"),
    ({"num_local_experts": 10**12, "model_type": "mixtral"}, "num_local_experts is 1000000000000"),
    ({"num_local_experts": 0}, "num_local_experts is 0"),
    ({"hidden_size": -1}, "hidden_size is -1"),
    ({"vocab_size": 0}, "vocab_size is 0"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads is 0"),
    ({"head_dim": -64}, "head_dim is -64"),
    ({"head_dim": 63}, "rotary positions need an even head_dim"),
    ({"intermediate_size": 2**40}, "intermediate_size is 1099511627776"),
    ({"max_position_embeddings": 0}, "max_position_embeddings is 0"),
    ({"hidden_size": 10**5000}, "hidden_size is a number of 16610 bits"),
    ({"hidden_size": "576"}, "hidden_size must be a whole number, not '576'"),
    ({"hidden_size": 576.0}, "hidden_size must be a whole number, not 576.0"),
    ({"hidden_size": float("nan")}, "hidden_size must be a whole number, not NaN"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be a whole number, not true"),
    ({"vocab_size": [49152]}, "vocab_size must be a whole number, not a list"),
    ({"num_key_value_heads": 4}, "num_attention_heads (9) is not a multiple of num_key_value_heads (4)"),
    ({"num_key_value_heads": 18}, "num_attention_heads (9) is not a multiple of num_key_value_heads (18)"),
    ({"head_dim": None, "hidden_size": 580}, "hidden_size (580) does not divide by num_attention_heads (9)"),
    ({"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 5}, "to 5 experts"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, not 'false'"),
    ({"torch_dtype": "int4"}, "torch_dtype is 'int4'; runner knows float32, float16, bfloat16"),
    ({"model_type": ["llama"]}, "model_type a list is not supported"),
])
def test_config_numbers_are_checked_with_the_field_named(changes, message):
    with pytest.raises(UnsupportedModel, match=re.escape(message)):
        spec_from_config(_default_config(**changes), "m", "folder")


def test_config_that_is_not_an_object_is_refused():
    for value in ([1, 2], "llama", None, 5):
        with pytest.raises(UnsupportedModel, match="not a JSON object"):
            spec_from_config(value, "m", "folder")


def test_defaults_and_real_values_still_read():
    spec = spec_from_config(_default_config(num_key_value_heads=None, head_dim=None, torch_dtype="torch.float32"),
                            "m", "folder")
    assert (spec.num_kv_heads, spec.head_dim, spec.dtype) == (9, 64, "float32")
    mixtral = load_spec("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert (mixtral.num_experts, mixtral.experts_per_token) == (8, 2)


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "holds a list, not a JSON object"),
    (b'"llama"', "holds a string, not a JSON object"),
    (b"null", "holds null, not a JSON object"),
    (b'{"hidden_size": NaN}', "NaN is not a number JSON allows"),
    (b'{"hidden_size": -Infinity}', "-Infinity is not a number JSON allows"),
    (b'{"hidden_size": ' + b"9" * 5000 + b"}", "malformed JSON (Exceeds the limit (4300 digits)"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'\xff\xfe{"model_type": "llama"}', "not UTF-8 text (byte 0)"),
])
def test_config_json_of_the_wrong_shape_is_one_clear_error(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(UserInputError, match=re.escape(message)):
        load_spec(str(tmp_path))


def test_overlong_path_is_a_clear_error():
    with pytest.raises(UserInputError, match="File name too long"):
        load_spec("/" + "a" * 5000)

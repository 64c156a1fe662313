"""Checkpoints that do not match their config.json, or whose files are malformed, are refused with an
error that names what is wrong (issue 21): the torch backend loads real files on the CPU here."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct

import pytest

from runner.backend import LoadRequest, get_backend
from runner.errors import CorruptWeights, UserInputError
from runner.files import read_safetensors_header
from runner.model import load_spec


def load(folder, quant="fp32"):
    return get_backend("cuda").load(LoadRequest(load_spec(str(folder)), quant, 64))


def edited_copy(tiny_llama_dir, folder, edit):
    """A copy of the tiny checkpoint whose state dict went through `edit(state)`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_llama_dir, folder)
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_missing_tensor_is_refused_and_named(tiny_llama_dir, tmp_path):
    folder = edited_copy(tiny_llama_dir, tmp_path / "missing",
                         lambda state: state.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CorruptWeights, match=r"does not match its config.json: 1 tensor missing "
                                             r"\(model.layers.1.mlp.up_proj.weight\); refusing") as caught:
        load(folder)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


def test_unexpected_tensor_is_refused_and_named(tiny_llama_dir, tmp_path):
    import torch

    def add(state):
        state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)

    folder = edited_copy(tiny_llama_dir, tmp_path / "unexpected", add)
    with pytest.raises(CorruptWeights, match=r"1 tensor unexpected \(model.layers.0.mlp.extra_proj.weight\)"):
        load(folder)


@pytest.mark.parametrize("quant", ["fp32", "nf4"])
def test_wrong_shape_is_refused_and_named(tiny_llama_dir, tmp_path, quant):
    """transformers skips the shape check of weights bitsandbytes quantizes: nf4 is checked too."""
    import torch

    def reshape(state):
        state["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)

    folder = edited_copy(tiny_llama_dir, tmp_path / f"shape-{quant}", reshape)
    with pytest.raises(CorruptWeights, match=r"1 of the wrong shape \(model.layers.0.self_attn.o_proj.weight "
                                             r"\[64, 32\] instead of \[64, 64\]\)"):
        load(folder, quant)


def test_sound_checkpoint_still_loads(tiny_llama_dir):
    session = load(tiny_llama_dir)
    session.close()


def _index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("weight_map,error,message", [
    ({"lm_head.weight": "../../elsewhere.safetensors"}, CorruptWeights, "not a valid safetensors index"),
    ({"lm_head.weight": ["model.safetensors"]}, CorruptWeights, "not a valid safetensors index"),
    ([], CorruptWeights, "not a valid safetensors index"),
    ({}, CorruptWeights, "not a valid safetensors index"),
])
def test_index_of_the_wrong_shape_is_refused(tiny_llama_dir, tmp_path, weight_map, error, message):
    folder = tmp_path / "indexed"
    shutil.copytree(tiny_llama_dir, folder)
    _index(folder, weight_map)
    with pytest.raises(error, match=message):
        load(folder)


def test_index_that_is_not_json_is_refused(tiny_llama_dir, tmp_path):
    folder = tmp_path / "indexed"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors.index.json").write_bytes(b'{"weight_map": NaN}')
    with pytest.raises(UserInputError, match="NaN is not a number JSON allows"):
        load(folder)


# ---- the one safetensors header reader ---------------------------------------------------------

def _file(tmp_path, header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}, "__metadata__": {"format": "pt"}}


def test_header_reader_reads_a_sound_file(tmp_path):
    header = read_safetensors_header(_file(tmp_path, GOOD, bytes(22)))
    assert [(n, t.dtype, t.shape, t.nbytes) for n, t in header.tensors.items()] == [
        ("a", "F32", (2, 2), 16), ("b", "BF16", (3,), 6)]
    assert header.metadata == {"format": "pt"} and header.data_start == 8 + len(json.dumps(GOOD))


@pytest.mark.parametrize("header,data,message", [
    (b"[]", b"", "its header holds a list"),
    (b'"x" ', b"", "its header holds a string"),
    (b"\xff\xfe", b"", "not UTF-8"),
    (b'{"a": NaN}', b"", "NaN is not a number"),
    (b"[" * 5000 + b"]" * 5000, b"", "nested too deeply"),
    ({"a": "F32"}, b"", "tensor 'a' is a string, not an object"),
    ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "unknown dtype 'F99'"),
    ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, bytes(8), "shape must be a list"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "shape must be a list"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "data_offsets must be"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**70]}}, bytes(8), "data_offsets must be"),
    ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, bytes(8), "needs 4835703278458516698824704 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "tensor 'b' starts at byte 4"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), "its header describes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(9), "truncated or corrupt"),
    ({"__metadata__": {"x": 1}}, b"", "__metadata__ must map names to strings"),
])
def test_header_reader_refuses_malformed_headers(tmp_path, header, data, message):
    with pytest.raises(CorruptWeights, match="not a valid safetensors file|truncated or corrupt") as caught:
        read_safetensors_header(_file(tmp_path, header, data))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_header_reader_refuses_a_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CorruptWeights, match="its header claims 9223372036854775808 bytes of a 10-byte file"):
        read_safetensors_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(CorruptWeights, match="shorter than 8 bytes"):
        read_safetensors_header(path)


# ---- the folder's JSON files (tokenizer, generation config) ---------------------------------------

@pytest.mark.parametrize("name,content,message", [
    ("tokenizer_config.json", b"[1]", "tokenizer_config.json: holds a list, not a JSON object"),
    ("tokenizer_config.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("tokenizer.json", b"\xff\xfe", "tokenizer.json: not UTF-8 text"),
    ("tokenizer.json", b'{"a": 1}', "cannot load the tokenizer ('added_tokens')"),
    ("generation_config.json", b"[1]", "generation_config.json: holds a list"),
    ("special_tokens_map.json", b'"x"', "special_tokens_map.json: holds a string"),
])
def test_malformed_tokenizer_and_generation_files_are_one_line(tiny_llama_dir, tmp_path, name, content, message):
    from runner.errors import RunnerError

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / name).write_bytes(content)
    with pytest.raises(RunnerError) as caught:
        load(folder)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_folder_without_tokenizer_files_says_so(tiny_llama_dir, tmp_path):
    """The weights downloaded alone: transformers' 'Couldn't instantiate the backend tokenizer from
    one of: ...' (mlx-lm's the same, reported as unreadable weights) becomes what is missing."""
    from runner.errors import LoadError
    from runner.files import TOKENIZER_FILES

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    missing = r"m: no tokenizer in this folder \(tokenizer.json, tokenizer.model, vocab.json or tiktoken.model\)"
    with pytest.raises(LoadError, match=missing):
        load(folder)
    if importlib.util.find_spec("mlx_lm") is not None:
        from runner_mlx.convert import mlx_folder

        with pytest.raises(LoadError, match=missing):
            mlx_folder(folder, "q8")


def test_mlx_checks_the_same_files_before_converting(tiny_llama_dir, tmp_path):
    pytest.importorskip("mlx_lm")
    from runner_mlx.convert import mlx_folder

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "tokenizer_config.json").write_bytes(b"[1]")
    with pytest.raises(UserInputError, match="tokenizer_config.json: holds a list, not a JSON object"):
        mlx_folder(folder, "q8")


@pytest.mark.parametrize("changes", [
    {"hidden_act": "no_such_activation"},
    {"rope_scaling": [1]},
    {"rope_scaling": {"rope_type": "nope", "factor": 2.0}},
    {"rms_norm_eps": "small"},
], ids=lambda changes: next(iter(changes)))
def test_config_values_transformers_rejects_are_one_line(tiny_llama_dir, tmp_path, changes):
    """Values runner's plan does not read (activation, RoPE) reach transformers, which raises all
    kinds of errors about them: each is one line naming the model."""
    from runner.errors import RunnerError

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(RunnerError) as caught:
        load(folder)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(folder))


def test_a_missing_tensor_on_mlx_is_one_line_too(tiny_llama_dir, tmp_path, capsys):
    """mlx-lm's own message spans lines ("Missing 1 parameters: \\n model.layers..."): runner says it in one."""
    pytest.importorskip("mlx_lm")
    from runner.cli import main

    folder = edited_copy(tiny_llama_dir, tmp_path / "missing-mlx",
                         lambda state: state.pop("model.layers.1.mlp.up_proj.weight"))
    assert main(["generate", str(folder), "-p", "Hi", "--backend", "mlx", "--quant", "bf16", "--context", "64"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "up_proj" in line]
    assert len(errors) == 1 and errors[0].startswith("runner: error: ") and "up_proj" in errors[0], errors

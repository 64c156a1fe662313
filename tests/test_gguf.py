"""GGUF files: the header reader (runner.gguf) against the `gguf` package on the default model's real
file, the plan of a GGUF file (`runner plan file.gguf`, no weights read, no llama.cpp), and hostile
GGUF files built byte by byte here: each is one `runner: error:` line, exit 2, in bounded time."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.cli import main
from runner.default_model import gguf_file
from runner.gguf import GGML_TYPES, GgufArray, gguf_breakdown, read_gguf, spec_from_gguf
from runner.model import DEFAULT_MODEL_ID, catalog_config, load_spec, spec_from_config


# ---- the real file -------------------------------------------------------------------------------

def test_reader_agrees_with_the_gguf_package_on_the_default_model():
    import gguf

    ours = read_gguf(gguf_file())
    theirs = gguf.GGUFReader(str(gguf_file()))
    assert ours.data_start == theirs.data_offset
    assert [(t.name, t.type_name, t.shape, t.offset, t.nbytes) for t in ours.tensors] == [
        (t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.data_offset) - theirs.data_offset,
         int(t.n_bytes)) for t in theirs.tensors]
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        if isinstance(value, GgufArray):      # an array: its length (and short numeric ones' values)
            assert value.count == len(field.data), key
        else:
            assert value == pytest.approx(field.contents()), key
    assert ours.bytes_by_type() == {"Q4_1": 66355200, "Q8_0": 30081024, "F32": 140544}


def test_ggml_type_sizes_are_the_gguf_packages():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    known = {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}
    assert {k: v for k, v in GGML_TYPES.items() if k in known} == {k: v for k, v in known.items() if k in GGML_TYPES}
    for name in ("Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16", "F32", "BF16"):
        assert any(entry[0] == name for entry in GGML_TYPES.values()), name


def test_the_default_models_gguf_has_the_shape_of_its_config():
    ours = spec_from_gguf(gguf_file(), DEFAULT_MODEL_ID)
    theirs = spec_from_config(catalog_config(DEFAULT_MODEL_ID), DEFAULT_MODEL_ID, "catalog")
    fields = ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "vocab_size", "tie_embeddings", "max_context", "attention_bias")
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    assert ours.source == "gguf" and ours.parameter_count() == theirs.parameter_count()
    # the plan's weights are the file's tensors, byte for byte
    assert gguf_breakdown(ours).total == sum(t.nbytes for t in read_gguf(gguf_file()).tensors)


def test_plan_of_a_gguf_file_reads_no_weights_and_imports_nothing_heavy(tmp_path):
    code = ("import sys, json; from runner.cli import main; "
            f"code = main(['plan', {str(gguf_file())!r}, '--machine', 'cpu-64GB', '--json']); "
            "heavy = [m for m in ('torch', 'numpy', 'llama_cpp', 'gguf', 'transformers') if m in sys.modules]; "
            "print('HEAVY', heavy, code)")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert time.perf_counter() - started < 10
    data = json.loads(out[: out.rindex("HEAVY")])
    assert out.strip().endswith("HEAVY [] 0")
    plan = data["plan"]
    assert (plan["backend"], plan["quant"], plan["verdict"]) == ("llamacpp", "gguf", "fits")
    assert plan["weights_bytes"] == 96576768        # Q4_1 + Q8_0 + F32 as stored
    # the KV cache in f16: 4096 tokens x 30 layers x 2 x 3 KV heads x 64 x 2 bytes
    assert plan["kv_cache_bytes"] == 4096 * 30 * 2 * 3 * 64 * 2
    assert data["model"]["source"] == "gguf" and [s["backend"] for s in data["schemes"]] == ["llamacpp"]


def test_plan_text_of_a_gguf_in_a_folder(tmp_path, capsys):
    folder = tmp_path / "smol"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(gguf_file())
    assert main(["plan", str(folder), "--machine", "1xRTX4090"]) == 0
    out = capsys.readouterr().out
    assert "[gguf]" in out and "< gguf      llamacpp" in out and "Placement of gguf on llamacpp" in out


@pytest.mark.parametrize("argv,message", [
    (["--backend", "cuda"], "is a GGUF file: the llamacpp backend runs it as stored (--backend llamacpp --quant gguf)"),
    (["--quant", "bf16"], "is a GGUF file: the llamacpp backend runs it as stored"),
    (["--backend", "mlx", "--quant", "q4"], "the mlx backend loads safetensors folders"),
])
def test_a_gguf_file_on_another_backend_is_one_line(argv, message, capsys):
    assert main(["plan", str(gguf_file()), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_safetensors_model_on_llamacpp_is_one_line(capsys):
    assert main(["plan", "meta-llama/Llama-3.1-8B-Instruct", "--backend", "llamacpp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["runner: error: meta-llama/Llama-3.1-8B-Instruct is not a GGUF file: --quant gguf (llama.cpp) "
                   "runs GGUF files as stored; give the path of a .gguf file"]


def test_the_default_model_plans_on_llamacpp_from_its_package_file(capsys):
    assert main(["plan", "--backend", "llamacpp", "--quant", "gguf", "--machine", "cpu-64GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert (plan["backend"], plan["quant"], plan["weights_bytes"]) == ("llamacpp", "gguf", 96576768)
    assert load_spec(DEFAULT_MODEL_ID).source in ("catalog", "folder")   # the spec itself stays what it was


# ---- hostile files, byte by byte -------------------------------------------------------------------

def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, kind: int, value) -> bytes:
    body = {4: lambda v: struct.pack("<I", v), 8: _string, 7: lambda v: struct.pack("<?", v)}[kind](value)
    return _string(key) + struct.pack("<I", kind) + body


TINY_METADATA = [("general.architecture", 8, "llama"), ("llama.block_count", 4, 1), ("llama.context_length", 4, 64),
                 ("llama.embedding_length", 4, 32), ("llama.feed_forward_length", 4, 64),
                 ("llama.attention.head_count", 4, 4), ("llama.attention.head_count_kv", 4, 2)]
TINY_TENSORS = [("token_embd.weight", (32, 16)), ("blk.0.attn_q.weight", (32, 32)), ("output_norm.weight", (32,))]


def gguf_bytes(metadata=TINY_METADATA, tensors=TINY_TENSORS, *, version=3, tensor_type=0, extra_kv=b"",
               counts=None, data_bytes=None) -> bytes:
    """A little-endian GGUF v3 file with F32 tensors (or `tensor_type`), laid out as llama.cpp writes it."""
    kv = b"".join(_kv(*item) for item in metadata) + extra_kv
    table, offset = b"", 0
    for name, shape in tensors:
        size = 4
        for d in shape:
            size *= d
        table += _string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        table += struct.pack("<IQ", tensor_type, offset)
        offset += -(-size // 32) * 32
    tensor_count, kv_count = counts or (len(tensors), len(metadata) + (1 if extra_kv else 0))
    head = b"GGUF" + struct.pack("<IQQ", version, tensor_count, kv_count) + kv + table
    head += b"\0" * (-len(head) % 32)
    return head + b"\0" * (offset if data_bytes is None else data_bytes)


def test_the_byte_built_file_is_a_real_gguf(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    path.write_bytes(gguf_bytes())
    reader = gguf.GGUFReader(str(path))
    assert [t.name for t in reader.tensors] == [name for name, _ in TINY_TENSORS]
    spec = spec_from_gguf(path, "tiny")
    assert (spec.num_layers, spec.hidden_size, spec.num_kv_heads, spec.vocab_size, spec.tie_embeddings) == (1, 32, 2, 16, True)


def _without(key):
    return [item for item in TINY_METADATA if item[0] != key]


def _with(key, kind, value):
    return _without(key) + [(key, kind, value)]


HOSTILE = {
    "empty": (b"", "not a valid GGUF file (only 0 bytes)"),
    "not gguf": (b"PK\3\4" + b"\0" * 60, "not a GGUF file (it does not start with 'GGUF')"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0) + b"\0" * 16, "a big-endian file"),
    "version 1": (gguf_bytes(version=1), "version 1; runner reads little-endian GGUF version 2 or 3"),
    "cut in the tensors": (gguf_bytes()[:-40], "lies outside the file's"),
    "cut in the header": (gguf_bytes()[:100], "runs past the end of the"),
    "2**63 tensors": (gguf_bytes(counts=(1 << 63, 7)), "tensors and 7 metadata keys; runner reads at most"),
    "2**40 keys": (gguf_bytes(counts=(3, 1 << 40)), "runner reads at most"),
    "a string of 2**62 bytes": (gguf_bytes(extra_kv=_string("x") + struct.pack("<IQ", 8, 1 << 62)),
                                "claims 4,611,686,018,427,387,904 bytes"),
    "2**60 strings": (gguf_bytes(extra_kv=_string("x") + struct.pack("<IIQ", 9, 8, 1 << 60)), "strings; runner reads at most"),
    "4M strings past the end": (gguf_bytes(extra_kv=_string("x") + struct.pack("<IIQ", 9, 8, 1 << 22)),
                                "runs past the end"),
    "2**60 numbers": (gguf_bytes(extra_kv=_string("x") + struct.pack("<IIQ", 9, 4, 1 << 60)), "runs past the end"),
    "array of arrays": (gguf_bytes(extra_kv=_string("x") + struct.pack("<IIQ", 9, 9, 1)), "an array of arrays"),
    "unknown value type": (gguf_bytes(extra_kv=_string("x") + struct.pack("<I", 99)), "unknown value type 99"),
    "repeated key": (gguf_bytes(TINY_METADATA + [TINY_METADATA[1]]), "appears twice"),
    "long key on two lines": (gguf_bytes(extra_kv=_string("note\n" + "k" * 100) + struct.pack("<I", 99)),
                              "'note " + "k" * 54 + "…' has unknown value type 99"),   # one line, cut at 60
    "unknown ggml type": (gguf_bytes(tensor_type=77), "unknown ggml type 77"),
    "Q4_0 rows of 16": (gguf_bytes(tensors=[TINY_TENSORS[0], ("blk.0.attn_q.weight", (16, 64))], tensor_type=2),
                        "Q4_0 needs rows of whole blocks of 32"),
    "5 dimensions": (gguf_bytes(tensors=[("token_embd.weight", (32, 16, 1, 1, 1))]), "5 dimensions"),
    "alignment 3": (gguf_bytes(_with("general.alignment", 4, 3)), "general.alignment must be a power of two"),
    "unknown architecture": (gguf_bytes(_with("general.architecture", 8, "mamba9")), "'mamba9' is not one runner plans"),
    "no block count": (gguf_bytes(_without("llama.block_count")), "the GGUF metadata lacks llama.block_count"),
    "hidden size as text": (gguf_bytes(_with("llama.embedding_length", 8, "32")), "must be a whole number, not '32'"),
    "2**31 layers": (gguf_bytes(_with("llama.block_count", 4, 1 << 31)), "llama.block_count is 2,147,483,648; runner takes 1 to 1,024"),
    "heads not a multiple": (gguf_bytes(_with("llama.attention.head_count_kv", 4, 3)), "is not a multiple of its KV head count"),
    "layers the tensors lack": (gguf_bytes(_with("llama.block_count", 4, 2)), "says 2 layers, its tensors hold 1"),
    "no embeddings": (gguf_bytes(tensors=TINY_TENSORS[1:]), "has no token_embd.weight"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_gguf_is_one_line(case, tmp_path, capsys):
    data, message = HOSTILE[case]
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    started = time.perf_counter()
    code = main(["plan", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert time.perf_counter() - started < 5, case
    assert code == 2 and len(err) == 1 and err[0].startswith("runner: error: "), (case, err)
    assert message in err[0], (case, err[0])


def test_a_folder_of_two_ggufs_asks_which(tmp_path, capsys):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(gguf_bytes())
    assert main(["plan", str(tmp_path)]) == 2
    assert "holds 2 GGUF files (a.gguf, b.gguf): name the one to use" in capsys.readouterr().err


def test_a_changed_file_is_read_again(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes())
    assert read_gguf(path).tensors[0].shape == (32, 16)
    path.write_bytes(gguf_bytes(tensors=[("token_embd.weight", (32, 8)), *TINY_TENSORS[1:]]) + b"\0" * 7)
    assert read_gguf(path).tensors[0].shape == (32, 8)


def test_rehearse_on_llamacpp_is_one_line(capsys):
    """llama.cpp rehearses nothing (it would need random weights in the file's own types)."""
    assert main(["rehearse", "--backend", "llamacpp"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "runner: error: this command takes none of the llamacpp backend's schemes (gguf, fp16)"]

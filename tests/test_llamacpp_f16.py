"""runner_llamacpp.f16: the F16 copy of a GGUF (scheme fp16), on small GGUF files written here with
gguf-py in the types llama.cpp stores (Q4_1, Q8_0, F32, BF16). No llama.cpp needed: the copy is
checked tensor by tensor against gguf-py's own dequantization; llama.cpp running it on the real
default model is tests/test_llamacpp.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from runner.errors import CorruptWeights  # noqa: E402
from runner.gguf import read_gguf  # noqa: E402
from runner_llamacpp.f16 import copy_path, f16_copy, f16_nbytes, remove_abandoned  # noqa: E402

Q = gguf.GGMLQuantizationType


def write_gguf(path, tensors, scale=1.0):
    """A GGUF of `tensors` (name -> ggml type), values N(0, scale), with a string array and a
    chat template in its metadata as a model's file has."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    writer.add_chat_template("{{ messages }}")
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_file_type(3)
    for name, kind in tensors.items():
        values = (rng.standard_normal((8, 64)) * scale).astype(np.float32)
        if kind == Q.F32:
            writer.add_tensor(name, values)
        else:
            data = gguf.quants.quantize(values, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TENSORS = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_1, "blk.0.attn_norm.weight": Q.F32,
           "blk.0.ffn_up.weight": Q.BF16}


def test_every_quantized_tensor_becomes_its_values_in_f16(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    source = write_gguf(tmp_path / "model.Q4_1.gguf", TENSORS)
    copy = f16_copy(source)
    assert copy == copy_path(source) and copy.parent.parent == tmp_path / "home" / "cache" / "models" / "gguf-f16"
    record = json.loads((copy.parent / "runner-source.json").read_text())
    assert record == {"source": str(source.resolve()), "quant": "fp16", "conversion": 1}
    before, after = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(copy))
    for old, new in zip(before.tensors, after.tensors, strict=True):
        assert (new.name, list(new.shape)) == (old.name, list(old.shape))
        if old.tensor_type in (Q.F32, Q.BF16):          # float types: copied byte for byte
            assert new.tensor_type == old.tensor_type and bytes(new.data) == bytes(old.data)
        else:
            assert new.tensor_type == Q.F16
            expected = gguf.quants.dequantize(old.data, old.tensor_type).astype(np.float16)
            assert np.array_equal(new.data, expected), old.name
    checked = read_gguf(copy)        # runner's own checked reader takes it
    assert checked.metadata["general.file_type"] == 1
    assert checked.metadata["tokenizer.chat_template"] == "{{ messages }}"
    assert checked.metadata["tokenizer.ggml.tokens"].count == 3
    assert sum(t.nbytes for t in checked.tensors) == sum(f16_nbytes(t) for t in read_gguf(source).tensors)
    assert list(copy.parent.parent.iterdir()) == [copy.parent]      # no staging folder left


def test_a_source_changed_in_place_gets_a_new_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    source = write_gguf(tmp_path / "model.gguf", TENSORS)
    first = f16_copy(source)
    write_gguf(source, TENSORS, scale=2.0)
    os.utime(source, ns=(first.stat().st_mtime_ns + 10**9,) * 2)
    second = f16_copy(source)
    assert second != first and second.is_file()


def test_values_beyond_f16_are_refused_and_nothing_is_left(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "home"))
    source = write_gguf(tmp_path / "huge.gguf", {"token_embd.weight": Q.Q8_0}, scale=1e6)
    with pytest.raises(CorruptWeights, match=r"tensor token_embd.weight holds values beyond F16's range"):
        f16_copy(source)
    assert list(copy_path(source).parent.parent.iterdir()) == []


def test_half_written_copies_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / ".model.0123.writing-999999999"      # above any pid_max: no such process
    alive = tmp_path / f".model.0123.writing-{os.getpid()}"
    finished = tmp_path / "model.0123"
    for path in (dead, alive, finished):
        path.mkdir()
        (path / "model.F16.gguf").write_bytes(b"x")
    remove_abandoned(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, finished.name])

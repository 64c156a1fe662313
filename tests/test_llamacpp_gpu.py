"""The llamacpp backend with its layers offloaded to a CUDA GPU, through the one path (resolve,
open_session), on GGUF files written here with gguf-py: a 4-layer Llama (head size 128, SmolLM2's
real tokenizer and chat template, random weights) in F16 and in Q8_0. The plan puts every layer on
the GPU, llama.cpp allocates them there (its CUDA0 buffers, within the plan's bytes), and the
greedy reply and the logits are the CPU run's of the same file (a quantized file: close to them).

Needs a CUDA GPU and llama-cpp-python built with CUDA (LLAMA_CPP_LIB_PATH may point at the
libraries of such a build: bench/llamacpp_gpu.py builds one). Run with `pytest -m gpu`.

On the H200 (2026-12-01) this file's first model load segfaulted with a llama.cpp built by the
image's g++ (/opt/gcc, which links libstdc++ statically: the libraries exported its code); built
with -Wl,--exclude-libs,ALL (as bench/llamacpp_gpu.py now builds it) the loads pass
(bench/RESULTS.md, "Where it crashes")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp", reason="the llamacpp extra is not installed")

from runner.backend import LoadRequest, Message, Sampling  # noqa: E402
from runner.choice import open_session, resolve  # noqa: E402
from runner.cli import main  # noqa: E402
from runner.hardware import detect_machine, resolve_machine  # noqa: E402
from runner.model import load_spec  # noqa: E402
from runner_llamacpp.session import gpu_layers  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not detect_machine().gpus, reason="needs a CUDA GPU"),
    pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(), reason="llama-cpp-python built without CUDA"),
]

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, HEAD_DIM = 4, 512, 4, 2, 1024, 128
CONTEXT = 1024
QUESTION = [Message("user", "What is the capital of France?")]
Q = gguf.GGMLQuantizationType


def write_llama_gguf(path, tokenizer_dir, kind):
    """A Llama GGUF as llama.cpp's converter lays it out (names, metadata, tokenizer), random
    weights; the matrices in `kind` (F16 or Q8_0), norms F32."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    added = {token["id"]: token for token in data["added_tokens"]}
    vocab = len(data["model"]["vocab"]) + len([i for i in added if i >= len(data["model"]["vocab"])])
    tokens = [""] * vocab
    for text, index in data["model"]["vocab"].items():
        tokens[index] = text
    for index, token in added.items():
        tokens[index] = token["content"]
    types = [gguf.TokenType.CONTROL if i in added and added[i]["special"] else gguf.TokenType.NORMAL
             for i in range(vocab)]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(1 if kind == Q.F16 else 7)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab).add_to_gguf(writer, quiet=True)
    rng = np.random.default_rng(0)

    def matrix(name, rows, cols, scale):
        values = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        if kind == Q.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            packed = gguf.quants.quantize(values, kind)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)

    matrix("token_embd.weight", vocab, HIDDEN, 1.0)
    for n in range(LAYERS):
        writer.add_tensor(f"blk.{n}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{n}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        matrix(f"blk.{n}.attn_q.weight", HEADS * HEAD_DIM, HIDDEN, 0.05)
        matrix(f"blk.{n}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN, 0.05)
        matrix(f"blk.{n}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN, 0.05)
        matrix(f"blk.{n}.attn_output.weight", HIDDEN, HEADS * HEAD_DIM, 0.05)
        matrix(f"blk.{n}.ffn_gate.weight", FFN, HIDDEN, 0.05)
        matrix(f"blk.{n}.ffn_up.weight", FFN, HIDDEN, 0.05)
        matrix(f"blk.{n}.ffn_down.weight", HIDDEN, FFN, 0.05)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    matrix("output.weight", vocab, HIDDEN, 0.1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=[Q.F16, Q.Q8_0], ids=["F16", "Q8_0"])
def model_file(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-gguf")
    tokenizer = os.environ.get("RUNNER_TEST_TOKENIZER")     # a saved tokenizer folder: no transformers here
    if tokenizer is None:
        from conftest import _smollm2_tokenizer

        tokenizer = folder / "tokenizer"
        _smollm2_tokenizer().save_pretrained(str(tokenizer))
    return request.param, write_llama_gguf(folder / f"llama-4-layers.{request.param.name}.gguf",
                                           Path(tokenizer), request.param)


@pytest.fixture(scope="module")
def sessions(model_file):
    """The same file on the GPU (this machine's plan) and on the CPU (the plan for a machine without a GPU)."""
    kind, path = model_file
    spec = load_spec(str(path))
    gpu = open_session(resolve(spec, detect_machine(), None, None, CONTEXT))
    cpu = open_session(resolve(spec, resolve_machine("cpu-64GB"), None, None, CONTEXT))
    yield kind, gpu, cpu
    gpu.close()
    cpu.close()


def test_the_plan_puts_every_layer_and_the_head_on_the_gpu(model_file, capsys):
    _kind, path = model_file
    choice = resolve(load_spec(str(path)), detect_machine(), None, None, CONTEXT)
    assert (choice.backend, choice.quant) == ("llamacpp", "gguf")
    (share,) = choice.plan.placement
    assert (share.device, share.kind, share.layers, share.head) == ("cuda:0", "gpu", (0, LAYERS), True)
    request = LoadRequest(choice.spec, choice.quant, CONTEXT, plan=choice.plan)
    assert gpu_layers(request) == LAYERS + 1          # llama.cpp counts the output layer as one more
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "cuda:0" in out and f"0-{LAYERS - 1} +emb+head" in out


def test_llama_cpp_allocates_the_layers_on_the_gpu_within_the_plan(sessions):
    _kind, gpu, cpu = sessions
    assert f"all {LAYERS} layers and the output layer on the GPU" in gpu.device_summary
    assert "CPU" in cpu.device_summary and "cuda:0" not in cpu.buffers
    report = gpu.memory()
    weights = gpu.plan.placement[0].weights_bytes
    # llama.cpp keeps the input embeddings in RAM (its CPU_Mapped buffer): the layers, the head, the
    # KV cache and the compute buffer are on the GPU, within what the plan counts there
    assert report.measured["cuda:0"] <= report.planned["cuda:0"]
    assert report.measured["cuda:0"] >= weights - embedding_bytes(gpu) + gpu.kv_cache_bytes
    for session in (gpu, cpu):   # logged in MiB with 2 decimals
        assert abs(session.kv_cache_bytes - session.plan.kv_cache_bytes) < 2**20 / 100


def embedding_bytes(session) -> int:
    from runner.gguf import read_gguf

    (embedding,) = [t for t in read_gguf(session.spec.path).tensors if t.name == "token_embd.weight"]
    return embedding.nbytes


def test_greedy_reply_and_logits_are_the_cpu_runs(sessions):
    kind, gpu, cpu = sessions
    sampling = Sampling(max_tokens=24)
    ours = [c.token for c in gpu.stream(QUESTION, sampling) if c.token is not None]
    theirs = [c.token for c in cpu.stream(QUESTION, sampling) if c.token is not None]
    ids = cpu.tokenize(QUESTION) + theirs
    on_gpu, on_cpu = gpu.logits(ids), cpu.logits(ids)
    log_gpu, log_cpu = log_softmax(on_gpu), log_softmax(on_cpu)
    kl = (np.exp(log_cpu) * (log_cpu - log_gpu)).sum(-1)
    top = np.sort(on_cpu, -1)
    margin = top[:, -1] - top[:, -2]
    # the two devices round differently (CUDA multiplies Q8_0 weights by 8-bit q8_1 activations, the
    # CPU by q8_0): the argmax may differ only where the CPU's two best logits are closer than that
    # rounding, taken as 6 standard deviations of the row's logit differences
    noise = (on_gpu - on_cpu).std(-1)
    differs = on_gpu.argmax(-1) != on_cpu.argmax(-1)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    reply_row = None if first is None else len(cpu.tokenize(QUESTION)) - 1 + first
    print(kind.name, "KL mean", kl.mean(), "max", kl.max(), "greedy equal", ours == theirs, "first differing token",
          first, "noise (std) median", np.median(noise), "margin/noise where the argmax differs",
          (margin / noise)[differs].round(2).tolist(), "at the first differing token",
          None if reply_row is None else round(float(margin[reply_row] / noise[reply_row]), 2))
    assert kl.mean() < (1e-4 if kind == Q.F16 else 2e-3)
    assert (margin[differs] < 6 * noise[differs]).all()
    assert reply_row is None or margin[reply_row] < 6 * noise[reply_row]


def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

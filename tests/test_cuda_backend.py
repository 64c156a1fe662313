"""The CUDA backend, for real on the CPU: real safetensors, SmolLM2's real tokenizer, torch, and
bitsandbytes' NF4 (which runs on the CPU). A GPU test at the end is skipped without CUDA."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from runner import budget
from runner.backend import LoadRequest, Message, Sampling, get_backend
from runner.budget import make_plan
from runner.errors import DoesNotFit, LoadError, UserInputError
from runner.hardware import detect_machine, parse_machine
from runner.model import load_spec

QUESTION = [Message("user", "What is the capital of France?")]


def load(folder, quant="fp32", context=256, plan=True, **kwargs):
    spec = load_spec(str(folder))
    the_plan = make_plan(spec, detect_machine(), quant, context, backend="cuda") if plan else None
    return get_backend("cuda").load(LoadRequest(spec, quant, context, plan=the_plan, **kwargs))


@pytest.fixture(scope="module")
def tiny_fp32(tiny_llama_dir):
    session = load(tiny_llama_dir, "fp32")
    yield session
    session.close()


@pytest.fixture(scope="module")
def tiny_nf4(tiny_llama_dir):
    session = load(tiny_llama_dir, "nf4")
    yield session
    session.close()


def argmax_continuation(session, prompt: list[int], steps: int) -> list[int]:
    """The model's own greedy continuation, one full forward (no KV cache) per token."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(session.logits(ids)[-1])))
    return ids[len(prompt):]


# ---- loading --------------------------------------------------------------------------------

def test_available_without_a_gpu():
    availability = get_backend("cuda", check=False).availability()
    assert availability.ok


def test_fp32_load_places_and_measures(tiny_fp32, tiny_llama_dir):
    assert "cpu (all 2 layers)" in tiny_fp32.device_summary
    assert "no CUDA GPU" in tiny_fp32.device_summary and "sdpa attention" in tiny_fp32.device_summary
    memory = tiny_fp32.memory()
    # fp32 weights: the file's tensor bytes exactly (embeddings + lm_head + 2 layers + norms)
    file_bytes = (tiny_llama_dir / "model.safetensors").stat().st_size
    assert file_bytes - 20_000 < memory.measured["cpu"] <= file_bytes
    assert memory.measured["cpu"] == pytest.approx(memory.planned["cpu"], rel=0.01)


def test_load_reports_progress(tiny_llama_dir):
    seen = []
    session = load(tiny_llama_dir, "bf16", on_progress=seen.append)
    session.close()
    stages = [p.stage for p in seen]
    assert "starting torch and transformers" not in stages          # torch is imported in this process
    assert stages.index("checking shards") < stages.index("loading the tokenizer") < stages.index("loading weights")
    last = [p for p in seen if p.stage == "loading weights"][-1]
    assert last.unit == "bytes" and last.done == last.total > 0


def test_fresh_process_says_it_is_starting_torch(tiny_llama_dir):
    """In a fresh process the imports take seconds (18 s on the lent H100 machine): the load says so
    before anything else."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from runner.backend import LoadRequest\n"
        "from runner.model import load_spec\n"
        "from runner_cuda.loading import load_session\n"
        "assert 'torch' not in sys.modules\n"
        "stages = []\n"
        "def seen(p):\n"
        "    if not stages or stages[-1] != p.stage: stages.append(p.stage)\n"
        "load_session(LoadRequest(load_spec(sys.argv[1]), 'bf16', 64, on_progress=seen)).close()\n"
        "print('|'.join(stages))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tiny_llama_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stages = done.stdout.strip().splitlines()[-1].split("|")
    assert stages[:3] == ["starting torch and transformers", "checking shards", "loading the tokenizer"], stages


def test_nf4_quantizes_with_bf16_compute_and_measures_quant_state(tiny_nf4):
    import bitsandbytes as bnb
    import torch

    linears = [m for m in tiny_nf4.hf_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(m.compute_dtype == torch.bfloat16 for m in linears)
    assert all(m.weight.quant_state.nested for m in linears)  # double quant
    assert "nf4 (double quant, bf16 compute)" in tiny_nf4.device_summary
    memory = tiny_nf4.memory()
    # the plan counts packed 4-bit weights, their quantization state and the bf16 rest
    assert memory.measured["cpu"] == pytest.approx(memory.planned["cpu"], rel=0.02)
    # and the measure includes the quantization state that get_memory_footprint() leaves out
    assert memory.measured["cpu"] > tiny_nf4.hf_model.get_memory_footprint()


# ---- streaming ------------------------------------------------------------------------------

def test_greedy_stream_is_the_models_argmax_continuation(tiny_fp32):
    prompt = tiny_fp32.tokenize(QUESTION)
    chunks = list(tiny_fp32.stream(QUESTION, Sampling(max_tokens=8)))
    assert [c.token for c in chunks] == argmax_continuation(tiny_fp32, prompt, 8)
    last = chunks[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 8
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert last.prompt_tokens == len(prompt) and last.time_to_first_token > 0 and last.generation_tps > 0
    assert last.peak_memory >= tiny_fp32.memory().measured["cpu"]
    text = "".join(c.text for c in chunks)
    assert text == tiny_fp32.tokenizer.decode([c.token for c in chunks], skip_special_tokens=True)


def test_nf4_greedy_stream_matches_its_own_logits(tiny_nf4):
    prompt = tiny_nf4.tokenize(QUESTION)
    tokens = [c.token for c in tiny_nf4.stream(QUESTION, Sampling(max_tokens=6))]
    assert tokens == argmax_continuation(tiny_nf4, prompt, 6)


def test_cancel_between_tokens_then_stream_again(tiny_fp32):
    full = [c.token for c in tiny_fp32.stream(QUESTION, Sampling(max_tokens=10))]
    cancel = threading.Event()
    chunks = []
    for chunk in tiny_fp32.stream(QUESTION, Sampling(max_tokens=10), cancel):
        chunks.append(chunk)
        if len(chunks) == 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].token is None
    assert [c.token for c in chunks[:3]] == full[:3] and len(chunks) == 4
    # the session is intact: the same reply again, in full
    assert [c.token for c in tiny_fp32.stream(QUESTION, Sampling(max_tokens=10))] == full


def test_sampling_is_reproducible_with_a_seed(tiny_fp32):
    def sample(seed, top_p=1.0):
        return [c.token for c in tiny_fp32.stream(QUESTION, Sampling(temperature=1.0, top_p=top_p, max_tokens=8, seed=seed))]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    greedy = [c.token for c in tiny_fp32.stream(QUESTION, Sampling(max_tokens=8))]
    assert sample(3, top_p=1e-9) == greedy  # nucleus of one token: the argmax


def test_text_deltas_keep_multibyte_characters_whole(tiny_fp32):
    from runner.detokenize import ReplyText

    tokenizer = tiny_fp32.tokenizer
    text = "Café → 日本語 🙂 naïve"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # characters really are split over tokens
    decoder = ReplyText(tokenizer)
    deltas = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some token completed no character on its own


def test_eos_ids_come_from_generation_config(tiny_llama_dir, tmp_path):
    folder = tmp_path / "three-eos"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 11]}))
    session = load(folder, "bf16", plan=False)
    try:
        assert {2, 7, 11} <= session.eos_ids
    finally:
        session.close()


# ---- prefill in chunks ----------------------------------------------------------------------

SMALL_CHUNK = 16


def greedy_tokens(session, prefill_chunk: int, count: int) -> list[int]:
    """The greedy reply to QUESTION with the prompt fed `prefill_chunk` tokens per forward."""
    session.prefill_chunk = prefill_chunk
    try:
        return [c.token for c in session.stream(QUESTION, Sampling(max_tokens=count))]
    finally:
        session.prefill_chunk = budget.PREFILL_CHUNK


def test_session_prefills_in_the_plans_chunks(tiny_fp32):
    assert tiny_fp32.prefill_chunk == budget.PREFILL_CHUNK


def test_chunked_prefill_gives_the_one_forward_logits_and_reply(tiny_fp32):
    """The prompt in chunks of 16 tokens (3 chunks, the last one partial) through the cache gives
    the logits of one forward over the whole prompt, to float32 rounding, and the same reply."""
    import torch
    from transformers import DynamicCache

    from runner_cuda.session import forward_in_chunks

    prompt = tiny_fp32.tokenize(QUESTION)
    assert 2 * SMALL_CHUNK < len(prompt) and len(prompt) % SMALL_CHUNK
    ids = torch.tensor([prompt])
    model, name = tiny_fp32.hf_model, tiny_fp32._cache_argument
    config = model.config
    chunked_cache, whole_cache = DynamicCache(config=config), DynamicCache(config=config)
    chunked = forward_in_chunks(model, ids, chunked_cache, SMALL_CHUNK, name)
    whole = forward_in_chunks(model, ids, whole_cache, len(prompt), name)
    assert chunked.shape == whole.shape == (1, 1, config.vocab_size)
    assert chunked_cache.get_seq_length() == whole_cache.get_seq_length() == len(prompt)
    assert (chunked - whole).abs().max().item() < 1e-4
    assert greedy_tokens(tiny_fp32, SMALL_CHUNK, 8) == greedy_tokens(tiny_fp32, len(prompt), 8)


# ---- logits ---------------------------------------------------------------------------------

def test_logits_match_transformers_forward(tiny_fp32, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    ids = tiny_fp32.tokenize(QUESTION)
    ours = tiny_fp32.logits(ids)
    assert ours.shape == (len(ids), 49152) and ours.dtype == np.float32
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


# ---- the default model: real text ----------------------------------------------------------

def test_default_model_answers_paris_and_stops_at_eos(default_model_dir):
    session = load(default_model_dir, "fp32", context=512)
    try:
        chunks = list(session.stream(QUESTION, Sampling(max_tokens=24)))
        text = "".join(c.text for c in chunks)
        assert "Paris" in text
        # the same reply with the prompt fed in chunks of 16 tokens
        assert greedy_tokens(session, SMALL_CHUNK, 24) == [c.token for c in chunks]
        assert len(session.tokenize(QUESTION)) > 2 * SMALL_CHUNK
        assert chunks[-1].finish_reason == "stop" and chunks[-1].token == 2  # <|im_end|>
        memory = session.memory()
        assert memory.measured["cpu"] == pytest.approx(memory.planned["cpu"], rel=0.01)
        assert memory.measured["cpu"] == pytest.approx((default_model_dir / "model.safetensors").stat().st_size, rel=0.001)
    finally:
        session.close()


# ---- bad input ------------------------------------------------------------------------------

def test_prompt_longer_than_context_is_refused(tiny_fp32):
    long = [Message("user", "word " * 400)]
    with pytest.raises(UserInputError, match=r"the prompt is \d+ tokens but the context is 256"):
        tiny_fp32.stream(long, Sampling(max_tokens=4))


def test_missing_shard_is_named(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama_dir, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LoadError, match="1 of 2 weight shards missing .model-00002-of-00002.safetensors"):
        load(folder, plan=False)


def test_cut_safetensors_file_is_refused(tiny_llama_dir, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(LoadError, match="truncated or corrupt"):
        load(folder, plan=False)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(LoadError, match="not a valid safetensors file"):
        load(folder, plan=False)


def test_base_model_without_chat_template_says_so(tiny_llama_dir, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    session = load(folder, "bf16", plan=False)
    try:
        with pytest.raises(UserInputError, match="no chat template: it looks like a base model"):
            session.stream(QUESTION, Sampling(max_tokens=2))
        assert session.logits([1, 2, 3]).shape == (3, 49152)  # still fine for parity
    finally:
        session.close()


def test_quants_this_backend_does_not_have(tiny_llama_dir):
    with pytest.raises(UserInputError, match="q4 is an MLX quantization"):
        load(tiny_llama_dir, "q4", plan=False)
    with pytest.raises(UserInputError, match="fp8 needs an NVIDIA GPU with compute capability 8.9"):
        load(tiny_llama_dir, "fp8", plan=False)
    with pytest.raises(UserInputError, match="at most 256 tokens of context"):
        load(tiny_llama_dir, "fp32", context=1000, plan=False)


def test_fp8_scheme_names_the_gpu_and_the_missing_package(monkeypatch):
    """fp8's refusals, without a GPU: below compute capability 8.9 the GPU is named; without
    torchao the install command is given; with torchao the scheme is its per-row FP8 config."""
    import importlib.util

    from runner.errors import BackendUnavailable
    from runner_cuda.loading import fp8_scheme

    with pytest.raises(UserInputError, match=r"NVIDIA A100-SXM4-80GB is 8\.0: use --quant nf4"):
        fp8_scheme([("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA A100-SXM4-80GB", (8, 0))])
    h100 = [("NVIDIA H100 80GB HBM3", (9, 0))]
    if importlib.util.find_spec("torchao") is not None:
        scheme = fp8_scheme(h100)
        quant_type = scheme.quantization_config.quant_type
        assert type(quant_type).__name__ == "Float8DynamicActivationFloat8WeightConfig"
        assert [type(g).__name__ for g in quant_type.granularity] == ["PerRow", "PerRow"]
        assert "torchao" in scheme.description
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real_find_spec(name, *a))
    with pytest.raises(BackendUnavailable, match=r"fp8 needs torchao, which is not installed .*: pip install torchao"):
        fp8_scheme(h100)


def test_plan_that_needs_offload_is_refused_with_its_numbers():
    spec = load_spec("meta-llama/Llama-3.1-70B-Instruct")  # catalog: no weights, none are read
    plan = make_plan(spec, parse_machine("1xH100-80GB"), "bf16", 4096, backend="cuda")
    assert plan.verdict == "offload"
    with pytest.raises(DoesNotFit) as refusal:
        get_backend("cuda").load(LoadRequest(spec, "bf16", 4096, plan=plan))
    message = str(refusal.value)
    assert "fits only with CPU/disk offload" in message and "weights 141.11 GB" in message
    assert "options that fit: --quant nf4" in message and message.endswith("or pass --allow-offload")


# ---- on a GPU -------------------------------------------------------------------------------

@pytest.mark.gpu
def test_nf4_on_the_gpu(tiny_llama_dir):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")

    def one_session():
        session = load(tiny_llama_dir, "nf4")
        try:
            assert "cuda:0 (all 2 layers)" in session.device_summary
            memory = session.memory()
            assert memory.measured["cuda:0"] > 0 and "cpu" not in memory.measured
            prompt = session.tokenize(QUESTION)
            chunks = list(session.stream(QUESTION, Sampling(max_tokens=6)))
            assert [c.token for c in chunks] == argmax_continuation(session, prompt, 6)
            assert chunks[-1].peak_memory >= memory.measured["cuda:0"]
        finally:
            session.close()

    assert_close_gives_back_everything(torch, one_session)


@pytest.mark.gpu
def test_fp8_on_the_gpu(tiny_llama_dir):
    """torchao FP8 (compute capability 8.9+, torchao installed): decoder Linears hold Float8Tensor
    weights, lm_head stays bf16, the reply is the model's own argmax, the bytes are the plan's."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchao")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(0) < (8, 9):
        pytest.skip("no CUDA GPU of compute capability 8.9+")

    def one_session():
        session = load(tiny_llama_dir, "fp8")
        try:
            model = session.hf_model
            assert type(model.model.layers[0].mlp.down_proj.weight.data).__name__ == "Float8Tensor"
            assert model.lm_head.weight.dtype == torch.bfloat16
            # the model's own tensors (Float8Tensor: qdata + scale) are the plan's weights, to its
            # buffers (rotary inv_freq); the allocator's count also holds the fast path's static KV
            # cache, CUDA graph pool and cuBLAS workspace (+37 MB here on an H200), so it is only >=
            from runner_cuda.loading import tensor_bytes_by_device

            memory = session.memory()
            planned = memory.planned["cuda:0"]
            held = tensor_bytes_by_device(model)["cuda:0"]
            assert planned <= held <= planned + 4096
            assert memory.measured["cuda:0"] >= held
            prompt = session.tokenize(QUESTION)
            chunks = list(session.stream(QUESTION, Sampling(max_tokens=6)))
            assert [c.token for c in chunks] == argmax_continuation(session, prompt, 6)
        finally:
            session.close()

    assert_close_gives_back_everything(torch, one_session)


def assert_close_gives_back_everything(torch, one_session):
    """A second load, reply and close leaves the GPU as the first left it: close() lets go of the
    weights, the KV cache and the graphs (the fast path's decoder once kept an FP8 model's 3.1 GB).
    The first session leaves what stays by design: cuBLAS workspaces of the streams it used."""
    one_session()
    before = allocated_now(torch)
    one_session()
    after = allocated_now(torch)
    print(f"left after the first session {before / 2**20:.1f} MiB, after the second {after / 2**20:.1f} MiB")
    assert after - before < 1 << 20      # the tiny model's weights alone are 13 MB


def allocated_now(torch) -> int:
    """Bytes the CUDA allocator hands out now, after collecting garbage."""
    import gc

    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


# ---- where models come from -----------------------------------------------------------------

def test_model_in_the_hugging_face_cache_loads_offline(tiny_llama_dir, tmp_path, monkeypatch):
    """A Hugging Face id found in the HF cache (its snapshot layout) loads from there, offline."""
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = load_spec("someone/tiny-llama")
    assert spec.source == "hf-cache"
    session = get_backend("cuda").load(LoadRequest(spec, "bf16", 128))
    try:
        assert [c.token for c in session.stream(QUESTION, Sampling(max_tokens=3))]
    finally:
        session.close()


def test_model_not_downloaded_while_offline_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine has
    spec = load_spec("meta-llama/Llama-3.2-1B-Instruct")  # the catalog knows it; no weights here
    with pytest.raises(LoadError, match="not downloaded .* offline mode is on"):
        get_backend("cuda").load(LoadRequest(spec, "bf16", 1024))


def test_cpu_threads_leave_busy_cores_alone(monkeypatch):
    import os

    from runner_cuda.loading import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert cpu_threads() == 4
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 1.0, 1.0))
    assert cpu_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert cpu_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3

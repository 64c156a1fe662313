"""The CUDA fast path's CPU-checkable parts, for real: the NF4 layout read from bitsandbytes'
own packed weights, the explicit decode forward against transformers' forward, and the NF4
reload cache round trip. (The kernel and the CUDA graphs are tested in test_cuda_fast_gpu.py.)"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")


def nf4_layer(out_features: int, in_features: int, nested: bool, bias: bool = False):
    torch.manual_seed(out_features + in_features + nested)
    dense = torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.bfloat16,
                              compress_statistics=nested, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=nested)
    if bias:
        layer.bias = torch.nn.Parameter(dense.bias.data, requires_grad=False)
    return layer.to("cpu")      # bitsandbytes quantizes when the layer is moved to a device


@pytest.mark.parametrize("nested", [True, False])
def test_reference_dequantization_equals_bitsandbytes(nested):
    from runner_cuda.fast.nf4 import dequantize_reference, nf4_weight_of

    layer = nf4_layer(384, 512, nested)
    weight = nf4_weight_of(layer)
    assert weight is not None and weight.nested == nested
    theirs = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert theirs.dtype == torch.bfloat16
    assert torch.equal(dequantize_reference(weight, torch.bfloat16), theirs)


def test_reference_linear_matches_bitsandbytes_forward():
    from runner_cuda.fast.nf4 import linear_reference, nf4_weight_of

    layer = nf4_layer(256, 1024, nested=True, bias=True)
    weight = nf4_weight_of(layer)            # read before the forward: on CPU bnb repacks on first use
    x = torch.randn(1, 1024, dtype=torch.bfloat16)
    ours = linear_reference(x, weight).float()
    theirs = layer(x).float()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-2


def test_nf4_weight_of_refuses_other_layers():
    from runner_cuda.fast.nf4 import nf4_weight_of

    assert nf4_weight_of(torch.nn.Linear(64, 64)) is None
    fp4 = bnb.nn.Linear4bit(64, 64, quant_type="fp4")
    fp4.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="fp4")
    assert nf4_weight_of(fp4.to("cpu")) is None
    assert nf4_weight_of(fp4) is None


def test_mma_stages_its_loads_where_the_rows_are_long_and_the_ring_fits():
    """NF4Mma copies a warp's steps in flight into shared memory where it goes on for more than 8
    steps of 128 and the block's shared memory (table, ring, partial sums, normalized input) fits the
    GPU: on a 99 KB consumer GPU (sm_86/89) the 405B's gate/up keeps its loads in registers."""
    from runner_cuda.fast.nf4_cuda import mma_shared_bytes, mma_staged

    h200, rtx4090 = 227 * 1024, 99 * 1024
    assert mma_shared_bytes(4096, 14, norm=True) == 32768 + 14 * 64 + 128 + 2 * 4096
    assert mma_shared_bytes(4096, 14, norm=True, ring_slots=3) == mma_shared_bytes(4096, 14, norm=True) + 14 * 3 * 1024
    assert mma_shared_bytes(4096, 14, norm=True, wide_table=True) == mma_shared_bytes(4096, 14, norm=True) + 32768
    gate_up_8b = mma_shared_bytes(4096, 14, norm=True, ring_slots=3)
    assert mma_staged(4096, 1, gate_up_8b, h200) and mma_staged(4096, 1, gate_up_8b, rtx4090)
    assert not mma_staged(4096, 8, mma_shared_bytes(4096, 8, norm=True, ring_slots=5), h200)     # 4 steps a warp
    assert not mma_staged(8192, 8, mma_shared_bytes(8192, 8, norm=True, ring_slots=9), h200)     # 8: all before the wait
    gate_up_405b = mma_shared_bytes(16384, 16, norm=True, ring_slots=3)
    assert mma_staged(16384, 4, gate_up_405b, h200) and not mma_staged(16384, 4, gate_up_405b, rtx4090)


def test_nf4_mma_staging_defaults_to_the_wide_table_where_it_fits():
    """A staged warp's ring holds one more step than it has in flight, but 4 at 2 ahead for gate/up and
    8-warp blocks (as measured on an H200); the 64 KB table comes
    with staging where the block's shared memory still fits: the 8B's gate/up on an H200 (132 KB
    of 227); on a 99 KB GPU staged with the 32 KB table (83 KB); unstaged launches keep 32 KB."""
    from runner_cuda.fast.nf4_cuda import mma_slots, mma_staging

    assert [mma_slots(ahead, glu=False, warps=16) for ahead in (1, 2, 4, 8)] == [2, 3, 5, 9]
    assert mma_slots(2, glu=True, warps=14) == mma_slots(2, glu=True, warps=16) == mma_slots(2, glu=False, warps=8) == 4
    h200, rtx4090 = 227 * 1024, 99 * 1024
    gate_up_8b = dict(in_features=4096, warps=14, split=1, norm=True, slots=4)
    assert mma_staging(**gate_up_8b, limit=h200, staged=None, wide_table=None) == (True, True)
    assert mma_staging(**gate_up_8b, limit=rtx4090, staged=None, wide_table=None) == (True, False)
    assert mma_staging(**gate_up_8b, limit=h200, staged=None, wide_table=False) == (True, False)
    assert mma_staging(**gate_up_8b, limit=h200, staged=False, wide_table=None) == (False, False)
    qkv_8b = dict(in_features=4096, warps=8, split=8, norm=True, slots=8)         # 4 steps a warp
    assert mma_staging(**qkv_8b, limit=h200, staged=None, wide_table=None) == (False, False)
    assert mma_staging(**qkv_8b, limit=h200, staged=None, wide_table=True) == (False, True)


def test_nf4_mma_copies_a_long_input_into_shared_memory_and_loads_one_step_ahead():
    """Without RMSNorm (o, down) the input is copied into shared memory where a warp goes on for more
    than 8 steps (the 8B's down), and then a warp keeps one step in flight; the 8B's o (4 steps a warp,
    all loaded before the wait) and the wide shapes (70B, 405B) read it from L1; a normalized input is
    in shared memory already."""
    from types import SimpleNamespace

    from runner_cuda.fast.nf4_cuda import mma_ahead, mma_shape, mma_x_shared

    def weight(out_features, in_features):
        return [SimpleNamespace(out_features=out_features, in_features=in_features)]

    down_8b, o_8b, down_70b, o_70b = weight(4096, 14336), weight(4096, 4096), weight(8192, 28672), weight(8192, 8192)
    assert mma_shape(down_8b, glu=False) == mma_shape(o_8b, glu=False) == (16, 8)
    assert mma_shape(down_70b, glu=False) == mma_shape(o_70b, glu=False) == (16, 4)
    assert mma_x_shared(down_8b, 8, norm=False)                  # 14 steps a warp
    assert not mma_x_shared(o_8b, 8, norm=False)                 # 4
    assert not mma_x_shared(down_70b, 4, norm=False) and not mma_x_shared(o_70b, 4, norm=False)
    assert not mma_x_shared(down_8b, 8, norm=True)
    assert mma_ahead(14336, 8, overlap=True, x_shared=True) == 1
    assert mma_ahead(14336, 8, overlap=True, x_shared=False) == 2
    assert mma_ahead(4096, 8, overlap=True, x_shared=False) == 4      # all of o's steps before the wait


def _prompt(count, vocab, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count,), generator=generator).tolist()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _decoder_logits(decoder, prompt_ids, following):
    steps = [decoder.prefill(prompt_ids).clone()]
    for token in following:
        steps.append(decoder.step(token).clone())
    return torch.stack(steps)


def test_decoder_matches_transformers_forward(tiny_llama_dir):
    """Prefill then token-by-token steps with the static cache give transformers' logits."""
    from transformers import AutoModelForCausalLM

    from runner_cuda.fast.decoder import FastDecoder

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    ids = _prompt(24, model.config.vocab_size)
    expected = _hf_logits(model, ids)[9:]
    decoder = FastDecoder(model, max_len=300, use_graphs=False)
    got = _decoder_logits(decoder, ids[:10], ids[10:])
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    # a second prompt reuses the cache from position 0
    decoder.reset()
    again = _decoder_logits(decoder, ids[:10], ids[10:])
    assert torch.equal(again, got)


def test_decoder_prefills_in_chunks_as_in_one_pass(tiny_llama_dir):
    """A 34-token prompt in chunks of 16 (16, 16, 2: later chunks attend over the cache before
    them): the same logits as transformers' whole-sequence forward, and as a one-pass prefill."""
    from transformers import AutoModelForCausalLM

    from runner.budget import PREFILL_CHUNK
    from runner_cuda.fast.decoder import FastDecoder

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    assert FastDecoder(model, max_len=64, use_graphs=False).prefill_chunk == PREFILL_CHUNK
    ids = _prompt(40, model.config.vocab_size, seed=7)
    expected = _hf_logits(model, ids)[33:]
    chunked = _decoder_logits(FastDecoder(model, max_len=64, use_graphs=False, prefill_chunk=16), ids[:34], ids[34:])
    one_pass = _decoder_logits(FastDecoder(model, max_len=64, use_graphs=False, prefill_chunk=64), ids[:34], ids[34:])
    assert (chunked - expected).abs().max().item() < 1e-4
    assert (chunked - one_pass).abs().max().item() < 1e-4
    assert torch.equal(chunked.argmax(-1), one_pass.argmax(-1))


def test_fused_dense_projections_keep_the_model_and_its_memory(tiny_llama_dir):
    """q/k/v and gate/up fused into one weight each: the decoder's logits and the model's own
    forward are unchanged, and the modules' weights are views into the fused tensors."""
    from transformers import AutoModelForCausalLM

    from runner_cuda.fast.decoder import FastDecoder

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    ids = _prompt(20, model.config.vocab_size, seed=5)
    expected = _hf_logits(model, ids)
    before = sum(p.numel() for p in model.parameters())
    decoder = FastDecoder(model, max_len=64, use_graphs=False, fuse_dense=True)
    assert decoder.qkv is not None and decoder.gate_up is not None
    attn = model.model.layers[1].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == decoder.qkv[1][0].untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == before
    assert torch.equal(_hf_logits(model, ids), expected)
    got = _decoder_logits(decoder, ids[:8], ids[8:-1])
    assert (got - expected[7:-1]).abs().max().item() < 1e-4


def test_decoder_refuses_a_full_cache(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from runner_cuda.fast.decoder import FastDecoder

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    decoder = FastDecoder(model, max_len=8, use_graphs=False)
    with pytest.raises(ValueError):
        decoder.prefill(list(range(3, 11)))
    decoder.prefill(list(range(3, 10)))
    decoder.step(5)
    with pytest.raises(ValueError):
        decoder.step(5)


def test_decoder_for_is_none_without_cuda(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from runner_cuda import fast

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    assert fast.decoder_for(model, max_len=64) is None


def _load_nf4(folder, **kwargs):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=config, dtype=torch.bfloat16,
                                                device_map="cpu", **kwargs).eval()


def test_nf4_cache_round_trip_gives_identical_logits(tiny_llama_dir, runner_home):
    from runner_cuda.fast import nf4_cache

    assert nf4_cache.find(tiny_llama_dir, "nf4") is None
    quantized = _load_nf4(tiny_llama_dir)
    folder = nf4_cache.save(quantized, tiny_llama_dir, "nf4")
    assert folder.is_relative_to(runner_home)
    assert nf4_cache.find(tiny_llama_dir, "nf4") == folder
    assert nf4_cache.find(tiny_llama_dir, "fp4") is None        # another scheme is another entry
    assert not list(folder.parent.glob("*.partial-*"))

    ids = _prompt(16, quantized.config.vocab_size)
    expected = _hf_logits(quantized, ids)
    # "cpu": transformers reads the folder; {"": "cpu"}: runner's reader hands it the tensors
    for device_map in ("cpu", {"": "cpu"}):
        cached = nf4_cache.load(folder, device_map=device_map).eval()
        assert type(cached.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
        assert torch.equal(expected, _hf_logits(cached, ids))


def test_backend_loads_the_cache_through_runners_reader(tiny_llama_dir, runner_home):
    """The backend's cache path (load_weights with a cache device: runner's reader and assemble),
    on the CPU: the same logits as the model quantized on load, the reading reported in bytes, and
    a broken cache refused by the header check (the backend then quantizes again)."""
    from runner.backend import LoadRequest
    from runner.errors import CorruptWeights
    from runner.model import load_spec
    from runner_cuda.fast import nf4_cache
    from runner_cuda.loading import load_weights

    quantized = _load_nf4(tiny_llama_dir)
    folder = nf4_cache.save(quantized, tiny_llama_dir, "nf4")
    seen = []
    request = LoadRequest(load_spec(str(tiny_llama_dir)), "nf4", 64, on_progress=seen.append)
    options = dict(dtype=torch.bfloat16, device_map={"": "cpu"}, max_memory=None, attention="sdpa",
                   offload_folder=None, request=request, cache_device="cpu")
    model, failure = load_weights(str(folder), None, {}, **options)
    assert failure is None and type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ids = _prompt(16, quantized.config.vocab_size)
    assert torch.equal(_hf_logits(quantized, ids), _hf_logits(model.eval(), ids))
    size = sum(shard.stat().st_size for shard in folder.glob("*.safetensors"))
    assert seen and seen[-1].stage == "reading the NF4 cache" and seen[-1].total < size
    assert seen[-1].done == seen[-1].total
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])     # cut short
    with pytest.raises(CorruptWeights, match="truncated or corrupt"):     # the backend then quantizes again
        load_weights(str(folder), None, {}, **options)


def test_reader_gives_the_tensors_safetensors_gives(tmp_path):
    """runner's reader against safetensors' own: several dtypes, a tensor after an odd-sized one,
    pieces smaller than tensors, two files read as one queue; every tensor starts on a 256-byte
    boundary of its file's buffer, and the progress count ends at the data size of both files."""
    from safetensors.torch import load_file, save_file

    from runner_cuda.fast.nf4_cache import one_device, read_safetensors

    first = {"a_odd": torch.arange(7, dtype=torch.uint8), "b_bf16": torch.randn(33, 5).to(torch.bfloat16),
             "c_f32": torch.randn(1000), "d_i64": torch.arange(5), "e_bool": torch.tensor([True, False, True])}
    second = {"f_u8": torch.arange(301, dtype=torch.uint8) % 7, "g_f16": torch.randn(17, 3).to(torch.float16)}
    paths = [tmp_path / "1.safetensors", tmp_path / "2.safetensors"]
    save_file(first, str(paths[0]))
    save_file(second, str(paths[1]))
    seen = []
    got = read_safetensors(paths, "cpu", chunk=100, on_bytes=lambda done, total: seen.append((done, total)))
    expected = load_file(str(paths[0])) | load_file(str(paths[1]))
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name
        base = got["a_odd"] if name in first else got["f_u8"]          # a tensor of the same buffer
        assert (got[name].data_ptr() - base.data_ptr()) % 256 == 0, name
    size = sum(t.numel() * t.element_size() for t in (first | second).values())
    assert [done for done, _ in seen] == sorted(done for done, _ in seen) and seen[-1] == (size, size)
    assert read_safetensors(paths[1], "cpu").keys() == second.keys()
    assert one_device({"": 0}) == "cuda:0" and one_device({"model.layers.0": 1, "lm_head": 1}) == "cuda:1"
    assert one_device({"model.layers.0": 0, "lm_head": "cpu"}) is None and one_device("auto") is None


def test_nf4_cache_refuses_cpu_repacked_weights(tiny_llama_dir, tmp_path):
    from runner_cuda.fast import nf4_cache

    model = _load_nf4(tiny_llama_dir)
    _hf_logits(model, [5, 6, 7])      # the first CPU forward may repack (AVX512-BF16 machines)
    repacked = any(getattr(getattr(m, "weight", None), "quant_state", None) is not None
                   and getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.modules())
    if not repacked:
        pytest.skip("bitsandbytes did not repack on this CPU")
    with pytest.raises(ValueError, match="repacked"):
        nf4_cache.save(model, tiny_llama_dir, "nf4")


def test_nf4_cache_is_stale_after_the_checkpoint_changes(tiny_llama_dir, tmp_path):
    import shutil

    from runner_cuda.fast import nf4_cache

    source = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, source)
    nf4_cache.save(_load_nf4(source), source, "nf4")
    assert nf4_cache.find(source, "nf4") is not None
    weights = next(source.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())           # same bytes, new modification time
    import os

    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert nf4_cache.find(source, "nf4") is None


def test_decoder_on_nf4_model_matches_its_forward(tiny_llama_dir):
    """The explicit decode forward over bitsandbytes' own NF4 modules (the CPU path)."""
    from runner_cuda.fast.decoder import FastDecoder

    model = _load_nf4(tiny_llama_dir)
    ids = _prompt(20, model.config.vocab_size, seed=3)
    expected = _hf_logits(model, ids)[7:]
    decoder = FastDecoder(model, max_len=64, use_graphs=False)
    got = _decoder_logits(decoder, ids[:8], ids[8:])
    # bfloat16 activations: the one-token and the whole-prompt paths round differently
    relative = ((got - expected).norm() / expected.norm()).item()
    print("relative error", relative)
    assert relative < 1e-2       # transformers itself, cached vs whole prompt: 0.65 % here
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9


def test_session_with_fast_steps_streams_the_same_reply(tiny_llama_dir):
    """The adapter the backend attaches on CUDA (FastSteps: new_cache / forward_step), run here
    eagerly on the CPU inside the real CudaSession: the same greedy reply as the ordinary loop,
    twice in a row (the static cache restarts from position 0)."""
    from runner.backend import LoadRequest, Message, Sampling, get_backend
    from runner.model import load_spec
    from runner_cuda.fast import FastSteps
    from runner_cuda.fast.decoder import FastDecoder

    session = get_backend("cuda").load(LoadRequest(load_spec(str(tiny_llama_dir)), "fp32", 128))
    try:
        question = [Message("user", "What is the capital of France?")]
        ordinary = [c.token for c in session.stream(question, Sampling(max_tokens=8))]
        steps = FastSteps(FastDecoder(session.hf_model, session.context, use_graphs=False))
        session.use_steps(steps)
        first = [c.token for c in session.stream(question, Sampling(max_tokens=8))]
        second = [c.token for c in session.stream(question, Sampling(max_tokens=8))]
        assert first == ordinary and second == ordinary
    finally:
        session.close()


def test_decoder_refuses_int8_projections(tiny_llama_dir):
    """LLM.int8 layers synchronise with the host inside their forward: no graphs for them."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from runner_cuda.fast.decoder import FastDecoder, Unsupported

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 device_map="cpu").eval()
    with pytest.raises(Unsupported, match="Linear8bitLt"):
        FastDecoder(model, max_len=64, use_graphs=False)


def test_close_releases_the_fast_decoder(tiny_llama_dir):
    """close() must drop the attached fast steps: their decoder holds the static KV cache, the CUDA
    graphs and views of the weights (on a GPU, an FP8 session kept ~3.1 GB after close without this)."""
    import gc
    import weakref

    from runner.backend import LoadRequest, get_backend
    from runner.model import load_spec
    from runner_cuda.fast import FastSteps
    from runner_cuda.fast.decoder import FastDecoder

    session = get_backend("cuda").load(LoadRequest(load_spec(str(tiny_llama_dir)), "fp32", 64))
    decoder = FastDecoder(session.hf_model, session.context, use_graphs=False)
    steps = FastSteps(decoder)
    session.use_steps(steps)
    gone = weakref.ref(decoder)
    del decoder, steps
    session.close()
    gc.collect()
    assert gone() is None

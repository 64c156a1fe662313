"""The memory arithmetic, placement and verdicts of runner.budget (pure Python)."""

from __future__ import annotations

import dataclasses

import pytest

from runner import budget
from runner.backend import all_quants
from runner.budget import DOES_NOT_FIT, FITS, OFFLOAD, make_plan, recommend, weights_bytes
from runner.errors import UserInputError
from runner.hardware import Device, Host, Machine, parse_machine
from runner.model import Linear, load_spec

L405 = "meta-llama/Llama-3.1-405B-Instruct"


@pytest.fixture(scope="module")
def llama405():
    return load_spec(L405)


# ---- the figures -------------------------------------------------------------------

def test_llama_405b_weights_and_kv(llama405):
    assert weights_bytes(llama405, "bf16") == 811_706_777_600
    assert round(weights_bytes(llama405, "nf4") / 1e9, 1) == 215.6
    assert round(weights_bytes(llama405, "nf4-nodq") / 1e9, 1) == 234.3
    assert llama405.kv_bytes_per_token(2) == 516_096
    assert budget.kv_cache_bytes(llama405, 8192, 1, "bf16") == 516_096 * 8192
    assert budget.kv_cache_bytes(llama405, 8192, 4, "bf16") == 516_096 * 8192 * 4
    assert budget.kv_cache_bytes(llama405, 1000, 1, "fp32") == 2 * 516_096 * 1000


def test_scheme_sizes_in_order(llama405):
    sizes = {q: weights_bytes(llama405, q) for q in all_quants() if q != "gguf"}
    assert sizes["fp32"] == 2 * sizes["bf16"] == 2 * sizes["fp16"]
    assert sizes["nf4"] == sizes["fp4"] < sizes["q4"] < sizes["nf4-nodq"] < sizes["fp8"] < sizes["q8"] < sizes["bf16"]


# ---- one Linear, by hand ---------------------------------------------------------------------

def test_linear_bytes_by_hand():
    linear = Linear("q", 4096, 4096)
    n = 4096 * 4096
    assert budget.linear_bytes(linear, "bf16") == 2 * n
    assert budget.linear_bytes(linear, "int8") == n + 4096 * 4
    assert budget.linear_bytes(linear, "fp8") == n + 4096 * 4       # torchao: one fp32 scale per row
    assert budget.linear_bytes(Linear("odd", 4100, 4096), "fp8") == 4100 * 4096 * 2   # not /16: stays bf16
    blocks = n // 64
    assert budget.linear_bytes(linear, "nf4-nodq") == n // 2 + blocks * 4 + 64
    assert budget.linear_bytes(linear, "nf4") == n // 2 + blocks + 64 + 4 + (blocks // 256) * 4 + 1024
    assert budget.linear_bytes(linear, "q4", 2) == n // 2 + 2 * 4096 * 64 * 2
    assert budget.linear_bytes(linear, "q8", 2) == n + 2 * 4096 * 64 * 2
    with_bias = Linear("k", 1024, 4096, bias=True)
    assert budget.linear_bytes(with_bias, "nf4") - budget.linear_bytes(Linear("k", 1024, 4096), "nf4") == 1024 * 2


def test_unknown_quant_is_a_user_error(llama405):
    with pytest.raises(UserInputError, match="unknown quantization"):
        weights_bytes(llama405, "int3")


# ---- overhead: one prefill chunk ------------------------------------------------------------

def test_prefill_overhead_is_one_chunk_with_last_position_logits_on_cuda(llama405):
    """The CUDA session prefills in PREFILL_CHUNK-token chunks and computes the lm_head for each
    chunk's last position only; mlx-lm computes a whole chunk's logits."""
    activations = budget.activation_bytes(llama405, 8192, 1, "nf4")
    assert activations == budget.activation_bytes(llama405, budget.PREFILL_CHUNK, 1, "nf4")
    # 2048 tokens x (2 x hidden + q/o + k/v + 3 x intermediate) x bf16, + one dequantized MLP matrix
    width = 2 * 16384 + 2 * 128 * 128 + 2 * 8 * 128 + 3 * 53248
    assert activations == 2048 * width * 2 + 53248 * 16384 * 2
    vocab = 128256
    assert budget.logits_bytes(llama405, 1) == vocab * (2 + 4)
    cuda = make_plan(llama405.with_layers(8), parse_machine("1xH200"), "nf4", 8192, backend="cuda")
    (share,) = cuda.placement
    assert share.overhead_bytes == budget.CUDA_CONTEXT_BYTES + activations + vocab * 6


# ---- placement -------------------------------------------------------------------------------

def _layers_once(plan):
    covered = [layer for share in plan.placement for layer in range(*share.layers)]
    return covered == list(range(plan.model.num_layers))


def test_405b_nf4_fits_four_a100s(llama405):
    plan = make_plan(llama405, parse_machine("4xA100-80GB"), "nf4", 8192)
    assert plan.verdict == FITS
    assert [s.device for s in plan.placement] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert _layers_once(plan)
    assert plan.placement[0].embeddings and plan.placement[-1].head
    for share in plan.placement:
        assert share.total_bytes <= share.capacity_bytes
        assert share.overhead_bytes >= budget.CUDA_CONTEXT_BYTES
    # balanced like accelerate's "auto": no GPU holds more than a few layers more than another
    counts = [s.num_layers for s in plan.placement]
    assert max(counts) - min(counts) <= 4
    assert plan.kv_cache_bytes == 516_096 * 8192
    assert plan.weights_bytes == weights_bytes(llama405, "nf4")
    # roofline: 4 A100s read ~216 GB one after another at 2039 GB/s: about 9 tokens/s
    assert 8 < plan.roofline_tokens_per_s < 10
    assert not [w for w in plan.warnings if "OFFLOAD" in w]


def test_405b_on_eight_4090s_offloads_and_says_how_slow(llama405):
    plan = make_plan(llama405, parse_machine("8xRTX4090"), "nf4", 8192)
    assert plan.verdict == OFFLOAD
    cpu = [s for s in plan.placement if s.kind == "cpu"]
    assert cpu and _layers_once(plan)
    # bitsandbytes keeps offloaded layers unquantized (bf16)
    bf16_layer = weights_bytes(llama405.with_layers(2), "bf16") - weights_bytes(llama405.with_layers(1), "bf16")
    assert plan.layer_bytes * 3 < bf16_layer
    cpu_layers = cpu[0].num_layers
    assert cpu[0].weights_bytes >= cpu_layers * bf16_layer
    offload_warning = next(w for w in plan.warnings if w.startswith("OFFLOAD"))
    assert "PCIe" in offload_warning and "tok/s" in offload_warning
    assert plan.roofline_tokens_per_s < 1


def test_405b_bf16_on_one_h100_spills_to_disk(llama405):
    plan = make_plan(llama405, parse_machine("1xH100-80GB"), "bf16", 4096)
    assert plan.verdict == OFFLOAD
    assert [s.kind for s in plan.placement] == ["gpu", "cpu", "disk"]
    assert any("DISK" in w for w in plan.warnings)


def test_does_not_fit_when_even_disk_is_too_small(llama405):
    plan = make_plan(llama405, parse_machine("1xRTX4090,ram=64GB,disk=100GB"), "bf16", 4096)
    assert plan.verdict == DOES_NOT_FIT
    assert plan.placement == ()
    with pytest.raises(ValueError):
        plan.device_map()


def test_two_mac_studios_pipeline_and_tensor_parallel(llama405):
    macs = parse_machine("2xM2Ultra-192GB")
    plan = make_plan(llama405, macs, "q4", 4096)
    assert plan.backend == "mlx" and plan.verdict == FITS and plan.parallel == "pipeline"
    assert [s.device for s in plan.placement] == ["mac1:metal", "mac2:metal"]
    assert _layers_once(plan)
    assert any("tensor parallel over 2 hosts works" in n for n in plan.notes)
    assert make_plan(llama405, macs, "q8", 4096).verdict == DOES_NOT_FIT
    tensor = make_plan(llama405, macs, "q4", 4096, parallel="tensor")
    assert tensor.parallel == "tensor" and tensor.verdict == FITS
    # both hosts read their half at once: about twice the pipeline's speed
    assert tensor.roofline_tokens_per_s > 1.8 * plan.roofline_tokens_per_s


def test_tensor_parallel_refused_when_heads_do_not_divide(llama405):
    three = parse_machine("3xM2Ultra-192GB")   # 8 KV heads do not divide by 3
    plan = make_plan(llama405, three, "q4", 4096)
    assert any("does not work" in n for n in plan.notes)
    with pytest.raises(UserInputError, match="do not divide"):
        make_plan(llama405, three, "q4", 4096, parallel="tensor")


def test_mac_above_working_set_warns_with_sysctl():
    model = load_spec("meta-llama/Llama-3.1-70B-Instruct")
    plan = make_plan(model, parse_machine("M2Ultra-192GB"), "bf16", 4096)
    # 141 GB of bf16 weights: above 0.9 x the 154.6 GB working set, below the 206 GB of RAM
    assert plan.verdict == OFFLOAD
    warning = next(w for w in plan.warnings if "iogpu.wired_limit_mb" in w)
    assert "sudo sysctl iogpu.wired_limit_mb=" in warning and "freeze" in warning


def test_cpu_only_machine_places_everything_on_cpu():
    model = load_spec("meta-llama/Llama-3.1-8B-Instruct")
    plan = make_plan(model, parse_machine("cpu-64GB"), "bf16", 4096)
    assert plan.verdict == FITS
    assert [s.device for s in plan.placement] == ["cpu"]
    assert set(plan.device_map().values()) == {"cpu"}
    assert plan.max_memory() == {"cpu": plan.placement[0].weights_bytes + model.head_dim * 4 + plan.largest_module_bytes}


def test_fp8_counts_as_bf16_where_transformers_dequantizes_it(llama405):
    a100 = make_plan(llama405, parse_machine("4xA100-80GB"), "fp8", 4096)   # compute capability 8.0
    h100 = make_plan(llama405, parse_machine("8xH100-80GB"), "fp8", 4096)   # 9.0
    assert h100.weights_bytes == weights_bytes(llama405, "fp8")
    assert a100.weights_bytes >= weights_bytes(llama405, "bf16")
    assert any("dequantizes" in w for w in a100.warnings)
    assert any("torchao" in w for w in h100.warnings)


def test_swap_in_use_warns():
    host = Host("box", "linux", 16 * 10**9, 8 * 10**9, 8 * 10**9, 3 * 10**9, 10**12, ())
    plan = make_plan(load_spec(None), Machine((host,), "this machine"), "fp32", 2048)
    assert any(w.startswith("swap in use") for w in plan.warnings)


@pytest.mark.parametrize("context", [0, -5, 10**9])
def test_bad_context_is_a_user_error(llama405, context):
    with pytest.raises(UserInputError, match="--context"):
        make_plan(llama405, parse_machine("4xA100-80GB"), "nf4", context)


def test_quant_backend_mismatch_is_a_user_error(llama405):
    with pytest.raises(UserInputError, match="mlx backend takes"):
        make_plan(llama405, parse_machine("4xA100-80GB"), "nf4", 4096, backend="mlx")
    with pytest.raises(UserInputError, match="not a cuda scheme"):
        make_plan(llama405, parse_machine("4xA100-80GB"), "q4", 4096, backend="cuda")


# ---- what transformers / accelerate get --------------------------------------------------------

def test_device_map_names_every_module_of_transformers_llama():
    """Keys are real module names of transformers' LlamaForCausalLM and cover every tensor."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = load_spec(None).with_layers(3)   # SmolLM2's widths, 3 layers
    config = LlamaConfig(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                         num_hidden_layers=3, num_attention_heads=spec.num_heads,
                         num_key_value_heads=spec.num_kv_heads, vocab_size=spec.vocab_size,
                         tie_word_embeddings=spec.tie_embeddings)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    plan = make_plan(spec, parse_machine("2xRTX4090"), "bf16", 2048)
    device_map = plan.device_map()
    modules = dict(model.named_modules())
    assert all(name in modules for name in device_map)
    tensors = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for name in tensors:
        assert any(name.startswith(key + ".") for key in device_map), name
    assert device_map["lm_head"] == device_map["model.embed_tokens"]   # SmolLM2 ties them


def _toy_machine(gpus: int, gib_each: float) -> Machine:
    total = int(gib_each * 1024**3)
    devices = tuple(Device(f"cuda:{i}", "toy", "cuda", total, total, 1e12, (9, 0)) for i in range(gpus))
    return Machine((Host("box", "linux", 4 * 1024**3, 4 * 1024**3, 0, 0, 10**12, devices),), "toy", True)


@pytest.mark.parametrize("gpus,gib_each", [(2, 0.62), (3, 0.6), (1, 0.524)])
def test_accelerate_reproduces_the_plan_from_max_memory(gpus, gib_each):
    """accelerate.infer_auto_device_map(max_memory=plan.max_memory()) == plan.device_map() (bf16)."""
    import torch
    from accelerate import infer_auto_device_map
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dataclasses.replace(load_spec("meta-llama/Llama-3.2-1B-Instruct"), hidden_size=256, num_heads=4,
                               num_kv_heads=2, head_dim=64, intermediate_size=512, vocab_size=4000,
                               num_layers=12, tie_embeddings=False)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4000, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    # 500 MiB of CUDA context leaves room for a few 2.4 MB layers per toy GPU
    plan = make_plan(spec, _toy_machine(gpus, gib_each), "bf16", 64)
    assert plan.verdict == (OFFLOAD if gpus == 1 else FITS)
    assert len(set(plan.device_map().values())) > 1   # really split (GPUs, or GPU and CPU)
    found = infer_auto_device_map(model, max_memory=plan.max_memory(),
                                  no_split_module_classes=["LlamaDecoderLayer"], dtype=torch.bfloat16)
    assert dict(found) == plan.device_map()


# ---- recommendation --------------------------------------------------------------------------

def test_recommendations_follow_the_measured_facts(llama405):
    smol = load_spec(None)
    cpu = recommend(smol, parse_machine("cpu-16GB"))
    if (cpu.backend, cpu.quant) != ("llamacpp", "fp16"):    # llama.cpp's F16 copy where it is installed
        assert (cpu.backend, cpu.quant) == ("cuda", "fp32") and "16 tok/s" in cpu.reason
    mac = recommend(smol, parse_machine("M2Max-32GB"))
    assert (mac.backend, mac.quant) == ("mlx", "bf16")
    # small models never get 4-bit
    assert "q4" not in [q for _, q, _ in budget.candidate_schemes(smol, parse_machine("M1-8GB"))]
    gpu = recommend(load_spec("meta-llama/Llama-3.1-8B-Instruct"), parse_machine("1xRTX4090"))
    assert (gpu.backend, gpu.quant) == ("cuda", "bf16") and gpu.max_context >= 4096
    big = recommend(load_spec("meta-llama/Llama-3.1-70B-Instruct"), parse_machine("1xH100-80GB"))
    assert (big.backend, big.quant) == ("cuda", "nf4")
    a100 = recommend(llama405, parse_machine("4xA100-80GB"), 8192)
    assert a100.quant == "nf4" and a100.plan.verdict == FITS and a100.max_context == llama405.max_context
    t4 = recommend(load_spec("meta-llama/Llama-3.2-1B-Instruct"), parse_machine("1xT4"))
    assert t4.quant == "fp16"   # no bfloat16 before compute capability 8.0


def test_max_context_is_the_edge_of_fitting(llama405):
    macs = parse_machine("2xM2Ultra-192GB")
    edge = budget.max_context_that_fits(llama405, macs, "q4", "mlx")
    assert 1 < edge < llama405.max_context
    assert make_plan(llama405, macs, "q4", edge).verdict == FITS
    assert make_plan(llama405, macs, "q4", edge + 1).verdict != FITS


def test_article_setups(llama405):
    verdicts = {label: rec.plan.verdict for label, rec in budget.article_setups(llama405, 8192)}
    assert verdicts == {"4x A100 80GB": FITS, "8x RTX 4090 24GB": OFFLOAD, "2x Mac Studio M2 Ultra 192GB": FITS}

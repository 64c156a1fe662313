"""Each scheme's weight bytes in budget.py against the real library, on a tiny real model.

A tiny random LlamaForCausalLM is saved as safetensors to a tmp folder, its ModelSpec is read from
that folder's config.json, and then:
  - transformers loads it in bf16 / fp32 and with bitsandbytes nf4 (with and without double
    quant), fp4 and int8 on the CPU (bitsandbytes 0.50 runs there); we sum the bytes of every
    parameter and of every quantization-state tensor (absmax, nested absmax, code, offset, SCB);
  - mlx-lm builds the same model and quantizes it with its own quantize_model (q4, q8, group 64);
    we sum tree_flatten(model.parameters()) nbytes;
  - FP8 (torchao, per-row): torchao quantizes only on a GPU of compute capability 8.9+, so the
    Linears are converted with torchao's own Float8Tensor.from_hp (what the config calls), lm_head
    skipped as transformers' quantizer does, and their bytes summed (skipped without torchao).
The budget must equal each number exactly.

The dimensions are chosen to exercise the padding: q_proj has 36,864 weights = 576 absmax blocks
= 2.25 nested blocks of 256.
"""

from __future__ import annotations

import json

import pytest

from runner.budget import weights_bytes
from runner.model import load_spec

TINY = dict(
    hidden_size=192, intermediate_size=320, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
    vocab_size=1000, max_position_embeddings=512,
)


def _save_tiny(folder, tie: bool, **changes):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, **changes}, tie_word_embeddings=tie)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny"), request.param)


def torch_bytes(model) -> int:
    """Bytes of every parameter and bitsandbytes quantization-state tensor, each counted once."""
    tensors = {}

    def add(tensor):
        if tensor is not None:
            tensors[(tensor.data_ptr(), tensor.numel(), str(tensor.dtype))] = tensor.numel() * tensor.element_size()

    for parameter in model.parameters():  # tied weights come once
        add(parameter)
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
            add(state.offset)
            if state.nested:
                add(state.state2.absmax)
                add(state.state2.code)
        add(getattr(parameter, "SCB", None))
    return sum(tensors.values())


def test_bf16_and_fp32_match_transformers(tiny):
    import torch
    from transformers import LlamaForCausalLM

    spec = load_spec(str(tiny))
    for dtype, quant in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        model = LlamaForCausalLM.from_pretrained(tiny, dtype=dtype, device_map="cpu")
        assert torch_bytes(model) == weights_bytes(spec, quant, "cuda"), quant


@pytest.mark.parametrize("quant", ["nf4", "nf4-nodq", "fp4", "int8"])
def test_bitsandbytes_matches_the_budget(tiny, quant):
    import torch
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if quant == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4" if quant == "fp4" else "nf4",
            bnb_4bit_use_double_quant=quant != "nf4-nodq",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = LlamaForCausalLM.from_pretrained(tiny, quantization_config=config, dtype=torch.bfloat16, device_map="cpu")
    # the layers really are quantized (else the test would compare bf16 with bf16)
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.dtype == (torch.int8 if quant == "int8" else torch.uint8)
    assert model.lm_head.weight.dtype == torch.bfloat16
    spec = load_spec(str(tiny))
    assert torch_bytes(model) == weights_bytes(spec, quant, "cuda")
    # transformers' own footprint misses the quantization state: the budget is right to count it
    assert model.get_memory_footprint() < weights_bytes(spec, quant, "cuda")


def test_fp8_matches_torchao_float8_format(tiny):
    """runner's fp8 is torchao's Float8DynamicActivationFloat8WeightConfig(PerRow): each decoder
    Linear becomes a Float8Tensor (e4m3 qdata + fp32 scale per output row); transformers' torchao
    quantizer converts nn.Linear only and skips lm_head. Quantizing through transformers needs a
    GPU of compute capability 8.9+ (torchao asserts it), so the Linears are converted here with
    the same Float8Tensor.from_hp the config calls."""
    pytest.importorskip("torchao")
    import torch
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    total, seen = 0, set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            weight = Float8Tensor.from_hp(module.weight.data, granularity=PerRow())
            assert weight.qdata.dtype == torch.float8_e4m3fn
            assert tuple(weight.scale.shape) == (module.out_features, 1) and weight.scale.dtype == torch.float32
            total += weight.qdata.nbytes + weight.scale.nbytes
        else:
            for parameter in module.parameters(recurse=False):  # a tied lm_head is the embedding
                if parameter.data_ptr() not in seen:
                    seen.add(parameter.data_ptr())
                    total += parameter.numel() * parameter.element_size()
    assert total == weights_bytes(load_spec(str(tiny)), "fp8", "cuda")


def _mlx_model(folder):
    import mlx.core as mx
    from mlx_lm.models import llama

    config = json.loads((folder / "config.json").read_text())
    args = llama.ModelArgs.from_dict({**config, "rms_norm_eps": 1e-5})
    model = llama.Model(args)
    model.set_dtype(mx.bfloat16)
    return model


@pytest.mark.parametrize("quant,bits", [("q4", 4), ("q8", 8)])
def test_mlx_quantize_matches_the_budget(tiny, quant, bits):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model

    model, _ = quantize_model(_mlx_model(tiny), {}, group_size=64, bits=bits)
    params = dict(tree_flatten(model.parameters()))
    assert params["model.embed_tokens.weight"].dtype == mx.uint32  # embeddings quantized too
    real = sum(value.nbytes for value in params.values())
    assert real == weights_bytes(load_spec(str(tiny)), quant, "mlx")


def test_mlx_leaves_layers_whose_width_is_not_a_multiple_of_the_group(tmp_path):
    """intermediate 100: down_proj's input is not a multiple of 64, so mlx-lm keeps it in bf16."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model

    folder = _save_tiny(tmp_path / "odd", tie=False, intermediate_size=100)
    model, _ = quantize_model(_mlx_model(folder), {}, group_size=64, bits=4)
    params = dict(tree_flatten(model.parameters()))
    assert "model.layers.0.mlp.down_proj.scales" not in params
    assert sum(v.nbytes for v in params.values()) == weights_bytes(load_spec(str(folder)), "q4", "mlx")


def test_bitsandbytes_leaves_mixtral_experts_in_bf16(tmp_path):
    """transformers 5 fuses Mixtral's experts into 3D tensors; bitsandbytes quantizes only nn.Linear."""
    import torch
    from transformers import BitsAndBytesConfig, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=500, num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "moe")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = MixtralForCausalLM.from_pretrained(tmp_path / "moe", quantization_config=quantization,
                                               dtype=torch.bfloat16, device_map="cpu")
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert torch_bytes(model) == weights_bytes(load_spec(str(tmp_path / "moe")), "nf4", "cuda")

"""Which split works and how much each host holds: pure arithmetic, checked before any launch."""

from __future__ import annotations

import pytest

from runner.errors import DoesNotFit, UserInputError
from runner.model import load_spec
from runner_mlx.split import LaunchHost, choose_split, pipeline_ranges, plan_hosts

GB = 1024**3
STUDIO = LaunchHost("mac-studio", "10.0.0.1", False, 192 * GB, "darwin")
MINI = LaunchHost("mac-pro", "10.0.0.2", False, 128 * GB, "darwin")


def test_pipeline_ranges_are_contiguous_proportional_and_never_empty():
    assert pipeline_ranges(30, [1, 1]) == [(0, 15), (15, 30)]
    assert pipeline_ranges(80, [192, 128]) == [(0, 48), (48, 80)]
    assert pipeline_ranges(3, [1000, 1, 1]) == [(0, 1), (1, 2), (2, 3)]
    assert pipeline_ranges(7, [1, 1, 1]) == [(0, 3), (3, 5), (5, 7)]


def test_smollm2_cannot_use_the_tensor_split_over_two_hosts():
    spec = load_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    split, why = choose_split(spec, "q8", 2, "auto")
    assert split == "pipeline"
    assert "9 attention heads and 3 KV heads do not divide among 2 hosts" in why
    with pytest.raises(UserInputError, match="the tensor split does not work: 9 attention heads .*; use --split pipeline"):
        choose_split(spec, "q8", 2, "tensor")


def test_llama_70b_takes_the_tensor_split_when_heads_divide():
    spec = load_spec("meta-llama/Llama-3.1-70B-Instruct")
    assert choose_split(spec, "q4", 2, "auto")[0] == "tensor"
    assert choose_split(spec, "q4", 3, "auto")[0] == "pipeline"     # 64 heads / 3


def test_quantized_tensor_slices_must_be_whole_groups():
    spec = load_spec("meta-llama/Llama-3.2-1B-Instruct")       # 32 heads x 64 = 2048 columns
    assert choose_split(spec, "q4", 2, "auto")[0] == "tensor"
    from dataclasses import replace

    narrow = replace(spec, num_heads=4, num_kv_heads=2, head_dim=16)   # 64 columns / 2 = 32 < a group
    assert choose_split(narrow, "bf16", 2, "auto")[0] == "tensor"
    assert "not a whole number of 64-wide quantization groups" in choose_split(narrow, "q4", 2, "auto")[1]


def test_a_192_and_a_128_gb_mac_share_405b_where_an_even_split_would_not_fit():
    spec = load_spec("meta-llama/Llama-3.1-405B-Instruct")
    big, small = plan_hosts(spec, "q4", 32768, [STUDIO, MINI], "pipeline")
    assert big.layers == (0, 76) and small.layers == (76, 126)
    assert big.total_bytes <= big.capacity_bytes and small.total_bytes <= small.capacity_bytes
    # the same arithmetic with 63 layers each: the smaller Mac would be over its usable memory
    per_layer = (big.total_bytes - small.total_bytes) / (76 - 50)
    assert small.total_bytes + (63 - 50) * per_layer > small.capacity_bytes
    with pytest.raises(DoesNotFit, match="does not fit these hosts with the pipeline split: mac-studio: layers"):
        plan_hosts(spec, "bf16", 4096, [STUDIO, MINI], "pipeline")


def test_launch_defaults_to_8_bit_for_small_models_and_4_bit_for_big_ones():
    from runner_mlx.launch_command import default_quant

    assert default_quant(None) == "q8"  # SmolLM2-135M: 4-bit answers garbage
    assert default_quant("meta-llama/Llama-3.1-405B-Instruct") == "q4"

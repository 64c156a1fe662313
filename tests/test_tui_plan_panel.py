"""What the plan panel and the banner say, for real plans of catalog models on described machines."""

from runner.backend import MemoryReport
from runner.budget import make_plan
from runner.hardware import parse_machine
from runner.model import load_spec
from runner.tui.widgets.banner import pressure_warning
from runner.tui.widgets.plan_panel import BAR_WIDTH, device_bar, render_plan

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"


def plan(model, machine, quant, backend=None):
    return make_plan(load_spec(model), parse_machine(machine), quant, 4096, backend=backend)


def test_bars_keep_their_width_and_show_small_parts():
    p = plan("HuggingFaceTB/SmolLM2-135M-Instruct", "1xH100", "bf16")   # tiny parts of a big GPU
    [share] = p.placement
    bar = device_bar(share)
    assert len(bar.plain) == BAR_WIDTH
    assert bar.plain.count("█") >= 3    # weights, KV cache and overhead each visible
    full = device_bar(plan("meta-llama/Llama-3.1-70B-Instruct", "1xRTX4090", "nf4").placement[0])
    assert len(full.plain) == BAR_WIDTH


def test_render_plan_shows_verdict_parts_and_measured_memory():
    p = plan(LLAMA_8B, "1xRTX4090", "bf16")
    text = render_plan(p, MemoryReport(measured={"cuda:0": 17_000_000_000})).plain
    assert "cuda:0" in text and "weights" in text and "KV cache" in text and "overhead" in text
    assert "✔ fits" in text
    assert "measured 17.0 GB" in text
    # the roofline reads the whole context's KV cache per token (`runner plan`'s footnote): say so
    assert "✔ fits · needs 17.4 GB · at most ~61 tokens/s at a full context\n" in text + "\n"


def test_banner_for_offload_and_for_unified_memory_pressure():
    assert "offloaded" in pressure_warning(plan("meta-llama/Llama-3.1-70B-Instruct", "1xRTX4090", "nf4"))
    assert "Memory pressure" in pressure_warning(plan(LLAMA_8B, "M2-16GB", "q8", "mlx"))   # 9.3 of 10.3 GB
    assert pressure_warning(plan(LLAMA_8B, "M2-16GB", "q4", "mlx")) == ""
    assert pressure_warning(plan(LLAMA_8B, "1xRTX4090", "bf16")) == ""

"""What the llamacpp backend's loads cost: a GGUF file's tensors as stored (sized from its tensor
table, `runner.gguf`) or runner's F16 copy of them (`f16.py`), llama.cpp's logits buffer, and its
memory layout (Metal's unified memory on a Mac, else GPU layers then RAM). Pure Python (the plan
imports it): no llama_cpp."""

from __future__ import annotations

from runner.plan_rules import GPUS, HOSTS, Candidate, PlanRules

BATCH = 512   # runner_llamacpp's n_batch and n_ubatch: tokens per llama_decode

# measured by bench/llamacpp_cpu.py on the 2-core VM (bench/RESULTS.md)
DEFAULT_MODEL_WHY = ("no GPU: llama.cpp runs an F16 copy of the default model's GGUF, torch fp32's answers at "
                     "~5x its tokens/s on a CPU (bench/llamacpp_cpu.py)")


def default_model_runs_here(model) -> bool:
    """The default model, this backend installed and the model's GGUF file present: llama.cpp
    runs it on a CPU far faster than torch does."""
    from runner.gguf import default_model_gguf
    from runner.model import DEFAULT_MODEL_ID
    from runner_llamacpp import LlamaCppBackend

    if model.name.lower() != DEFAULT_MODEL_ID.lower():
        return False
    return LlamaCppBackend().availability().ok and default_model_gguf() is not None


class LlamaCppPlanRules(PlanRules):
    descriptions = {"gguf": "a GGUF file as stored (llama.cpp): each tensor in the file's own type "
                            "(Q4_1, Q4_K, Q8_0, F16 ...)",
                    "fp16": "runner's F16 copy of a GGUF file (llama.cpp): every quantized tensor dequantized to F16"}
    smallest = "gguf"
    loads_gguf = True

    def layout(self, machine):
        return HOSTS if machine.is_apple else GPUS     # Metal: unified memory

    def weights_breakdown(self, model, quant, machine=None):
        from runner.gguf import gguf_breakdown
        from runner_llamacpp.f16 import f16_breakdown

        return f16_breakdown(model) if quant == "fp16" else gguf_breakdown(model)

    def logits_bytes(self, model, batch):
        """llama.cpp reserves float32 logits for every token of a ubatch in its compute buffer
        (measured: 98 MiB of the default model's 98.25 MiB, with flash attention, at any context)."""
        return BATCH * model.vocab_size * 4

    def candidates(self, model, machine):
        if model.source == "gguf":
            return [Candidate(0, "gguf", "a GGUF file: llama.cpp runs it as stored")]
        # on a CPU llama.cpp decodes the default model ~5x faster than torch; as stored (Q4_1) its
        # 8-bit activations change the 135M model's answers, its F16 copy keeps torch fp32's
        if not machine.gpus and not machine.is_apple and default_model_runs_here(model):
            return [Candidate(0.5, "fp16", DEFAULT_MODEL_WHY)]
        return []

    def shown(self, model, machine):
        if model is not None and (model.source == "gguf" or (not machine.gpus and not machine.is_apple
                                                             and default_model_runs_here(model))):
            return [(0, "fp16"), (0.1, "gguf")] if model.source != "gguf" else [(0, "gguf")]
        return []

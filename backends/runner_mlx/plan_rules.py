"""What the mlx backend's loads cost: mlx-lm's affine quantization (groups of 64, scales and biases
in the checkpoint's dtype, embeddings and head quantized too), its KV cache grown in steps, and
layer ranges per host over `mlx.launch` (no offload). Checked against mlx-lm in
tests/test_budget_libraries.py. Pure Python (the plan imports it): no mlx."""

from __future__ import annotations

from runner.model import Linear, ModelSpec, dtype_bytes
from runner.plan_rules import HOSTS, PLAIN_DESCRIPTIONS, SMALL_MODEL_PARAMETERS, Candidate, PlanRules, small_model_warning

GROUP = 64                 # mlx-lm's default group size
KV_STEP = 256              # mlx-lm's KVCache grows in steps of this many tokens
QUANTIZED = {"q4": 4, "q8": 8}


class MlxPlanRules(PlanRules):
    descriptions = {
        **PLAIN_DESCRIPTIONS,
        "q8": "MLX affine 8-bit, group 64: scales + biases per group (embeddings and head too)",
        "q4": "MLX affine 4-bit, group 64: scales + biases per group (embeddings and head too)",
    }
    smallest = "q4"

    def suits(self, machine):
        return 0 if machine.is_apple else 5     # on Linux mlx[cpu] runs, slower than torch on the CPU

    def layout(self, machine):
        return HOSTS

    def compute_bytes(self, model: ModelSpec, quant: str) -> int:
        """The checkpoint's dtype for quantized schemes: mlx-lm keeps it (scales and biases take it too)."""
        if quant in QUANTIZED:
            return dtype_bytes(model.dtype)
        return super().compute_bytes(model, quant)

    def linear_bytes(self, linear: Linear, quant: str, unquantized_bytes: int = 2) -> int:
        if quant not in QUANTIZED:
            return super().linear_bytes(linear, quant, unquantized_bytes)
        n, out_features, in_features = linear.weight_elements, linear.out_features, linear.in_features
        bias = out_features * unquantized_bytes if linear.bias else 0
        if in_features % GROUP:                   # mlx-lm leaves such layers unquantized
            return n * unquantized_bytes + bias
        packed = out_features * (in_features * QUANTIZED[quant] // 32) * 4   # uint32 words
        scales_and_biases = 2 * out_features * (in_features // GROUP) * unquantized_bytes
        return packed + scales_and_biases + bias

    def quantizes_embeddings(self, quant):
        return quant in QUANTIZED     # QuantizedEmbedding, and the lm_head

    def kv_tokens(self, context):
        return -(-context // KV_STEP) * KV_STEP

    def warnings(self, model, machine, quant):
        warnings = small_model_warning(model) if quant == "q4" else []
        if quant in QUANTIZED and not machine.is_apple:
            warnings.append("mlx on a Linux CPU runs quantized matmuls slowly (SmolLM2-135M: 8-bit 1.2 tok/s vs "
                            "bf16 8.7 tok/s measured here); use the cuda backend (torch, also on CPU) instead")
        return warnings

    def candidates(self, model, machine):
        if not machine.is_apple:
            return []
        options = [Candidate(1, "bf16", "bf16 on MLX: full quality, Metal reads the weights as they are"),
                   Candidate(2, "q8", "MLX 8-bit: half the bytes of bf16, near-identical answers")]
        if model.parameter_count() >= SMALL_MODEL_PARAMETERS:
            options.append(Candidate(3, "q4", "MLX 4-bit (group 64): a quarter of bf16; large models keep their quality"))
        return options

    def shown(self, model, machine):
        if machine.is_apple:
            return [(1, "bf16"), (1.1, "q8"), (1.2, "q4")]
        return [] if machine.gpus else [(5, "q8"), (5.1, "q4")]

"""What the cuda backend's loads cost: transformers + accelerate, bitsandbytes (NF4, FP4, LLM.int8)
and torchao (FP8), as these libraries store the weights; checked against them in
tests/test_budget_libraries.py. Pure Python (the plan imports it): no torch."""

from __future__ import annotations

import math

from runner.budget import PREFILL_CHUNK
from runner.model import Linear, ModelSpec
from runner.plan_rules import GPUS, PLAIN_DESCRIPTIONS, SMALL_MODEL_PARAMETERS, Candidate, PlanRules, small_model_warning

BNB_4BIT = ("nf4", "nf4-nodq", "fp4")
BITSANDBYTES = BNB_4BIT + ("int8",)
BNB_BLOCK = 64                 # bitsandbytes 4-bit: one absmax per 64 weights
BNB_NESTED_BLOCK = 256         # double quant: absmax quantized to uint8 in blocks of 256
BNB_CODE_4BIT = 16 * 4         # the 16-entry NF4/FP4 code table (fp32), one per weight tensor
BNB_CODE_NESTED = 256 * 4      # the 256-entry dynamic code table of the nested state (fp32)
BNB_OFFSET = 4                 # the fp32 mean subtracted from absmax before nesting
FP8_ALIGN = 16                 # torchao FP8: Linears with a side not a multiple of 16 stay bf16 (_scaled_mm)
KV_READ_BLOCK = 4096           # positions a quantized KV cache is dequantized at a time for prefill (fast/static_cache.py)
# config.model_type values the fast path decodes (fast/decoder.py): their decoder layer is exactly norm,
# q/k/v (bias optional), RoPE, GQA attention, o_proj, norm, gate/up/down MLP
FAST_PATH_MODEL_TYPES = ("llama", "mistral", "qwen2")
SDPA_MASK_ALIGN = 8            # torch's memory-efficient SDPA pads an additive mask to this many keys (preprocess_mask)


def _no_bf16(machine) -> bool:
    return any(g.compute_capability and g.compute_capability < (8, 0) for g in machine.gpus)


class CudaPlanRules(PlanRules):
    descriptions = {
        **PLAIN_DESCRIPTIONS,
        "fp8": "FP8 e4m3 weights + fp32 scale per output row (torchao; embeddings and lm_head bf16)",
        "int8": "bitsandbytes LLM.int8: int8 weights + fp32 scale per row",
        "nf4": "bitsandbytes NF4, double quant: 4-bit + uint8 absmax per 64 (+ fp32 per 256 blocks)",
        "nf4-nodq": "bitsandbytes NF4 without double quant: 4-bit + fp32 absmax per 64",
        "fp4": "bitsandbytes FP4, double quant",
    }
    smallest = "nf4"

    def suits(self, machine):
        return None if machine.is_apple else 0

    def layout(self, machine):
        return GPUS

    def linear_bytes(self, linear: Linear, quant: str, unquantized_bytes: int = 2) -> int:
        n = linear.weight_elements
        out_features, in_features = linear.out_features, linear.in_features
        bias = out_features * unquantized_bytes if linear.bias else 0
        if quant == "fp8":   # torchao Float8Tensor, per-row: e4m3 weights + one fp32 scale per output row
            if out_features % FP8_ALIGN or in_features % FP8_ALIGN:
                return n * unquantized_bytes + bias
            return n + out_features * 4 + bias
        if quant == "int8":
            return n + out_features * 4 + bias           # int8 weights + SCB (fp32 per output row)
        if quant in BNB_4BIT:
            blocks = math.ceil(n / BNB_BLOCK)
            packed = math.ceil(n / 2)                     # two 4-bit weights per uint8
            if quant == "nf4-nodq":
                return packed + blocks * 4 + BNB_CODE_4BIT + bias
            nested = math.ceil(blocks / BNB_NESTED_BLOCK) * 4
            return packed + blocks + BNB_CODE_4BIT + BNB_OFFSET + nested + BNB_CODE_NESTED + bias
        return super().linear_bytes(linear, quant, unquantized_bytes)

    def stored_as(self, linear: Linear, quant: str) -> str:
        if quant == "fp32":
            return quant
        router = linear.name.endswith("block_sparse_moe.gate")      # the router is not an nn.Linear
        expert = ".experts." in linear.name                         # fused 3D experts: bitsandbytes skips them
        return "bf16" if router or (expert and quant in BITSANDBYTES) else quant

    def planned_quant(self, quant, machine):
        return "bf16" if self.fp8_dequantized(quant, machine) else quant

    @staticmethod
    def fp8_dequantized(quant: str, machine) -> bool:
        """transformers loads FP8 checkpoints dequantized to bf16 without a GPU of compute capability 8.9+."""
        if quant != "fp8":
            return False
        gpus = machine.gpus
        return not gpus or any(g.compute_capability is not None and g.compute_capability < (8, 9) for g in gpus)

    def kv_read_bytes(self, model, context, batch, quant, kv_bits):
        """With `--kv-bits` a prefill chunk attends over one layer's K and V dequantized into the
        compute dtype: the two copies of `context` positions, and the temporaries of one block of
        KV_READ_BLOCK positions (float32 values, their rounding to the compute dtype where that is
        not float32, 4-bit codes unpacked to a byte each). The fast path reads so for a prefill
        (fast/static_cache.QuantizedLayer.read), and its decode step reads the codes as stored
        (fast/attention.py); the ordinary loop (runner_cuda.kv_cache.dequantize_blocks, where the
        fast path does not run) reads the same way for a prefill chunk and for every decode step.
        Held against the allocator: tests/test_kv_read_memory.py (CPU), test_cuda_fast_kv_gpu.py."""
        if kv_bits is None:
            return 0
        plain = 4 if quant == "fp32" else 2
        rounding = 0 if plain == 4 else plain          # float32 values are already the compute dtype's
        values = batch * model.num_kv_heads * model.head_dim
        block = (4 + rounding + (1 if kv_bits == 4 else 0)) * values * min(context, KV_READ_BLOCK)
        return 2 * plain * values * context + block

    def attention_scratch_bytes(self, model, machine, context, batch, quant, kv_bits):
        """The fast path's scratch (its quantized read) where it runs; elsewhere the ordinary loop's."""
        if self.fast_path_runs(model, machine, quant):
            return self.kv_read_bytes(model, context, batch, quant, kv_bits)
        return self.ordinary_loop_attention_bytes(model, context, batch, quant, kv_bits, on_gpu=bool(machine.gpus))

    @staticmethod
    def fast_path_runs(model, machine, quant) -> bool:
        """Whether a session decodes through runner_cuda.fast (fast.attach): on CUDA GPUs, for the model
        types it knows, where its graphs capture the projections (not LLM.int8's). Offload turns it
        off too, but is decided after the activations are counted: an offloading plan counts the
        fast path's scratch."""
        return bool(machine.gpus) and model.model_type in FAST_PATH_MODEL_TYPES and quant != "int8"

    def ordinary_loop_attention_bytes(self, model, context, batch, quant, kv_bits, on_gpu: bool) -> int:
        """What one layer's attention allocates beyond the chunk's activations in the ordinary loop
        (transformers' forward over a DynamicCache, or runner_cuda.kv_cache's quantized cache;
        session.forward_in_chunks), at its peak: the attention of a prefill chunk of
        min(context, PREFILL_CHUNK) positions that ends at `context`, after cached ones (checked
        against transformers 5.24 and torch 2.13; held against torch's CPU allocator in
        tests/test_ordinary_loop_memory.py). The fast path has none of it: a static cache written in
        place, later chunks attending per query head of a KV group, the causal mask never built.

        - the boolean mask transformers builds for SDPA (masking_utils.sdpa_mask), a byte per
          (query, key) pair: a chunk after cached positions is not plain causal, so the mask is
          built (once a forward, alive through every layer);
        - with that mask, transformers' SDPA attention does not pass enable_gqa (use_gqa_in_sdpa:
          CUDA's fused kernels take GQA only without a mask) and copies K and V to every query
          head (repeat_kv): two tensors of heads x context x head_dim;
        - torch's SDPA turns the boolean mask into an additive one in the compute dtype; on a GPU
          the memory-efficient kernel then pads it to a multiple of SDPA_MASK_ALIGN keys into a
          second copy, while the first is alive, where a chunk ends off that multiple (counted:
          a prompt may end anywhere; read from torch's source, not measured here);
        - a quantized cache: the layer's K and V dequantized into the compute dtype, alive through
          the attention (kv_read_bytes counts them, and the read's temporaries before it).
        Before the attention, the cache update: DynamicLayer grows K, then V, by torch.cat, the old
        tensor alive beside the new one (a decode step: context - 1 positions of V, with no mask
        built); the quantized layer's update peaks in its read. The largest of these is counted.
        Counted for SDPA: where flash-attention-2 is installed (loading.attention_for) the masks and
        the repeated K and V are not made, so this is more than that needs."""
        plain = 4 if quant == "fp32" else 2
        chunk = min(context, PREFILL_CHUNK)
        position = batch * model.num_kv_heads * model.head_dim        # one position of one layer's K (or V)
        mask = batch * chunk * context
        grouped = model.num_heads > model.num_kv_heads
        repeated = 2 * batch * model.num_heads * model.head_dim * context * plain if grouped else 0
        additive = mask * plain
        if on_gpu:
            additive += batch * chunk * -(-context // SDPA_MASK_ALIGN) * SDPA_MASK_ALIGN * plain
        if kv_bits is None:
            dequantized, update, decode = 0, (context - chunk) * position * plain, (context - 1) * position * plain
        else:
            dequantized = 2 * plain * position * context
            update = decode = self.kv_read_bytes(model, context, batch, quant, kv_bits)
        return max(mask + dequantized + repeated + additive, mask + update, decode)

    def offloads_unquantized(self, quant):
        if quant not in BITSANDBYTES:
            return ""
        return ("bitsandbytes does not quantize offloaded layers: they stay in bf16 in RAM "
                "(transformers needs llm_int8_enable_fp32_cpu_offload=True)")

    def dequantizes_in_flight(self, quant):
        return quant in BITSANDBYTES + ("fp8",)

    def check(self, model, machine, quant):
        from runner.errors import UserInputError

        if machine.is_apple:
            raise UserInputError(f"--quant {quant}: the cuda backend (bitsandbytes, accelerate) is for NVIDIA GPUs; "
                                 "on Apple silicon runner uses mlx")

    def warnings(self, model: ModelSpec, machine, quant: str) -> list[str]:
        warnings = []
        if quant == "fp8":
            if self.fp8_dequantized(quant, machine):
                warnings.append("fp8 needs an NVIDIA GPU with compute capability 8.9+ (Ada, Hopper); without one "
                                "transformers dequantizes FP8 checkpoints to bf16 on load: counted here as bf16")
            warnings.append("fp8 on the cuda backend is torchao's (e4m3 weights and activations, per-row scales): "
                            "it needs torchao installed (pip install torchao)")
        if quant == "bf16" and _no_bf16(machine):
            warnings.append("these GPUs have no bfloat16 (compute capability below 8.0): use --quant fp16")
        if quant in BNB_4BIT:
            warnings += small_model_warning(model)
        if quant in BITSANDBYTES and model.num_experts > 1:
            warnings.append(f"transformers 5 stores {model.name}'s experts as fused 3D tensors that bitsandbytes does "
                            f"not quantize: they stay in bf16 and {quant} shrinks only attention (counted so here)")
        if quant in BITSANDBYTES and not machine.gpus:
            warnings.append("bitsandbytes on a CPU works but is slow; with no GPU prefer bf16/fp32 if it fits")
        return warnings

    def scheme_note(self, model, machine, quant):
        if self.fp8_dequantized(quant, machine):
            return f"{quant}: needs compute capability 8.9+; transformers loads it dequantized to bf16 here"
        return ""

    def plan_details(self, plan):
        """accelerate's max_memory and transformers' device_map, as the load passes them."""
        return {"max_memory": {str(k): v for k, v in plan.max_memory().items()}, "device_map": plan.device_map()}

    def candidates(self, model, machine):
        if machine.is_apple:
            return []
        small = model.parameter_count() < SMALL_MODEL_PARAMETERS
        if machine.gpus:
            half = "fp16" if _no_bf16(machine) else "bf16"
            options = [Candidate(1, half, f"{half} on the GPU: full quality and the fastest path in transformers"),
                       Candidate(2, "nf4", "NF4 with double quant (bitsandbytes): a quarter of bf16 with small loss")]
            if small:
                options.append(Candidate(3, "int8", "LLM.int8: half of bf16 (small models do not survive 4-bit)"))
            return options
        # CPU only (Linux): torch runs on CPU too, and fast; mlx's CPU quantized matmul is slow here
        return [
            Candidate(1, "fp32", "no GPU: torch on CPU in fp32 keeps the model's answers (SmolLM2-135M: ~16 tok/s "
                                 "measured here; mlx on CPU: bf16 8.7, 8-bit 1.2 tok/s)"),
            Candidate(2, "bf16", "no GPU: torch on CPU in bf16 halves the memory of fp32"),
            Candidate(3, "nf4", "no GPU and bf16 does not fit: bitsandbytes NF4 runs on CPU, slowly"),
        ]

    def shown(self, model, machine):
        if machine.is_apple:
            return []
        rows = ["bf16", "fp8", "int8", "nf4", "nf4-nodq", "fp4"]
        if not machine.gpus:
            rows.insert(0, "fp32")
        return [(1 + index / 10, quant) for index, quant in enumerate(rows)]

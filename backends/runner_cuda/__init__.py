"""The CUDA backend: transformers + accelerate + bitsandbytes (NF4, LLM.int8) + torchao (FP8), on NVIDIA GPUs.

    backend = CudaBackend()
    session = backend.load(LoadRequest(spec, quant="nf4", context=4096, plan=plan))

With no CUDA GPU it still runs, on the CPU (bitsandbytes runs NF4 there too): the default model
must work on any machine, and CI has no GPU. Nothing heavy is imported here; torch, transformers
and bitsandbytes are imported when a model is loaded (`runner_cuda.loading`).

Modules:
  loading.py   LoadRequest -> model + tokenizer on the plan's devices; placement and measured bytes
  session.py   CudaSession: chat template, the decode loop (one function), sampling, logits, memory
  compat.py    the private parts of torch and transformers it relies on (NVRTC kernels, launches)
"""

from __future__ import annotations

import importlib.util

from runner.backend import Availability, LoadRequest
from runner_cuda.plan_rules import CudaPlanRules

INSTALL = "pip install 'runner[cuda]'"
BITSANDBYTES_INSTALL = "pip install 'bitsandbytes>=0.45'"
# torchao ships no torch pin: take the release built for the installed torch (0.18 for torch 2.11)
FP8_INSTALL = "pip install torchao (the release built for your torch: 0.18 for torch 2.11)"

# The schemes this backend loads, in the CLI's words.
CUDA_QUANTS = ("bf16", "fp16", "fp32", "nf4", "nf4-nodq", "fp4", "int8", "fp8")
BITSANDBYTES_QUANTS = ("nf4", "nf4-nodq", "fp4", "int8")


class CudaBackend:
    name = "cuda"
    quants = CUDA_QUANTS
    # asked for this backend without a quant: the first of these that fits (best quality first)
    quality_order = ("bf16", "int8", "nf4")
    rehearse_quants = ("nf4", "bf16", "int8")
    install = INSTALL
    packages = ("torch", "transformers", "bitsandbytes", "accelerate")   # what computes its numbers
    kernels = ("cuda", "cuda-simt", "cuda-bnb-rounding", "bitsandbytes")  # --kernel: the fast path's NF4 GEMV
    caches = {"nf4-cache": "NF4 reload cache"}    # models_dir()/<kind>/: what it derives from a model (runner list/rm)
    plan_rules = CudaPlanRules()          # what its loads cost and where they go (the plan's part of it)

    def availability(self) -> Availability:
        """Cheap: looks for the packages without importing torch. No GPU is not a reason to refuse:
        the backend then runs on the CPU, and the session's `device_summary` says so."""
        missing = [name for name in ("torch", "transformers", "accelerate", "safetensors") if importlib.util.find_spec(name) is None]
        if missing:
            return Availability(False, f"{', '.join(missing)} not installed", INSTALL)
        if importlib.util.find_spec("bitsandbytes") is None:
            return Availability(True, f"bitsandbytes not installed: nf4 and int8 are off ({BITSANDBYTES_INSTALL})")
        return Availability(True)

    def load(self, request: LoadRequest):
        from runner_cuda.loading import load_session

        return load_session(request)

    def rehearse(self, plan, **options):
        """The plan's model with random weights: real memory, real speed (`runner_cuda.rehearse`)."""
        from runner_cuda.rehearse import rehearse

        return rehearse(plan, **options)


__all__ = ["CudaBackend", "CUDA_QUANTS", "BITSANDBYTES_QUANTS", "INSTALL", "BITSANDBYTES_INSTALL", "FP8_INSTALL"]

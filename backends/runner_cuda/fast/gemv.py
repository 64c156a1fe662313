"""Batch-1 GEMV for BF16/FP16 weights (a decode step's projections), in Triton.

At batch 1 a projection reads its whole weight [N, K] for N outputs: it runs at the speed memory
delivers the weight. On an H200 cuBLAS reached 92-94 % of the copy bandwidth on the 8B's gate/up and
down but 72-79 % on the small shapes (q/k/v 6144 x 4096, o 4096 x 4096), and its split-K GEMVs add a
reduce launch each (bench/RESULTS.md, seventh session). Here each program reads BLOCK_N whole rows,
BLOCK_K columns a step (16-byte loads), multiplies them with x in float32, keeps BLOCK_N x BLOCK_K
running sums and adds each row's up at the end: one launch, no reduce, each output written once,
rounded to x's dtype as F.linear rounds (plus the bias in float32 before that, where there is one).

The fastest configuration (rows, columns, warps) depends on the shape and the GPU, and cuBLAS stays
faster on some: `projections` times each configuration and cuBLAS on the layers' own weights, all
layers in turn inside a CUDA graph (so the weights come from memory, not from L2, and no launch gap
counts), and keeps the fastest per shape (remembered per GPU model for the process).

    calls = projections([{"o": (weight, bias), ...} per layer], sweep=True, stream=side_stream)
    y = calls[layer]["o"](x)                # x [1, K] -> [1, N], in a graphed decode step
    y = gemv(weight, x, bias, config=DEFAULT, out=None)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:
    import torch

# (rows per program, columns per step, warps): the prototype's three (bench/cuda_fp8.py, 4 warps)
# and wider steps with more bytes in flight per program; each is one compiled kernel
CONFIGS = ((8, 512, 4), (16, 256, 4), (4, 1024, 4), (8, 1024, 4), (16, 512, 8), (4, 512, 2))
DEFAULT = CONFIGS[0]      # without a sweep (gemv=True, the CPU's interpreter)
_CHOSEN: dict = {}        # (GPU name, shape, dtype, bias) -> the sweep's choice, None for cuBLAS
SWEEPS: dict = {}         # the same key -> {candidate's name: µs a call} (what the benchmarks report)


@triton.jit
def dense_gemv(w_ptr, x_ptr, b_ptr, out_ptr, N,
               K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # the last program's rows past N read row N - 1 again (no masked loads); they are not stored
    safe = tl.minimum(rows, N - 1)
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + safe.to(tl.int64)[:, None] * K       # rows contiguous: the compiler knows their alignment
    # x read through a [BLOCK_N, BLOCK_K] pointer that repeats its row: it comes in the weight's
    # register layout (one 16-byte load a thread, the repeats dropped), where a [BLOCK_K] load
    # broadcast to it went through shared memory with two barriers a step (seen in the SASS)
    x_rows = x_ptr + (rows * 0)[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    # whole blocks of columns unmasked (16-byte loads), then the rest, if any, masked
    FULL: tl.constexpr = K // BLOCK_K * BLOCK_K
    for start in range(0, FULL, BLOCK_K):
        w = tl.load(w_rows + (start + cols)[None, :])
        x = tl.load(x_rows + (start + cols)[None, :])
        acc += w.to(tl.float32) * x.to(tl.float32)
    if FULL < K:
        at = FULL + cols
        w = tl.load(w_rows + at[None, :], mask=(at < K)[None, :], other=0.0)
        x = tl.load(x_rows + at[None, :], mask=(at < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + safe).to(tl.float32)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=rows < N)


def takes(weight: "torch.Tensor", dtype: "torch.dtype") -> bool:
    """Whether the kernel reads `weight` for inputs of `dtype`: a contiguous 2-D BF16 or FP16 weight of
    that dtype."""
    import torch

    return (weight.dim() == 2 and weight.dtype in (torch.bfloat16, torch.float16) and weight.dtype == dtype
            and weight.is_contiguous() and weight.shape[1] > 0)


def gemv(weight: "torch.Tensor", x: "torch.Tensor", bias: "torch.Tensor | None" = None,
         config: tuple[int, int, int] = DEFAULT, out: "torch.Tensor | None" = None) -> "torch.Tensor":
    """x @ weight.T (+ bias) for one token: x [1, K] or [K] contiguous, weight [N, K]; [1, N] in x's
    dtype (written into `out`, N values, where given)."""
    import torch

    n, k = weight.shape
    if not takes(weight, x.dtype) or x.numel() != k or not x.is_contiguous():
        raise ValueError(f"gemv takes a contiguous [N, K] bf16/fp16 weight and one contiguous row of K "
                         f"values of its dtype, not {tuple(weight.shape)} {weight.dtype} with {tuple(x.shape)} {x.dtype}")
    if out is None:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config
    dense_gemv[(triton.cdiv(n, block_n),)](weight, x, weight if bias is None else bias, out, n, K=k,
                                           HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                                           num_warps=warps)
    return out


class Projection:
    """x [1, K] -> x @ weight.T + bias [1, N]: the Triton kernel at `config`, or cuBLAS (F.linear,
    what the module itself runs) where `config` is None."""

    def __init__(self, weight: "torch.Tensor", bias: "torch.Tensor | None", config: "tuple[int, int, int] | None"):
        self.weight, self.bias, self.config = weight, bias, config

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        if self.config is None:
            import torch

            return torch.nn.functional.linear(x, self.weight, self.bias)
        return gemv(self.weight, x.contiguous(), self.bias, self.config)      # (a no-op on a decode step's rows)


def name_of(config: "tuple[int, int, int] | None") -> str:
    return "cublas" if config is None else "x".join(map(str, config))


def projections(layers: "list[dict]", *, sweep: bool, stream_of=None) -> "list[dict[str, Projection]]":
    """Per layer, group -> Projection over its (weight, bias): with `sweep`, each group's fastest of
    CONFIGS and cuBLAS on its layers' GPU (`stream_of(device)`: the side stream the sweep's graphs are
    captured on); else the kernel at DEFAULT for every group (on the CPU, Triton's interpreter)."""
    chosen: dict = {}
    if sweep:
        for group in layers[0]:
            by_device: dict = {}
            for layer in layers:
                by_device.setdefault(layer[group][0].device, []).append(layer[group])
            for device, weights in by_device.items():
                chosen[group, device] = choose(weights, stream_of(device))
    return [{group: Projection(weight, bias, chosen[group, weight.device] if sweep else DEFAULT)
             for group, (weight, bias) in layer.items()} for layer in layers]


def choose(weights: "list[tuple]", stream) -> "tuple[int, int, int] | None":
    """The fastest of CONFIGS and cuBLAS (None) for these same-shaped (weight, bias) pairs on their
    GPU: one graph per candidate calling it on each weight in turn, the median of 5 replays after one."""
    import torch

    weight, bias = weights[0]
    device = weight.device
    key = (torch.cuda.get_device_name(device), tuple(weight.shape), weight.dtype, bias is not None)
    if key not in _CHOSEN:
        times = {}
        with torch.cuda.device(device):
            x = torch.randn(1, weight.shape[1], device=device).to(weight.dtype)
            for config in (None, *CONFIGS):
                try:
                    times[config] = _graph_ms([Projection(w, b, config) for w, b in weights], x, stream)
                except Exception:           # a configuration this GPU's Triton cannot build: not a candidate
                    if config is None:
                        raise
        _CHOSEN[key] = min(times, key=times.get)
        SWEEPS[key] = {name_of(config): ms * 1e3 / len(weights) for config, ms in times.items()}
    return _CHOSEN[key]


def _graph_ms(calls: list, x, stream, replays: int = 5) -> float:
    """GPU time of a CUDA graph running each call on x once, warmed up (Triton compiled, cuBLAS's
    handle made) outside the capture; the median of `replays`."""
    import torch

    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call(x)
    graph.replay()              # (the first replay uploads the graph)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[replays // 2]

"""What a dependent boundary costs on one GPU: a launch boundary (each of a decode step's ~190 is one)
against a grid-wide barrier inside one persistent launch (what a persistent step would use instead).

    PYTHONPATH=src:backends python3 bench/boundary_cost.py [--phases 192] [--out DIR]

Every phase does the same small dependent work: each block reads the values all blocks wrote in the
phase before (one float a block, from L2), sums them and writes its own, so a phase needs every block
of the one before. `plain`: a launch a phase; `overlapping`: a launch a phase, each allowed to start
before the one before has finished (programmatic dependent launch, as NF4Mma's are: its wait before
the read); `barrier`: one launch of one block per SM, the phases separated by a grid barrier (a
counter in global memory: each block arrives, then waits until all have). Each in a CUDA graph,
replayed back to back; µs a phase, and the three final values compared (a barrier that let a block
read too early would not give the launches' values). JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_speed as cs          # noqa: E402  (puts src and backends on sys.path)

THREADS = 256
SOURCE = r"""
// values: [phases + 1][blocks] floats; phase p reads row p and writes row p + 1
__device__ void body(float* values, int phase, int blocks) {
    __shared__ float sums[THREADS / 32];
    const int tid = threadIdx.x;
    float v = tid < blocks ? __ldcg(values + phase * blocks + tid) : 0.0f;
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, m);
    if ((tid & 31) == 0) sums[tid >> 5] = v;
    __syncthreads();
    if (tid == 0) {
        float total = 0.0f;
        for (int w = 0; w < THREADS / 32; ++w) total += sums[w];
        values[(phase + 1) * blocks + blockIdx.x] = total * (1.0f / blocks) + 1.0f;
    }
    __syncthreads();
}

extern "C" __global__ void phase_launch(float* values, int phase, int overlap) {
    if (overlap) {
        asm volatile("griddepcontrol.launch_dependents;");
        asm volatile("griddepcontrol.wait;" ::: "memory");
    }
    body(values, phase, gridDim.x);
}

__device__ void grid_barrier(unsigned long long* arrived, unsigned int blocks) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();                                     // this block's writes before its arrival
        const unsigned long long ticket = atomicAdd(arrived, 1ull);
        const unsigned long long target = (ticket / blocks + 1) * blocks;      // all blocks of this barrier
        unsigned long long now;
        do {
            asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(now) : "l"(arrived) : "memory");
        } while (now < target);
    }
    __syncthreads();
}

extern "C" __global__ void persistent(float* values, unsigned long long* arrived, int phases) {
    for (int p = 0; p < phases; ++p) {
        body(values, p, gridDim.x);
        grid_barrier(arrived, gridDim.x);
    }
}
"""


def kernels():
    """(phase_launch, persistent), compiled by NVRTC for this GPU."""
    from runner_cuda import compat

    options = [f"-DTHREADS={THREADS}", "-std=c++17"]
    return compat.compile_kernel(SOURCE, "phase_launch", options), compat.compile_kernel(SOURCE, "persistent", options)


def measure(phases: int) -> dict:
    """µs a phase for each way, and whether their final values agree."""
    import torch

    from runner_cuda import compat

    blocks = torch.cuda.get_device_properties(0).multi_processor_count
    if blocks > THREADS:
        raise SystemExit(f"boundary_cost: {blocks} SMs, more than a block's {THREADS} threads read")
    phase_launch, persistent = kernels()
    results, finals = {}, {}
    for way in ("plain", "overlapping", "barrier"):
        values = torch.zeros(phases + 1, blocks, device="cuda")
        values[0] = torch.arange(blocks, device="cuda", dtype=torch.float32)
        arrived = torch.zeros(1, dtype=torch.int64, device="cuda")

        def launch(way=way, values=values, arrived=arrived):
            if way == "barrier":      # one block an SM: all resident at once, as the barrier needs
                persistent(grid=(blocks, 1, 1), block=(THREADS, 1, 1), args=[values, arrived, phases])
                return
            for p in range(phases):
                if way == "overlapping":
                    compat.launch_overlapping(phase_launch, (blocks, 1, 1), (THREADS, 1, 1), [values, p, 1])
                else:
                    phase_launch(grid=(blocks, 1, 1), block=(THREADS, 1, 1), args=[values, p, 0])

        results[way] = cs.graph_time_us(lambda index, launch=launch: launch(), 1) / phases
        finals[way] = values[phases].clone()
        cs.log(f"{way}: {results[way]:.2f} us a phase ({phases} phases, {blocks} blocks of {THREADS} threads)")
    agree = all(torch.equal(finals["plain"], finals[way]) for way in finals)
    return {"phases": phases, "blocks": blocks, "us_per_phase": results, "same_values": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, default=192, help="phases a graph (a decode step has ~190 boundaries)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    found = measure(args.phases)
    (args.out / "boundary_cost.json").write_text(json.dumps(found, indent=2))
    print(json.dumps(found))
    if not found["same_values"]:
        raise SystemExit("boundary_cost: the three ways' final values differ")


if __name__ == "__main__":
    main()

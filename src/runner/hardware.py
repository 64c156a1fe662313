"""Machine: what this computer (or a hypothetical one) really has.

Detection reads each CUDA GPU (nvidia-ml-py, else torch if already installed), Apple unified
memory (`sysctl hw.memsize`, `iogpu.wired_limit_mb`), RAM and swap (psutil) and free disk.
`parse_machine("4xA100-80GB")` or a TOML/JSON file describes machines you do not own.

INTERFACE CONTRACT (other modules rely on these names; the foundation work fills the bodies).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """One accelerator (or the CPU when there is none)."""

    name: str                        # "cuda:0", "metal", "cpu"
    model: str                       # "NVIDIA H100 80GB HBM3", "Apple M2 Ultra", ...
    kind: str                        # "cuda", "metal" or "cpu"
    total_bytes: int
    free_bytes: int
    bandwidth_bytes_per_s: float     # memory bandwidth; 0 when unknown
    compute_capability: tuple[int, int] | None = None   # CUDA only


@dataclass(frozen=True)
class Host:
    """One computer: its accelerators, its RAM, its disk."""

    name: str                        # "localhost" or the name in a machine file
    os: str                          # "linux", "darwin", "windows"
    ram_bytes: int
    ram_available_bytes: int
    swap_total_bytes: int
    swap_used_bytes: int
    disk_free_bytes: int
    devices: tuple[Device, ...]      # CUDA GPUs, or one "metal" device on Apple silicon; empty: CPU only
    unified_memory: bool = False     # Apple silicon: GPU and CPU share RAM
    wired_limit_bytes: int = 0       # Apple: the GPU working-set limit in force (0: unknown / n.a.)
    cpu_bandwidth_bytes_per_s: float = 0.0


@dataclass(frozen=True)
class Machine:
    hosts: tuple[Host, ...]
    label: str                       # "this machine", "4xA100-80GB", a file name
    hypothetical: bool = False

    @property
    def gpus(self) -> tuple[Device, ...]:
        return tuple(d for host in self.hosts for d in host.devices if d.kind == "cuda")

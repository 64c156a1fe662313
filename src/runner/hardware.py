"""Machine: what this computer (or a hypothetical one) really has.

Detection reads each CUDA GPU (nvidia-ml-py, else torch if already imported), Apple unified
memory (`sysctl hw.memsize`, `iogpu.wired_limit_mb`), RAM and swap (psutil) and free disk.
`parse_machine("4xA100-80GB")` or a TOML/JSON file describes machines you do not own.

INTERFACE CONTRACT (other modules rely on these names; the foundation work fills the bodies).

Sizes in machine names ("80GB", "192GB") are what vendors print, which are binary gigabytes:
an "80GB" A100 has 80 GiB. runner prints sizes in decimal GB (10^9 bytes), so that same card
shows as 85.9 GB.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from runner.errors import UserInputError
from runner.files import parse_json, read_text
from runner.paths import user_path
from runner.words import one_line

GiB = 1024**3
GB = 10**9


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
    link: str | None = None          # the network between the hosts (machine files: `link = "10gbe"`)

    @property
    def gpus(self) -> tuple[Device, ...]:
        return tuple(d for host in self.hosts for d in host.devices if d.kind == "cuda")

    @property
    def is_apple(self) -> bool:
        """Every host is Apple silicon with unified memory (an MLX machine)."""
        return bool(self.hosts) and all(host.unified_memory for host in self.hosts)

    def describe(self) -> str:
        """One line a person reads: '4 x NVIDIA A100 80GB (85.9 GB each), 1 host, RAM 1100 GB'."""
        parts = []
        for host in self.hosts:
            names: dict[str, int] = {}
            for device in host.devices:
                key = f"{device.model} ({device.total_bytes / GB:.1f} GB)"
                names[key] = names.get(key, 0) + 1
            gpus = ", ".join(f"{count} x {key}" if count > 1 else key for key, count in names.items())
            memory = "unified memory" if host.unified_memory else "RAM"
            text = f"{gpus + ', ' if gpus else 'CPU only, '}{memory} {host.ram_bytes / GB:.1f} GB"
            parts.append(text if len(self.hosts) == 1 else f"{host.name}: {text}")
        return "; ".join(parts)


# ---- what is known about GPUs and Macs ---------------------------------------------------------

@dataclass(frozen=True)
class KnownGPU:
    model: str                          # the name nvidia-smi prints (close enough to read)
    memory_gib: tuple[int, ...]         # sizes sold; the first is the default
    bandwidth_gb_s: tuple[float, ...]   # per size, decimal GB/s (SXM parts where there is a choice)
    compute_capability: tuple[int, int]


KNOWN_GPUS: dict[str, KnownGPU] = {
    "V100": KnownGPU("NVIDIA V100", (32, 16), (900, 900), (7, 0)),
    "T4": KnownGPU("NVIDIA T4", (16,), (320,), (7, 5)),
    "A10": KnownGPU("NVIDIA A10", (24,), (600,), (8, 6)),
    "A100": KnownGPU("NVIDIA A100", (80, 40), (2039, 1555), (8, 0)),
    "A6000": KnownGPU("NVIDIA RTX A6000", (48,), (768,), (8, 6)),
    "L4": KnownGPU("NVIDIA L4", (24,), (300,), (8, 9)),
    "L40S": KnownGPU("NVIDIA L40S", (48,), (864,), (8, 9)),
    "RTX3090": KnownGPU("NVIDIA GeForce RTX 3090", (24,), (936,), (8, 6)),
    "RTX4090": KnownGPU("NVIDIA GeForce RTX 4090", (24,), (1008,), (8, 9)),
    "RTX5090": KnownGPU("NVIDIA GeForce RTX 5090", (32,), (1792,), (12, 0)),
    "H100": KnownGPU("NVIDIA H100", (80,), (3350,), (9, 0)),
    "H200": KnownGPU("NVIDIA H200", (141,), (4800,), (9, 0)),
    "B200": KnownGPU("NVIDIA B200", (180,), (8000,), (10, 0)),
}


@dataclass(frozen=True)
class KnownMac:
    model: str
    memory_gib: tuple[int, ...]   # configurations sold; the first is the default
    bandwidth_gb_s: float


KNOWN_MACS: dict[str, KnownMac] = {
    "M1": KnownMac("Apple M1", (16, 8), 68),
    "M1Pro": KnownMac("Apple M1 Pro", (32, 16), 200),
    "M1Max": KnownMac("Apple M1 Max", (64, 32), 400),
    "M1Ultra": KnownMac("Apple M1 Ultra", (128, 64), 800),
    "M2": KnownMac("Apple M2", (24, 8, 16), 100),
    "M2Pro": KnownMac("Apple M2 Pro", (32, 16), 200),
    "M2Max": KnownMac("Apple M2 Max", (96, 32, 64), 400),
    "M2Ultra": KnownMac("Apple M2 Ultra", (192, 64, 128), 800),
    "M3": KnownMac("Apple M3", (24, 8, 16), 100),
    "M3Pro": KnownMac("Apple M3 Pro", (36, 18), 150),
    "M3Max": KnownMac("Apple M3 Max", (128, 36, 48, 64, 96), 400),
    "M3Ultra": KnownMac("Apple M3 Ultra", (512, 96, 256), 819),
    "M4": KnownMac("Apple M4", (32, 16, 24), 120),
    "M4Pro": KnownMac("Apple M4 Pro", (64, 24, 48), 273),
    "M4Max": KnownMac("Apple M4 Max", (128, 36, 48, 64), 546),
}

# Assumptions for hypothetical machines and for what cannot be measured without a benchmark.
DEFAULT_CPU_BANDWIDTH = 25 * GB        # dual-channel DDR4/DDR5 desktop, roughly
SERVER_CPU_BANDWIDTH = 200 * GB        # multi-channel server memory, roughly
DEFAULT_DISK_FREE = 2000 * GB
DEFAULT_CPU_ONLY_RAM_GIB = 32


def metal_working_set_bytes(ram_bytes: int) -> int:
    """Metal's default recommendedMaxWorkingSetSize: about 2/3 of RAM up to 36 GB, 3/4 above."""
    share = 2 / 3 if ram_bytes <= 36 * GiB else 3 / 4
    return int(ram_bytes * share)


def mac_host(name: str, chip: KnownMac, memory_gib: int, os_name: str = "darwin") -> Host:
    ram = memory_gib * GiB
    limit = metal_working_set_bytes(ram)
    device = Device("metal", f"{chip.model} {memory_gib}GB", "metal", limit, limit, chip.bandwidth_gb_s * GB)
    return Host(
        name=name, os=os_name, ram_bytes=ram, ram_available_bytes=ram, swap_total_bytes=0, swap_used_bytes=0,
        disk_free_bytes=DEFAULT_DISK_FREE, devices=(device,), unified_memory=True, wired_limit_bytes=limit,
        cpu_bandwidth_bytes_per_s=chip.bandwidth_gb_s * GB,
    )


# What the driver really reports where it was measured (nvidia-ml-py on the card itself);
# other cards are taken at their vendor size in GiB.
REPORTED_BYTES = {
    ("NVIDIA H100", 80): 81559 * 1024**2,   # "NVIDIA H100 80GB HBM3": 85,520,809,984 bytes (measured)
}


def gpu_device(index: int, gpu: KnownGPU, memory_gib: int) -> Device:
    sizes = list(gpu.memory_gib)
    bandwidth = gpu.bandwidth_gb_s[sizes.index(memory_gib)] if memory_gib in sizes else gpu.bandwidth_gb_s[0]
    total = REPORTED_BYTES.get((gpu.model, memory_gib), memory_gib * GiB)
    return Device(
        f"cuda:{index}", f"{gpu.model} {memory_gib}GB", "cuda", total, total, bandwidth * GB, gpu.compute_capability
    )


# ---- parsing "4xA100-80GB", "2xM2Ultra-192GB", "cpu" -------------------------------------------

_SPEC = re.compile(r"^(?:(\d+)\s*[xX]\s*)?([A-Za-z][A-Za-z0-9]*?)(?:[-_ ]?(\d+)\s*GB?)?$", re.IGNORECASE)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(GB|TB|GIB|TIB)?$", re.IGNORECASE)

MAX_SIZE = 1024 * 1024 * GiB        # 1 PiB: above this a RAM, disk or GPU size is a typo
MAX_DEVICES = 64                    # GPUs (or Macs) in one machine string, GPUs of one host, hosts in a file
MACHINE_FILE_MAX_BYTES = 1024 * 1024


def known_machine_names() -> str:
    return (
        "GPUs: " + ", ".join(KNOWN_GPUS) + "; Macs: " + ", ".join(KNOWN_MACS)
        + "; 'cpu' (e.g. 4xA100-80GB, 8xRTX4090, 2xM2Ultra-192GB, cpu-64GB, or a .toml/.json machine file)"
    )


def _size_bytes(text: str, what: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise UserInputError(f"{what}: '{one_line(text, 60)}' is not a size (write e.g. 512GB or 2TB)")
    value, unit = float(match.group(1)), (match.group(2) or "GB").upper()
    size = value * {"GB": GiB, "GIB": GiB, "TB": 1024 * GiB, "TIB": 1024 * GiB}[unit]
    if not 0 < size <= MAX_SIZE:   # also a 400-digit number, which is infinity as a float
        raise UserInputError(f"{what}: '{one_line(text, 60)}' is not a size runner plans for "
                             "(more than 0, at most 1024TB)")
    return int(size)


def _whole(digits: str, what: str, high: int, unit: str) -> int:
    """A count or a size written in a machine string, 1 to `high` (checked before int() reads 5000 digits)."""
    if len(digits.lstrip("0")) > len(str(high)) or not 1 <= int(digits) <= high:
        raise UserInputError(f"{what}: {one_line(digits, 60)} {unit}? runner plans for 1 to {high} {unit}")
    return int(digits)


def _lookup(table: dict, name: str):
    for key, value in table.items():
        if key.lower() == name.lower():
            return value
    return None


def parse_machine(text: str) -> Machine:
    """A hypothetical machine from a short string, or from a TOML/JSON machine file.

    "4xA100-80GB", "8xRTX4090", "1xH100-80GB", "2xH200", "2xM2Ultra-192GB" (two Macs), "cpu",
    "cpu-64GB". Options after commas: ",ram=512GB", ",disk=2TB". Sizes are vendor GB (GiB).
    """
    text = text.strip()
    path = user_path(text)
    try:
        is_file = path.is_file()
    except OSError:          # a name too long to be a path is no file
        is_file = False
    if text.lower().endswith((".toml", ".json")) or is_file:
        return load_machine_file(path)
    return parse_machine_string(text)


def parse_machine_string(text: str, where: str = "") -> Machine:
    """A machine from a short string only, never a file (a machine file's hosts are strings, so
    a file cannot include itself). `where` begins error messages: by default "--machine TEXT"."""
    where = where or f"--machine {one_line(text, 60)}"
    spec, *options = [part.strip() for part in text.split(",")]
    extra: dict[str, int] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key.lower() not in ("ram", "disk") or not value:
            raise UserInputError(f"{where}: unknown option '{one_line(option, 60)}' (use ram=512GB or disk=2TB)")
        extra[key.lower()] = _size_bytes(value, f"{where}: {key}")
    match = _SPEC.match(spec)
    if not match:
        raise UserInputError(f"{where}: not understood. Known: {known_machine_names()}")
    count = _whole(match.group(1) or "1", f"{where}", MAX_DEVICES, "devices")
    name = match.group(2)
    size_gib = _whole(match.group(3), f"{where}", MAX_SIZE // GiB, "GB") if match.group(3) else None

    if name.lower() == "cpu":
        if match.group(1):
            raise UserInputError(f"{where}: write 'cpu' or 'cpu-64GB' (no count)")
        ram = extra.get("ram", (size_gib or DEFAULT_CPU_ONLY_RAM_GIB) * GiB)
        host = Host("localhost", "linux", ram, ram, 0, 0, extra.get("disk", DEFAULT_DISK_FREE), (),
                    cpu_bandwidth_bytes_per_s=DEFAULT_CPU_BANDWIDTH)
        return Machine((host,), f"cpu-{ram // GiB}GB", hypothetical=True)

    chip = _lookup(KNOWN_MACS, name)
    if chip is not None:
        memory = size_gib or chip.memory_gib[0]
        hosts = tuple(
            replace(mac_host(f"mac{i + 1}", chip, memory), disk_free_bytes=extra.get("disk", DEFAULT_DISK_FREE))
            for i in range(count)
        )
        return Machine(hosts, f"{count}x{name}-{memory}GB", hypothetical=True)

    gpu = _lookup(KNOWN_GPUS, name)
    if gpu is None:
        raise UserInputError(f"{where}: unknown device '{one_line(name, 60)}'. Known: {known_machine_names()}")
    memory = size_gib or gpu.memory_gib[0]
    if memory not in gpu.memory_gib:
        sold = ", ".join(f"{m}GB" for m in gpu.memory_gib)
        raise UserInputError(f"{where}: {gpu.model} comes with {sold}, not {memory}GB")
    devices = tuple(gpu_device(i, gpu, memory) for i in range(count))
    # A GPU server usually has at least twice its GPU memory as RAM; say so in the label.
    ram = extra.get("ram", max(64 * GiB, 2 * count * memory * GiB))
    server = gpu.compute_capability in ((8, 0), (9, 0), (10, 0)) or name.upper() in ("V100", "L40S")
    host = Host(
        "localhost", "linux", ram, ram, 0, 0, extra.get("disk", DEFAULT_DISK_FREE), devices,
        cpu_bandwidth_bytes_per_s=SERVER_CPU_BANDWIDTH if server else DEFAULT_CPU_BANDWIDTH,
    )
    return Machine((host,), f"{count}x{name}-{memory}GB", hypothetical=True)


# ---- machine files ------------------------------------------------------------------------------

def load_machine_file(path: Path) -> Machine:
    """A machine described in TOML or JSON: hosts, each with GPUs (or a Mac chip) and RAM.

        label = "2x Mac Studio M2 Ultra"
        [[hosts]]
        name = "studio1"
        mac = "M2Ultra-192GB"            # or: gpus = "4xA100-80GB", or gpus = ["RTX3090", ...]
        ram = "192GB"                     # optional; defaults as for --machine strings
        disk = "2TB"                      # optional
        wired_limit = "180GB"             # optional, Macs: after `sysctl iogpu.wired_limit_mb=...`

    and, at the top, `link = "10gbe"` (or "tb4", "85us,0.9GB/s": what `runner launch --probe`
    printed) for the network between the hosts, which `runner plan` then counts.
    """
    data = _read_machine_file(path)
    hosts_data = data.get("hosts") if isinstance(data, dict) else None
    if not isinstance(hosts_data, list) or not hosts_data:
        raise UserInputError(f"{path}: a machine file needs a list of [[hosts]]")
    if len(hosts_data) > MAX_DEVICES:
        raise UserInputError(f"{path}: {len(hosts_data)} hosts? runner plans for 1 to {MAX_DEVICES}")
    hosts = []
    for number, entry in enumerate(hosts_data, start=1):
        if not isinstance(entry, dict):
            raise UserInputError(f"{path}: host {number} is not a table")
        name = str(entry.get("name", f"host{number}"))
        options = "".join(f",{key}={entry[key]}" for key in ("ram", "disk") if key in entry)
        def parse(key: str, value, options: str = "") -> Host:
            where = f"{path}: host '{one_line(name, 60)}'" + (f": {key}" if key else "")
            if str(value).lower().endswith((".toml", ".json")):
                raise UserInputError(f"{where} names a file; a machine file's hosts take strings like 4xA100-80GB")
            return parse_machine_string(f"{value}{options}", where).hosts[0]

        if "mac" in entry:
            host = parse("mac", entry["mac"], options)
            if "wired_limit" in entry:
                limit = _size_bytes(str(entry["wired_limit"]), f"{path}: wired_limit")
                device = replace(host.devices[0], total_bytes=limit, free_bytes=limit)
                host = replace(host, wired_limit_bytes=limit, devices=(device,))
        elif "gpus" in entry:
            gpus = entry["gpus"]
            if isinstance(gpus, str):
                host = parse("gpus", gpus, options)
            elif isinstance(gpus, list) and gpus:
                devices = []
                for gpu_text in gpus:
                    one = parse("gpus", gpu_text).devices
                    devices += [replace(d, name=f"cuda:{len(devices) + i}") for i, d in enumerate(one)]
                    if len(devices) > MAX_DEVICES:
                        raise UserInputError(f"{path}: host '{name}': more than {MAX_DEVICES} GPUs")
                base = parse("gpus", gpus[0], options)
                ram = base.ram_bytes if "ram" in entry else max(64 * GiB, 2 * sum(d.total_bytes for d in devices))
                host = replace(base, devices=tuple(devices), ram_bytes=ram, ram_available_bytes=ram)
            else:
                raise UserInputError(f"{path}: host '{name}': gpus must be a string or a list")
        elif "cpu" in entry or "ram" in entry:
            host = parse("", "cpu", options)
        else:
            raise UserInputError(f"{path}: host '{name}' needs mac = ..., gpus = ... or ram = ...")
        hosts.append(replace(host, name=name))
    label = str(data.get("label") or path.name)
    return Machine(tuple(hosts), label, hypothetical=True, link=_link(data.get("link"), path))


def _link(value, path: Path) -> str | None:
    """A machine file's `link`, checked as `runner plan --link` checks it."""
    if value is None:
        return None
    from runner.budget import parse_link

    if not isinstance(value, str):
        raise UserInputError(f"{path}: link must be a string like \"10gbe\" or \"85us,0.9GB/s\"")
    try:
        parse_link(value)
    except UserInputError as error:
        raise UserInputError(f"{path}: {str(error).replace('--link', 'link', 1)}") from None
    return value


def _read_machine_file(path: Path):
    """The TOML or JSON value in a machine file; one clear error for what cannot be read."""
    try:
        if not path.is_file():
            raise UserInputError(f"--machine {one_line(str(path), 60)}: no such file")
    except OSError as error:
        raise UserInputError(f"--machine {one_line(str(path), 60)}: cannot read ({error.strerror})") from None
    text = read_text(path, MACHINE_FILE_MAX_BYTES)
    if path.suffix.lower() != ".toml":
        return parse_json(text, path)
    import tomllib

    try:
        return tomllib.loads(text)
    except RecursionError:
        raise UserInputError(f"{path}: malformed TOML (nested too deeply)") from None
    except ValueError as error:   # tomllib.TOMLDecodeError; numbers of more than 4300 digits
        raise UserInputError(f"{path}: malformed TOML ({str(error).split(';')[0]})") from None


def example_machine_files() -> dict[str, Path]:
    """The machine files shipped with runner (the article's three set-ups): name -> path."""
    folder = Path(__file__).parent / "machines"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


# ---- detection ----------------------------------------------------------------------------------

def _nvml_devices() -> list[Device]:
    """CUDA GPUs through nvidia-ml-py (`pynvml`); [] when the library or the driver is missing."""
    if sys.platform == "linux" and not os.path.exists("/dev/nvidiactl"):
        return []   # no NVIDIA driver: skip importing pynvml (tens of ms of `runner plan`)
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    devices = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                capability = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            except Exception:
                capability = None
            try:
                clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
                bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
                bandwidth = clock_mhz * 1e6 * 2 * bus_bits / 8   # double data rate
            except Exception:
                bandwidth = _bandwidth_from_name(name)
            devices.append(Device(f"cuda:{index}", name, "cuda", int(memory.total), int(memory.free),
                                  float(bandwidth), capability))
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return devices


def _torch_devices() -> list[Device]:
    """CUDA GPUs through torch, only when torch is already imported (importing it takes seconds)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        devices.append(Device(f"cuda:{index}", props.name, "cuda", int(total), int(free),
                              _bandwidth_from_name(props.name), (props.major, props.minor)))
    return devices


def _bandwidth_from_name(name: str) -> float:
    squashed = name.replace(" ", "").upper()
    for key, gpu in sorted(KNOWN_GPUS.items(), key=lambda item: -len(item[0])):
        if key.upper() in squashed:
            for size, bandwidth in zip(gpu.memory_gib, gpu.bandwidth_gb_s):
                if f"{size}GB" in squashed:
                    return bandwidth * GB
            return gpu.bandwidth_gb_s[0] * GB
    return 0.0


def _sysctl(name: str) -> str | None:
    try:
        result = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _mac_chip(brand: str) -> KnownMac | None:
    squashed = brand.replace("Apple", "").replace(" ", "").lower()
    return _lookup(KNOWN_MACS, squashed)


def _disk_free(path: Path) -> int:
    for candidate in [path, *path.parents]:
        try:
            return shutil.disk_usage(candidate).free
        except OSError:   # not there yet (or not a path this system takes): its parent's disk
            continue
    return 0


def detect_machine() -> Machine:
    """This computer, measured now. Never imports torch; uses it only if it is already loaded."""
    import psutil

    from runner.paths import models_dir

    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    os_name = {"darwin": "darwin", "win32": "windows"}.get(sys.platform, "linux")
    disk = _disk_free(models_dir())
    devices: tuple[Device, ...] = ()
    unified = False
    wired_limit = 0
    cpu_bandwidth = float(DEFAULT_CPU_BANDWIDTH)

    if os_name == "darwin" and platform.machine() == "arm64":
        ram = int(_sysctl("hw.memsize") or memory.total)
        wired_mb = int(_sysctl("iogpu.wired_limit_mb") or 0)
        wired_limit = wired_mb * 1024 * 1024 if wired_mb > 0 else metal_working_set_bytes(ram)
        chip = _mac_chip(_sysctl("machdep.cpu.brand_string") or "")
        bandwidth = chip.bandwidth_gb_s * GB if chip else 0.0
        model = chip.model if chip else (_sysctl("machdep.cpu.brand_string") or "Apple silicon")
        free = min(wired_limit, int(memory.available))
        devices = (Device("metal", model, "metal", wired_limit, free, bandwidth),)
        unified = True
        cpu_bandwidth = bandwidth or cpu_bandwidth
    else:
        devices = tuple(_nvml_devices() or _torch_devices())

    host = Host(
        name=platform.node() or "localhost",
        os=os_name,
        ram_bytes=int(memory.total),
        ram_available_bytes=int(memory.available),
        swap_total_bytes=int(swap.total),
        swap_used_bytes=int(swap.used),
        disk_free_bytes=int(disk),
        devices=devices,
        unified_memory=unified,
        wired_limit_bytes=wired_limit,
        cpu_bandwidth_bytes_per_s=cpu_bandwidth,
    )
    return Machine((host,), "this machine")


def resolve_machine(text: str | None) -> Machine:
    """`--machine` as the user typed it: None is this computer."""
    if text is None or text.strip().lower() in ("", "this", "local", "localhost"):
        return detect_machine()
    if os.sep in text and not text.lower().endswith((".toml", ".json")):
        try:
            exists = Path(text).exists()
        except OSError:
            exists = False
        if not exists:
            raise UserInputError(f"--machine {one_line(text, 60)}: no such file")
    return parse_machine(text)

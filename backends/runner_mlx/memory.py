"""Memory as mlx sees it: measured bytes, and on macOS the GPU working set and wired limit.

On Apple silicon the GPU may keep at most the *wired limit* of unified memory resident
(`sysctl iogpu.wired_limit_mb`; 0 means the default, about the recommended working set that
`mx.device_info()["max_recommended_working_set_size"]` reports). A model above ~0.9 x that size
swaps and runs 40-150x slower, so runner warns before loading.
"""

from __future__ import annotations

import subprocess

MB = 1024 * 1024
GB = 1024 * MB
MACOS_RESERVE = 8 * GB   # what to leave to macOS itself when raising the wired limit


def wired_limit_bytes() -> int:
    """macOS `iogpu.wired_limit_mb` in bytes; 0 when it is the default or cannot be read."""
    try:
        output = subprocess.run(
            ["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return int(output) * MB
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0


def metal_limits() -> tuple[int, int, int] | None:
    """(recommended working set, wired limit in force, RAM) in bytes on Metal; None elsewhere."""
    import mlx.core as mx

    if not mx.metal.is_available():
        return None
    info = mx.device_info()
    recommended = int(info.get("max_recommended_working_set_size") or 0)
    ram = int(info.get("memory_size") or 0)
    wired = wired_limit_bytes() or recommended
    return recommended, wired, ram


def wired_limit_warning(model_bytes: int, recommended: int, wired: int, ram: int) -> str | None:
    """A warning when `model_bytes` will not sit in the GPU's wired memory; None when it fits."""
    limit = min(x for x in (recommended, wired) if x > 0) if (recommended or wired) else 0
    if limit == 0 or model_bytes <= 0.9 * limit:
        return None
    needed_mb = int(model_bytes * 1.1 / MB) + 1
    most_mb = int(max(ram - MACOS_RESERVE, 0) / MB)
    text = (
        f"the model needs {model_bytes / GB:.1f} GB but the GPU may wire only {limit / GB:.1f} GB "
        f"(0.9 x that is the safe size): expect swapping and 40-150x slower replies."
    )
    if most_mb >= needed_mb:
        text += (
            f" Raise the limit with `sudo sysctl iogpu.wired_limit_mb={needed_mb}` (until reboot). Risk: "
            f"memory wired for the GPU is taken from macOS; leave it at least {MACOS_RESERVE // GB} GB "
            f"(never above {most_mb}) or the machine can freeze."
        )
    else:
        text += " This Mac does not have the memory to wire that much safely: use a smaller quant or model."
    return text


def measured() -> tuple[int, int]:
    """(active, peak) bytes from mlx's allocator."""
    import mlx.core as mx

    return int(mx.get_active_memory()), int(mx.get_peak_memory())

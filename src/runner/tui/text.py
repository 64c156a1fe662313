"""Small formatting helpers shared by the widgets."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB', 8.1e9 -> '8.10 GB' (decimal units, like disk and GPU makers use)."""
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.1f} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def short_model_name(name: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct' -> 'SmolLM2-135M-Instruct'; a path -> its folder name."""
    return name.rstrip("/").rsplit("/", 1)[-1] or name

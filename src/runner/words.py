"""Counts in the words runner prints: "1 token", "2 tokens"."""


def counted(count: int, noun: str, spec: str = "") -> str:
    """`count` formatted with `spec` ("," groups thousands) and `noun`, plural unless it is 1."""
    return f"{count:{spec}} {noun}{'' if count == 1 else 's'}"

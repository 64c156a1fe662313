"""Counts and quoted text as runner prints them: "1 token", "2 tokens"; a long error on one line."""


def counted(count: int, noun: str, spec: str = "") -> str:
    """`count` formatted with `spec` ("," groups thousands) and `noun`, plural unless it is 1."""
    return f"{count:{spec}} {noun}{'' if count == 1 else 's'}"


def one_line(text: str, width: int) -> str:
    """`text` with its whitespace runs as single spaces, cut to `width` characters with "…" (no
    space left before it)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"

"""The options every model command shares, declared once: MODEL, --backend, --quant, --context,
and the load switches; and the step from parsed arguments to the core's `resolve`."""

from __future__ import annotations

import argparse
import re

from runner.errors import UserInputError
from runner.words import one_line


class Parser(argparse.ArgumentParser):
    """runner's argument parser: a malformed command line (a missing -p, an unknown option, a value
    outside its choices) is one line and exit code 2, as every other bad input; argparse's own
    error prints the usage block first. Sub-commands' parsers are of this class too."""

    def error(self, message: str):
        command = "" if self.prog == "runner" else f"{self.prog}: "   # the sub-command, e.g. "runner plan: "
        self.exit(2, f"runner: error: {command}{' '.join(message.split())}\n")


def parse_count(text: str, what: str) -> int:
    """'8192', '8k', '128K', '1m' -> an int; a clear error otherwise."""
    match = re.fullmatch(r"\s*(-?\d{1,12}(?:\.\d{1,6})?)\s*([kKmM]?)\s*", text)
    if not match:
        raise UserInputError(f"{what} must be a number like 8192 or 8k, not '{one_line(text, 40)}'")
    value = float(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]
    if value != int(value):
        raise UserInputError(f"{what} must be a whole number, not '{text}'")
    return int(value)


def context_count(text: str) -> int:
    """argparse type for --context: '8192' or '8k'; at least 1 token (the model's maximum is
    checked by the plan, which knows the model). Raises UserInputError, which argparse lets
    through to the CLI's one-line error."""
    value = parse_count(text, "--context")
    if value < 1:
        raise UserInputError(f"--context must be a positive number of tokens, not {text}")
    return value


def known(what: str, names):
    """argparse type: one of `names()`, else one line naming them (argparse's own error would
    print its usage block too)."""
    def check(text: str) -> str:
        if text not in names():
            raise UserInputError(f"unknown {what} '{one_line(text, 40)}' (known: {', '.join(names())})")
        return text
    return check


def add_model_arguments(parser: argparse.ArgumentParser, *, load: bool = True,
                        backend_help: str = "default: what the plan recommends for this machine",
                        quant_help: str = "default: what the plan recommends for this machine",
                        model_help: str = "a folder with config.json, a Hugging Face id (local cache or runner's "
                                          "catalog), or nothing for the built-in SmolLM2-135M-Instruct") -> None:
    """MODEL, --backend, --quant, --context, --kv-bits; with `load`, the switches of a real load too."""
    from runner.backend import all_quants, backend_names

    parser.add_argument("model", nargs="?", default=None, metavar="MODEL", help=model_help)
    parser.add_argument("--backend", type=known("backend", backend_names), default=None,
                        metavar="|".join(backend_names()), help=backend_help)
    parser.add_argument("--quant", type=known("quantization", all_quants), default=None, metavar="Q",
                        help=f"{', '.join(all_quants())}; {quant_help}")
    parser.add_argument("--context", type=context_count, default=None, metavar="N",
                        help="tokens of prompt + reply to plan for, e.g. 8192 or 8k (default: 4096 or the model's maximum)")
    parser.add_argument("--kv-bits", type=int, choices=(8, 4), default=None,
                        help="store the KV cache quantized to 8 or 4 bits (default: the compute dtype)")
    if not load:
        return
    parser.add_argument("--allow-offload", action="store_true",
                        help="load even when the plan needs CPU/disk offload (very slow)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repository's own Python code (off by default)")
    add_decode_arguments(parser)


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """How the backend decodes: its fast path or the library's loop, and a named kernel."""
    from runner.backend import backend_class, backend_names

    kernels = "; ".join(f"{name}: {', '.join(backend_class(name).kernels)}" for name in backend_names()
                        if getattr(backend_class(name), "kernels", ()))
    parser.add_argument("--no-fast-decode", dest="fast_decode", action="store_false",
                        help="decode through the library's ordinary loop instead of the backend's fast path")
    parser.add_argument("--kernel", default=None,
                        help=f"a backend's named kernel, default: its own ({kernels})")


def load_options(args: argparse.Namespace, *, chat: bool = True):
    from runner.choice import LoadOptions

    return LoadOptions(
        allow_offload=getattr(args, "allow_offload", False),
        trust_remote_code=getattr(args, "trust_remote_code", False),
        fast_decode=getattr(args, "fast_decode", True),
        kernel=getattr(args, "kernel", None),
        chat=chat,
    )


def refuse_a_share(model: str | None) -> None:
    """chat and generate load a whole model: where the Hugging Face cache holds only one host's
    share of `model` (`runner pull --layers`, which `load_spec` does not offer), say so and what to
    run instead, rather than "not in the Hugging Face cache"."""
    from runner.model import hf_cache_snapshot
    from runner.paths import user_path
    from runner.store import share_snapshot

    try:
        if not model or user_path(model).exists() or hf_cache_snapshot(model) is not None:
            return
    except OSError:     # a name the filesystem refuses: load_spec says so
        return
    share = share_snapshot(model)
    if share is not None:
        start, stop = share[1]
        raise UserInputError(
            f"{model}: this Hugging Face cache holds only layers {start}-{stop - 1} of it, one host's share of a "
            f"split (runner pull --layers); run it over the hosts with `runner launch --hosts A,B {model}`, "
            f"or download the rest: runner pull {model}"
        )


def choose(args: argparse.Namespace, *, machine=None, schemes=None, batch: int = 1):
    """The core's Choice for what the user typed (the spec, the machine, resolve)."""
    from runner.choice import resolve
    from runner.hardware import resolve_machine
    from runner.model import load_spec

    spec = load_spec(args.model)
    if machine is None:
        machine = resolve_machine(getattr(args, "machine", None))
    return resolve(spec, machine, args.backend, args.quant, args.context, batch=batch,
                   kv_bits=getattr(args, "kv_bits", None), schemes=schemes)

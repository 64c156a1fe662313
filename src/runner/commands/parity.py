"""`runner parity`: do two backends or quantizations give the same answers?

    runner parity [MODEL] --a cuda:fp32 --b cuda:nf4 --b mlx:q4     compare in this process
    runner parity [MODEL] --a cuda:bf16 --b cuda:bf16,kv8          the same, the KV cache in 8 bits
    runner parity record [MODEL] --backend mlx:q4 -o mac.parity      write a portable record
    runner parity compare linux.parity mac.parity                    compare records (first = reference)

Exit code: 0 when every pair passes its verdict, 1 when one fails, 2 for bad input (including
records of different models) or when no session could be compared.
"""

from __future__ import annotations

import argparse
import json
import sys

from runner.commands.options import Parser
from runner.errors import UserInputError

DEFAULT_REFERENCE = "cuda:fp32"
DEFAULT_CONTEXT_CAP = 4096


class _IntermixedParser(Parser):
    """Lets the model or record files come after options (`record --backend mlx:q4 MODEL -o F`):
    a plain parser takes positionals in one run and rejects a second run as unrecognized."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.__class__ = _IntermixedParser
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "forms:\n"
        "  runner parity [MODEL] --a cuda:fp32 --b cuda:nf4 --b mlx:q4\n"
        "  runner parity [MODEL] --a cuda:bf16 --b cuda:bf16,kv8 --b cuda:bf16,kv4   (KV cache bits)\n"
        "  runner parity record [MODEL] --backend mlx:q4 -o mac.parity\n"
        "  runner parity compare REFERENCE.parity OTHER.parity [...]\n"
        "verdict thresholds by the looser side of a pair (override with --max-kl / --min-top1):\n"
        + "\n".join(f"  {t.scheme:7} {t.describe()}" for t in _default_thresholds())
    )
    parser.add_argument("words", nargs="*", metavar="[record|compare] MODEL/FILES",
                        help="a model (id or folder; default: SmolLM2-135M-Instruct), or 'record [MODEL]', "
                        "or 'compare FILE FILE...'")
    parser.add_argument("--a", dest="reference", metavar="BACKEND:QUANT[,kv8|kv4]",
                        help=f"the reference session (default {DEFAULT_REFERENCE}); ,kv8 or ,kv4 quantizes its "
                        "KV cache (as --kv-bits does), and its logits read it")
    parser.add_argument("--b", dest="others", action="append", default=[], metavar="BACKEND:QUANT[,kv8|kv4]",
                        help="a session to compare against the reference (repeat for more)")
    parser.add_argument("--backend", metavar="BACKEND:QUANT[,kv8|kv4]", help="record: the session to record")
    parser.add_argument("-o", "--output", metavar="FILE", help="record: where to write the .parity record")
    parser.add_argument("--prompts", metavar="FILE",
                        help="more prompts: JSON list, or plain text with prompts separated by blank lines")
    parser.add_argument("--no-builtin-prompts", action="store_true", help="use only the prompts of --prompts")
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy reply length per prompt (default 32)")
    parser.add_argument("--context", type=int,
                        help=f"context to load with; longer prompts are cut (default: the model's, at most "
                        f"{DEFAULT_CONTEXT_CAP})")
    parser.add_argument("--top-k", type=int, default=64, help="record: logits kept per position (default 64)")
    parser.add_argument("--max-kl", type=float, help="fail a pair whose mean KL (nats) is above this")
    parser.add_argument("--min-top1", type=float, help="fail a pair whose top-1 agreement is below this (0..1)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _default_thresholds():
    from runner.parity import DEFAULT_THRESHOLDS

    return DEFAULT_THRESHOLDS.values()


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_numbers(args: argparse.Namespace) -> None:
    if args.max_kl is not None and not args.max_kl >= 0:
        raise UserInputError("--max-kl must be 0 or more")
    if args.min_top1 is not None and not 0 <= args.min_top1 <= 1:
        raise UserInputError("--min-top1 is a fraction between 0 and 1, e.g. 0.9")
    if args.max_tokens < 1:
        raise UserInputError("--max-tokens must be at least 1")
    if args.top_k < 5:
        raise UserInputError("--top-k must be at least 5 (top-5 overlap needs them)")
    if args.context is not None and args.context < 2:
        raise UserInputError("--context must be at least 2")


def _prompts(args: argparse.Namespace):
    from runner.parity import builtin_prompts, read_prompts

    prompts = [] if args.no_builtin_prompts else builtin_prompts()
    if args.prompts:
        prompts += read_prompts(args.prompts)
    if not prompts:
        raise UserInputError("no prompts: --no-builtin-prompts needs --prompts FILE")
    names = [p.name for p in prompts]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UserInputError(f"prompt names must be unique; repeated: {', '.join(duplicated)}")
    return prompts


def _spec(model: str | None):
    from runner.model import DEFAULT_MODEL_ID, load_spec

    spec = load_spec(model)
    if spec.path is None and (model is None or model.lower() == DEFAULT_MODEL_ID.lower()):
        from runner.default_model import import_default_model

        _progress("importing the default model (once)")
        import_default_model()
        spec = load_spec(model)
    if spec.path is None:
        raise UserInputError(f"{spec.name}: only its config is known (runner's catalog); parity needs the weights")
    return spec


def _context(args: argparse.Namespace, spec) -> int:
    if args.context is None:
        return min(spec.max_context, DEFAULT_CONTEXT_CAP)
    if args.context > spec.max_context:
        raise UserInputError(f"--context {args.context} is more than {spec.name} allows ({spec.max_context})")
    return args.context


def _print_results(args, reference, results, skipped=(), warnings=(), others=()) -> int:
    from runner.parity import format_table, report_json

    if args.json:
        print(json.dumps(report_json(reference, results, skipped, warnings, others), indent=2))
    else:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(format_table(reference, results, skipped))
    if not results:
        print("runner: error: no session could be compared with the reference", file=sys.stderr)
        return 2
    return 0 if all(r.passed for r in results) else 1


def run(args: argparse.Namespace) -> int:
    from runner.parity import parse_target

    _check_numbers(args)
    words = list(args.words)
    mode = words.pop(0) if words and words[0] in ("record", "compare") else "run"
    if mode != "record" and (args.backend or args.output):
        raise UserInputError("--backend and -o belong to 'runner parity record'")
    if mode != "run" and (args.reference or args.others):
        raise UserInputError("--a and --b belong to 'runner parity [MODEL]' (records carry their own backend)")

    if mode == "compare":
        return _compare(args, words)
    if len(words) > 1:
        raise UserInputError(f"one model at a time, got: {' '.join(words)}")
    model = words[0] if words else None

    if mode == "record":
        if not args.backend:
            raise UserInputError("record needs --backend BACKEND:QUANT, e.g. --backend mlx:q4")
        if not args.output:
            raise UserInputError("record needs -o FILE, e.g. -o mac.parity")
        return _record(args, model, parse_target(args.backend))

    from runner.parity import run_parity

    if not args.others:
        raise UserInputError("name at least one session to compare with --b BACKEND:QUANT, e.g. --b cuda:nf4")
    reference = parse_target(args.reference or DEFAULT_REFERENCE)
    others = [parse_target(text) for text in args.others]
    prompts = _prompts(args)
    spec = _spec(model)
    report = run_parity(
        spec, reference, others, prompts,
        context=_context(args, spec), max_tokens=args.max_tokens, top_k_size=args.top_k,
        max_kl=args.max_kl, min_top1=args.min_top1, progress=_progress,
    )
    return _print_results(args, report.reference, report.results, report.skipped, report.warnings, report.others)


def _record(args: argparse.Namespace, model: str | None, target) -> int:
    from runner.parity import capture, load_session, write_record

    prompts = _prompts(args)
    spec = _spec(model)
    context = _context(args, spec)
    _progress(f"loading {target.label}")
    session = load_session(spec, target, context)
    try:
        _progress(f"running {len(prompts)} prompts through {target.label}")
        result = capture(session, prompts, context=context, max_tokens=args.max_tokens, top_k_size=args.top_k,
                         keep_logits=False, kv_bits=target.kv_bits,
                         warn=lambda message: _progress(f"warning: {message}"))
    finally:
        session.close()
    path = write_record(result, args.output)
    summary = {"record": str(path), "model": result.meta["model"], "backend": target.label,
               "prompts": len(result.prompts), "positions": int(sum(len(p.token_ids) for p in result.prompts))}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {path}: {summary['model']} on {target.label}, {summary['prompts']} prompts, "
              f"{summary['positions']} positions, top-{args.top_k} logits")
    return 0


def _compare(args: argparse.Namespace, files: list[str]) -> int:
    from runner.parity import compare, read_record, thresholds_for

    if len(files) < 2:
        raise UserInputError("compare needs two or more records: REFERENCE.parity OTHER.parity [...]")
    if args.prompts or args.no_builtin_prompts:
        raise UserInputError("records carry their own prompts; --prompts does not apply to compare")
    reference, *others = [read_record(path) for path in files]
    results = []
    for path, other in zip(files[1:], others):
        thresholds = thresholds_for(reference.scheme, other.scheme, args.max_kl, args.min_top1)
        try:
            results.append(compare(reference, other, thresholds))
        except UserInputError as error:
            raise UserInputError(f"{path} cannot be compared with {files[0]}: {error}") from None
    return _print_results(args, reference, results, others=others)

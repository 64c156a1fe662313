"""The README's parity table: SmolLM2-135M-Instruct (the default model) on every scheme this machine
runs, against torch float32, with the built-in prompts and 32-token greedy replies.

    .venv/bin/python bench/parity_smollm2.py [--json out.json] [--rope-theta-top-level]

Sessions are loaded one at a time (`runner.parity.run_parity`, what `runner parity` runs); a
scheme whose backend cannot run here is listed as skipped.

--rope-theta-top-level runs on a copy of the model folder (weights linked, not copied) whose
config.json also carries `rope_theta` at the top level, as transformers 4 wrote it. transformers 5
writes it only inside `rope_parameters`, which mlx-lm 0.32 does not read: it then runs the model
with its default theta (10000 instead of SmolLM2's 100000). The MLX backend has lifted
`rope_parameters` to `rope_theta` since commit 642fc34, so the flag no longer changes the numbers;
it stays to reproduce the comparison (without the fix, MLX float32 vs torch float32: mean KL 0.09,
top-1 89 %, FAIL).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from runner.default_model import import_default_model
from runner.model import load_spec
from runner.parity import builtin_prompts, format_table, parse_target, report_json, run_parity

REFERENCE = "cuda:fp32"
OTHERS = ["cuda:bf16", "cuda:int8", "cuda:nf4", "mlx:fp32", "mlx:bf16", "mlx:q8", "mlx:q4"]


def folder_with_top_level_rope_theta(folder: Path) -> Path:
    copy = folder.parent / (folder.name + "-rope-theta-top-level")
    if not copy.exists():
        copy.mkdir()
        for item in folder.iterdir():
            if item.name != "config.json":
                (copy / item.name).symlink_to(item.resolve())
        config = json.loads((folder / "config.json").read_text())
        config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
        (copy / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return copy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the JSON report here")
    parser.add_argument("--rope-theta-top-level", action="store_true", help="see the module's docstring")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--others", nargs="*", default=OTHERS)
    args = parser.parse_args()

    folder = import_default_model()
    if args.rope_theta_top_level:
        folder = folder_with_top_level_rope_theta(folder)
    spec = load_spec(str(folder))
    started = time.perf_counter()
    report = run_parity(
        spec, parse_target(REFERENCE), [parse_target(t) for t in args.others], builtin_prompts(),
        context=2048, max_tokens=args.max_tokens,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{date} · {platform.system()} {platform.machine()}, CPU only · "
          f"{', '.join(f'{k} {v}' for k, v in report.reference.meta['versions'].items())} · "
          f"{time.perf_counter() - started:.0f} s")
    print(format_table(report.reference, report.results, report.skipped))
    for result in report.results:
        print(f"{result.other}: " + "; ".join(f"{name}: {reply!r}" for name, (_, reply) in list(result.answers.items())[:2]))
    if args.json:
        Path(args.json).write_text(json.dumps(report_json(report.reference, report.results, report.skipped,
                                                          report.warnings, report.others), indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""How fast do `runner --help` and `runner plan` start, and do they stay free of heavy imports?

    .venv/bin/python bench/startup.py [--runs 9]

Each command runs in a fresh subprocess (`python -m runner.cli ...`, what the `runner` script
does) several times; the median wall time is printed next to a bare `python -c pass` run the
same way in the same session (the baseline: the interpreter's own start-up). A second pass runs
each command with `-X importtime` and lists any torch / transformers / mlx / accelerate /
bitsandbytes module it imported: there must be none.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HEAVY = ("torch", "transformers", "mlx", "mlx_lm", "accelerate", "bitsandbytes", "numpy", "safetensors")

COMMANDS = {
    "python -c pass (baseline)": ["-c", "pass"],
    "runner --help": ["-m", "runner.cli", "--help"],
    "runner plan": ["-m", "runner.cli", "plan"],
    "runner plan 405B --machine 4xA100-80GB": ["-m", "runner.cli", "plan", "meta-llama/Llama-3.1-405B-Instruct",
                                               "--machine", "4xA100-80GB"],
}


def wall_times(args: list[str], runs: int, env: dict) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def heavy_imports(args: list[str], env: dict) -> list[str]:
    result = subprocess.run([sys.executable, "-X", "importtime", *args], env=env, capture_output=True, text=True,
                            check=True)
    found = set()
    for line in result.stderr.splitlines():
        if "|" not in line:
            continue
        module = line.rsplit("|", 1)[1].strip()
        if module.split(".")[0] in HEAVY:
            found.add(module.split(".")[0])
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    env = dict(os.environ)
    env["RUNNER_HOME"] = tempfile.mkdtemp(prefix="runner-bench-")
    print(f"python {sys.version.split()[0]} · {os.cpu_count()} cores · {args.runs} runs each, median (min-max)")
    failures = 0
    for label, command in COMMANDS.items():
        wall_times(command, 1, env)  # warm the file cache
        times = wall_times(command, args.runs, env)
        heavy = heavy_imports(command, env) if "runner" in label else []
        median = statistics.median(times)
        verdict = "" if "baseline" in label else ("  ok" if median < 0.5 and not heavy else "  TOO SLOW / HEAVY")
        failures += verdict.endswith("HEAVY")
        print(f"  {label:<42} {median * 1000:6.0f} ms  ({min(times) * 1000:.0f}-{max(times) * 1000:.0f})  "
              f"heavy imports: {', '.join(heavy) or 'none'}{verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

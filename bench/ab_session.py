"""The 8B session's decode (or a rehearsal's), this tree's runner_cuda against an earlier revision's, on one GPU.

Alternating processes, one a side and round: how bench/RESULTS.md's before/after tables of issue 19
are made.

    python3 bench/ab_session.py export REV                        # here: REV's runner_cuda into .ab/REV
    python3 bench/ab_session.py run REV [--rounds 2] [--quant nf4] [--out DIR]    # on the GPU machine
    python3 bench/ab_session.py run REV --rehearse meta-llama/Llama-3.1-70B-Instruct   # its NF4 decode at 8k

`export` needs git (the GPU machine gets no .git): carry `.ab` there. `run` starts one process per
side and round, REV first, then the tree, alternated; each measures its own copy bandwidth, loads the
same checkpoint (cuda_speed.write_checkpoint, written once under /tmp/cuda-speed), and records
cuda_speed's `ahead` section (128 greedy tokens at position 1,024 a step ahead and in turn, the graph
replayed back to back, the fraction of the roofline) and which runner_cuda it imported. JSON a side
and round under --out; the last line compares the best of each side. With --rehearse MODEL each
process is `runner rehearse MODEL --quant nf4 --context 8192 --decode-tokens 64` (bench/rehearse_gpu.py
--one, random weights built on the GPU), its median decode step against the roofline of the bytes it
reads a token at the copy bandwidth measured once, first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPORTS = ROOT / ".ab"
TREE = "tree"


def export(revision: str) -> Path:
    """REV's backends/runner_cuda under .ab/REV/backends (replaced if there)."""
    folder = EXPORTS / revision
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "backends/runner_cuda"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "backends"


def one(side: str, quant: str, out: Path) -> None:
    """This process's measurement of `side` (a revision exported by `export`, or the tree)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import cuda_speed as cs          # puts the tree's backends first on sys.path: a revision's go before it

    if side != TREE:
        sys.path.insert(0, str(EXPORTS / side / "backends"))
    import runner_cuda

    checkpoint = Path("/tmp/cuda-speed/llama-3.1-8b-random")
    cs.record("machine", copy_bandwidth_gb_s=cs.copy_bandwidth() / 1e9, side=side, runner_cuda=runner_cuda.__file__)
    if not (checkpoint / "config.json").exists():
        cs.write_checkpoint(checkpoint)
    cs.section_session(checkpoint, quant, {"ahead"})
    out.write_text(json.dumps(cs.RESULTS, indent=2, default=str))


def exported(revision: str) -> str:
    """`revision`, once `export` has put its runner_cuda under .ab."""
    if not (EXPORTS / revision / "backends" / "runner_cuda").is_dir():
        raise SystemExit(f"ab_session: no export of {revision} under .ab (run `export {revision}` where git is)")
    return revision


def run(revision: str, rounds: int, quant: str, out: Path) -> None:
    """`rounds` rounds of REV then the tree, each side in a process of its own; the comparison."""
    out.mkdir(parents=True, exist_ok=True)
    best: dict = {}
    copies, read = [], 0.0           # each process's copy bandwidth (GB/s); bytes a token reads
    for round_ in range(1, rounds + 1):
        for side in (revision, TREE):
            path = out / f"ab-{side}-{round_}.json"
            subprocess.run([sys.executable, __file__, "one", side, "--quant", quant, "--out", str(path)], check=True)
            record = json.loads(path.read_text())
            ahead = record[f"{quant} session decode ahead at 1024"]
            copies.append(record["machine"]["copy_bandwidth_gb_s"])
            read = copies[-1] * 1e9 / ahead["roofline_tok_s"]
            rate = max(ahead["tok_s_ahead"])
            print(f"{side} round {round_}: {rate:.1f} tok/s a step ahead ({ahead['fraction_of_roofline_ahead']:.1%} "
                  f"of the roofline at its process's {copies[-1]:,.0f} GB/s), graph "
                  f"{ahead['graph_replay_back_to_back_us']:.0f} us a token", flush=True)
            best[side] = max(best.get(side, 0.0), rate)
    print(f"tree / {revision}: {best[TREE] / best[revision]:.3f} ({best[revision]:.1f} -> {best[TREE]:.1f} tok/s)")
    # a process's copy measures within a few % of another's on one GPU: the highest is the strictest roofline
    roofline = max(copies) * 1e9 / read
    print(f"of the roofline at the run's highest copy bandwidth ({max(copies):,.0f} GB/s): "
          f"{revision} {best[revision] / roofline:.1%}, tree {best[TREE] / roofline:.1%}")


def rehearse(revision: str, model: str, rounds: int, out: Path) -> None:
    """`rounds` rounds of REV's then the tree's rehearsal of `model`, each in a process of its own."""
    import rehearse_gpu

    out.mkdir(parents=True, exist_ok=True)
    bandwidth = rehearse_gpu.copy_bandwidth()
    arguments = [model, "--quant", "nf4", "--context", "8192", "--decode-tokens", "64"]
    best: dict = {}
    for round_ in range(1, rounds + 1):
        for side in (revision, TREE):
            env = dict(os.environ)
            if side != TREE:          # REV's runner_cuda before the tree's
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXPORTS / side / "backends"), env.get("PYTHONPATH")]))
            process = subprocess.run([sys.executable, str(ROOT / "bench" / "rehearse_gpu.py"), "--one", *arguments],
                                     capture_output=True, text=True, env=env)
            if process.returncode:
                raise SystemExit(f"ab_session: {side}'s rehearsal failed:\n{process.stderr[-3000:]}")
            record = json.loads(process.stdout)["rehearsal"]
            read = sum(d["weights"] + d["kv_cache"] for d in record["devices"])
            rate = record["decode_tokens_per_s"]
            (out / f"rehearse-{side}-{round_}.json").write_text(json.dumps(
                {"copy_bandwidth_gb_s": bandwidth / 1e9, "bytes_read_per_token": read, "rehearsal": record}, indent=2))
            print(f"{side} round {round_}: {rate:.2f} tok/s ({rate / (bandwidth / read):.1%} of the roofline at "
                  f"{bandwidth / 1e9:,.0f} GB/s)", flush=True)
            best[side] = max(best.get(side, 0.0), rate)
    print(f"tree / {revision}: {best[TREE] / best[revision]:.3f} ({best[revision]:.2f} -> {best[TREE]:.2f} tok/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("export").add_argument("revision")
    for name in ("run", "one"):
        command = commands.add_parser(name)
        command.add_argument("side" if name == "one" else "revision")
        command.add_argument("--quant", default="nf4", choices=("nf4", "bf16"))
    commands.choices["run"].add_argument("--rounds", type=int, default=2)
    commands.choices["run"].add_argument("--rehearse", metavar="MODEL", help="compare `runner rehearse MODEL`'s NF4 decode at 8k")
    commands.choices["run"].add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    commands.choices["one"].add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "export":
        print(export(args.revision))
    elif args.command == "run" and args.rehearse:
        if args.quant != "nf4":
            raise SystemExit("ab_session: --rehearse compares NF4 decoding")
        rehearse(exported(args.revision), args.rehearse, args.rounds, args.out)
    elif args.command == "run":
        run(exported(args.revision), args.rounds, args.quant, args.out)
    else:
        one(args.side, args.quant, args.out)


if __name__ == "__main__":
    main()

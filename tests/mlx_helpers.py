"""Helpers for the MLX tests: load through the real backend, run the real CLI in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROMPT = "What is the capital of France?"


def load(folder: Path, quant: str, progress: list | None = None, context: int = 256):
    """A real MlxSession for `folder` (converted into the test RUNNER_HOME if needed)."""
    from runner.backend import LoadRequest, get_backend
    from runner.model import load_spec

    spec = load_spec(str(folder))
    return get_backend("mlx").load(LoadRequest(spec, quant=quant, context=context,
                                               on_progress=progress.append if progress is not None else None))


def greedy_tokens(session, prompt: str = PROMPT, max_tokens: int = 16) -> list[int]:
    from runner.backend import Message, Sampling

    chunks = list(session.stream([Message("user", prompt)], Sampling(max_tokens=max_tokens)))
    return [c.token for c in chunks if c.token is not None]


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def runner(*args: str, timeout: float = 120, stdin: str | None = None, env: dict | None = None,
           python_prelude: str = "") -> subprocess.CompletedProcess:
    """`runner ARGS` in a fresh process (the test RUNNER_HOME is inherited), with a time limit."""
    code = f"{python_prelude}\nimport sys\nfrom runner.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, input=stdin if stdin is not None else "",
                          env={**os.environ, **(env or {})})


def launch_popen(*args: str) -> subprocess.Popen:
    code = "import sys\nfrom runner.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "launch", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_processes(parent_pid: int) -> dict[int, "psutil.Process"]:
    """rank -> process of the `runner_mlx.rank` processes under `parent_pid`."""
    import psutil

    ranks = {}
    for child in psutil.Process(parent_pid).children(recursive=True):
        try:
            environ = child.environ()
            if "runner_mlx.rank" in " ".join(child.cmdline()) and "MLX_RANK" in environ:
                ranks[int(environ["MLX_RANK"])] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return ranks

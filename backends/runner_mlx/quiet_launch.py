"""`mlx.launch` without its busy loop: `python -m runner_mlx.quiet_launch ARGS` is `mlx.launch ARGS`.

mlx.launch (mlx 0.32) runs a thread per rank that forwards its own stdin to the rank and relays
the rank's output. That thread waits in `select(outputs, [rank's stdin], [], 1.0)`, and a pipe with
room in it is always writable: the select returns at once, every time, and the thread spins a CPU
core per rank for as long as the ranks run, taking that core from the ranks themselves.

Here that wait ignores the stdin pipe until there is something to forward: it waits for output
(at most 50 ms), then reports the pipe writable as before, so the thread writes whenever its
buffer holds something. runner never sends the ranks anything on stdin; the delay only bounds
how late a rank's exit or output is noticed. If mlx's module no longer looks like this, it runs
unchanged.
"""

from __future__ import annotations

import select as _select
import sys

WAIT = 0.05     # seconds a rank's thread waits for output before it loops


def quiet_select(readable, writable, exceptional, timeout=None):
    if writable and (timeout is None or timeout > 0):
        ready, _, broken = _select.select(readable, [], exceptional, WAIT if timeout is None else min(timeout, WAIT))
        return ready, list(writable), broken
    return _select.select(readable, writable, exceptional, timeout)


def patch() -> bool:
    """Give mlx.launch's module the quiet wait; False if the module no longer waits with select."""
    from mlx._distributed_utils import launch

    if getattr(launch, "select", None) is _select.select:
        launch.select = quiet_select
    return launch.select is quiet_select


def main() -> int:
    from mlx._distributed_utils import launch

    patch()
    sys.argv[0] = "mlx.launch"
    return launch.main()


if __name__ == "__main__":
    sys.exit(main())

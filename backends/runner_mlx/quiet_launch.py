"""`mlx.launch` as runner needs it: `python -m runner_mlx.quiet_launch ARGS` is `mlx.launch ARGS`
with three changes to mlx's private module (checked against mlx 0.32.4; if the module no longer
looks like this, it runs unchanged):

- No busy loop. mlx.launch runs a thread per rank that forwards its own stdin to the rank and
  relays the rank's output. That thread waits in `select(outputs, [rank's stdin], [], 1.0)`, and a
  pipe with room in it is always writable: the select returns at once, every time, and the thread
  spins a CPU core per rank for as long as the ranks run, taking that core from the ranks
  themselves. Here that wait ignores the stdin pipe until there is something to forward: it waits
  for output (at most 50 ms), then reports the pipe writable as before. runner never sends the
  ranks anything on stdin; the delay only bounds how late a rank's exit or output is noticed.
- A remote rank's stdout and stderr stay apart. mlx.launch runs `ssh -tt`, whose terminal merges
  them: the ranks' status lines arrived on stdout, mixed into the reply (and every newline became
  CRLF). Here it runs `ssh -T`. Without the terminal's hang-up a rank whose ssh dies notices
  through its watchdog instead: its parent, the ssh session, is gone.
- Stopping a remote rank is bounded and quiet. mlx.launch kills it with another ssh, which on a
  host cut off the network waited for TCP's own timeout (minutes) and then raised
  CalledProcessError, a traceback. Here that ssh gives up after a few seconds (the rank's heartbeat
  stops it on its own: `runner_mlx.rank`).
"""

from __future__ import annotations

import select as _select
import subprocess
import sys

WAIT = 0.05         # seconds a rank's thread waits for output before it loops
KILL_TIMEOUT = 5    # seconds the ssh that stops a remote rank may take to connect


def quiet_select(readable, writable, exceptional, timeout=None):
    if writable and (timeout is None or timeout > 0):
        ready, _, broken = _select.select(readable, [], exceptional, WAIT if timeout is None else min(timeout, WAIT))
        return ready, list(writable), broken
    return _select.select(readable, writable, exceptional, timeout)


def rank_process_class(base):
    """mlx.launch's RemoteProcess over `ssh -T`, with a bounded, quiet terminate."""

    class RankProcess(base):
        def __init__(self, rank, host, python, cwd, files, env, command):
            self._host = host
            self._pidfile = None
            self._is_local = host == "127.0.0.1"
            self._killed = False
            # is_local=True leaves out the script's `stty -echo`: there is no terminal to quiet
            script = self.make_launch_script(rank, python, cwd, files, env, command, True)
            argv = (["/bin/bash", "-c", script] if self._is_local
                    else ["ssh", "-T", "-o", "LogLevel=QUIET", self._host, script])
            self._process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE)

        def terminate(self):
            if self._killed:
                return
            self._process.terminate()
            self._process.wait()
            if not self._pidfile:        # the rank never started: nothing to kill
                return
            script = self.make_kill_script(self._pidfile)
            argv = (["/bin/bash", "-c", script] if self._is_local else
                    ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={KILL_TIMEOUT}", self._host, script])
            try:
                done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                      timeout=KILL_TIMEOUT + 5)
            except subprocess.TimeoutExpired:
                return                   # unreachable: its rank stops by itself
            self._killed = done.stdout.strip() == "1"

    return RankProcess


def patch() -> bool:
    """Give mlx.launch's module the quiet wait and runner's rank process; False if the module no
    longer looks as expected (then mlx.launch runs unchanged)."""
    from mlx._distributed_utils import launch

    expected = (getattr(launch, "select", None) in (_select.select, quiet_select)
                and all(hasattr(getattr(launch, "RemoteProcess", None), name)
                        for name in ("make_launch_script", "make_kill_script", "preprocess_output")))
    if not expected:
        return False
    if launch.select is _select.select:
        launch.select = quiet_select
        launch.RemoteProcess = rank_process_class(launch.RemoteProcess)
    return True


def main() -> int:
    from mlx._distributed_utils import launch

    patch()
    sys.argv[0] = "mlx.launch"
    return launch.main()


if __name__ == "__main__":
    sys.exit(main())

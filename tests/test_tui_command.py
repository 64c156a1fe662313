"""`runner chat` at the command line: clear refusals before any window opens."""

import subprocess
import sys


def run_runner(*args):
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


def test_chat_without_a_terminal_says_what_to_use_instead():
    result = run_runner("chat")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "runner: error: runner chat needs a terminal (stdin and stdout are not one); "
        "for scripts use `runner generate MODEL -p PROMPT`"
    )
    assert "Traceback" not in result.stderr


def test_bare_runner_is_chat_and_a_tiny_context_is_refused():
    result = run_runner("--context", "4")
    assert result.returncode == 2
    assert "--context 4 is too small to chat" in result.stderr

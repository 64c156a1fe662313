#!/usr/bin/env bash
# Drive `runner chat` in a real terminal (tmux) as a person would: start it, wait for the model,
# type a message, wait for the reply to finish, and save the screen as text.
#
#   scripts/tui_tmux.sh [-m MESSAGE] [-o FILE] [-p PLAN_FILE] [-s WIDTHxHEIGHT] [-t SECONDS] [-- RUNNER CHAT ARGS...]
#
#   scripts/tui_tmux.sh                                   # default model, "What is the capital of France?"
#   scripts/tui_tmux.sh -m "Write a haiku" -o /tmp/haiku.txt -- --quant fp32
#   scripts/tui_tmux.sh -p plan.txt -- ~/models/llama-3.1-8b   # also keep the screen once loaded
#
# The capture after the reply goes to FILE (default tui-capture.txt); FILE.ansi keeps the colours
# (view with `cat`). With -p, the screen as soon as the model is loaded (plan, measured memory)
# goes to PLAN_FILE. RUNNER_HOME is left as it is, so the chat lands in your real history unless
# you set it.
set -euo pipefail

message="What is the capital of France?"
out="tui-capture.txt"
plan_out=""
size="120x40"
timeout_s=300
while getopts "m:o:p:s:t:h" flag; do
    case "$flag" in
        m) message="$OPTARG" ;;
        o) out="$OPTARG" ;;
        p) plan_out="$OPTARG" ;;
        s) size="$OPTARG" ;;
        t) timeout_s="$OPTARG" ;;
        *) sed -n '2,16p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift

command -v tmux >/dev/null || { echo "tui_tmux.sh: tmux is not installed (apt-get install tmux / brew install tmux)" >&2; exit 2; }
root="$(cd "$(dirname "$0")/.." && pwd)"
runner="$root/.venv/bin/runner"
[ -x "$runner" ] || runner="runner"

session="runner-tui-$$"
width="${size%x*}"
height="${size#*x}"
cleanup() { tmux kill-session -t "$session" 2>/dev/null || true; }
trap cleanup EXIT

# A tmux server started earlier keeps the environment it started with: pass ours explicitly.
printf -v chat_command '%q ' env TERM=xterm-256color "RUNNER_HOME=${RUNNER_HOME:-}" \
    "HF_HUB_CACHE=${HF_HUB_CACHE:-}" "HF_HOME=${HF_HOME:-}" "$runner" chat "$@"
chat_command="${chat_command//RUNNER_HOME= /}"          # unset ones stay unset, not empty
chat_command="${chat_command//HF_HUB_CACHE= /}"
chat_command="${chat_command//HF_HOME= /}"
tmux new-session -d -s "$session" -x "$width" -y "$height" "$chat_command; sleep 600"

screen() { tmux capture-pane -p -t "$session"; }

# Wait until the status line says the model is ready (or it failed, or runner exited).
deadline=$((SECONDS + timeout_s))
until screen | grep -q "Ask .* anything"; do
    if screen | grep -q "did not load\|Traceback\|runner: error"; then
        screen > "$out"; echo "tui_tmux.sh: the model did not load; screen saved to $out" >&2; exit 1
    fi
    [ $SECONDS -lt $deadline ] || { screen > "$out"; echo "tui_tmux.sh: not ready after ${timeout_s}s; screen in $out" >&2; exit 1; }
    sleep 0.5
done
started=$SECONDS
if [ -n "$plan_out" ]; then
    sleep 0.5
    screen > "$plan_out"
fi

tmux send-keys -t "$session" -l "$message"
tmux send-keys -t "$session" Enter

# The reply is over when the status line no longer says "● thinking…" or "● writing" and
# shows the speed; then wait for the screen to settle.
sleep 1
until screen | tail -2 | grep -q "tokens/s" && ! screen | tail -2 | grep -q "● thinking…\|● writing"; do
    [ $SECONDS -lt $deadline ] || { echo "tui_tmux.sh: the reply did not finish in time" >&2; break; }
    sleep 0.5
done
sleep 0.5

screen > "$out"
tmux capture-pane -p -e -t "$session" > "$out.ansi"
echo "tui_tmux.sh: reply took about $((SECONDS - started))s; screen saved to $out (colours: $out.ansi)"

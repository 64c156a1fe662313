#!/usr/bin/env bash
# Drive `runner chat` in a real terminal (tmux) as a person would: start it, wait for the model,
# type a message, wait for the reply to finish, and save the screen as text.
#
#   scripts/tui_tmux.sh [-m MESSAGE] [-o FILE] [-s WIDTHxHEIGHT] [-t SECONDS] [-- RUNNER CHAT ARGS...]
#
#   scripts/tui_tmux.sh                                   # default model, "What is the capital of France?"
#   scripts/tui_tmux.sh -m "Write a haiku" -o /tmp/haiku.txt -- --quant fp32
#
# The capture goes to FILE (default tui-capture.txt); FILE.ansi keeps the colours (view with
# `cat`). RUNNER_HOME is left as it is, so the chat lands in your real history unless you set it.
set -euo pipefail

message="What is the capital of France?"
out="tui-capture.txt"
size="120x40"
timeout_s=300
while getopts "m:o:s:t:h" flag; do
    case "$flag" in
        m) message="$OPTARG" ;;
        o) out="$OPTARG" ;;
        s) size="$OPTARG" ;;
        t) timeout_s="$OPTARG" ;;
        *) sed -n '2,12p' "$0"; exit 2 ;;
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

printf -v chat_command '%q ' "$runner" chat "$@"
tmux new-session -d -s "$session" -x "$width" -y "$height" "TERM=xterm-256color $chat_command; sleep 600"

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

tmux send-keys -t "$session" -l "$message"
tmux send-keys -t "$session" Enter

# The reply is over when the status line shows the speed and the screen stops changing.
previous=""
stable=0
while [ $stable -lt 4 ]; do
    [ $SECONDS -lt $deadline ] || { echo "tui_tmux.sh: the reply did not finish in time" >&2; break; }
    sleep 0.5
    current="$(screen)"
    if [ "$current" = "$previous" ] && grep -q "tokens/s" <<<"$current" && ! grep -q "thinking…" <<<"$current"; then
        stable=$((stable + 1))
    else
        stable=0
    fi
    previous="$current"
done

screen > "$out"
tmux capture-pane -p -e -t "$session" > "$out.ansi"
echo "tui_tmux.sh: reply took about $((SECONDS - started))s; screen saved to $out (colours: $out.ansi)"

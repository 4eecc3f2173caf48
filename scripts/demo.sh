#!/usr/bin/env bash
# `make demo`: serve a model on loopback, wait until it is ready (showing the server's log as it goes),
# stream one chat answer, stop the server. A server that exits while starting ends the demo at once with
# the end of its log; Ctrl-C stops the server too and leaves no pid file behind.
#
# Environment: HJCG_DEMO_MODEL (default smollm2, the embedded model; or a local checkpoint directory),
# PORT (50051), BIN (the directory of hjcg and hjcg-client, default .venv/bin of this checkout),
# HJCG_DEMO_TIMEOUT (seconds to wait for the server, default 300).
# Writes, in the current directory: hjcg-demo.log (the server's log), .hjcg-demo.pid (while the server runs).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/.venv/bin}
MODEL=${HJCG_DEMO_MODEL:-smollm2}
TARGET=127.0.0.1:${PORT:-50051}
TIMEOUT=${HJCG_DEMO_TIMEOUT:-300}
LOG=hjcg-demo.log
PIDFILE=.hjcg-demo.pid
QUESTION="What is the capital of France?"

if [ -f "$PIDFILE" ]; then
  old=$(cat "$PIDFILE")
  if kill -0 "$old" 2> /dev/null; then
    echo "hjcg-demo: a demo server is still running (pid $old, $PIDFILE); stop it first: kill $old" >&2
    exit 1
  fi
  rm -f "$PIDFILE"  # left by a demo that was killed outright
fi

server=
stop_server() {
  if [ -n "$server" ] && kill -0 "$server" 2> /dev/null; then
    kill "$server" 2> /dev/null
    wait "$server" 2> /dev/null
  fi
  rm -f "$PIDFILE"
}
trap stop_server EXIT
trap 'echo; echo "hjcg-demo: interrupted; stopping the server" >&2; exit 130' INT TERM

shown=0
show_new_log_lines() {  # the server's log, as it grows, indented under the demo's own lines
  local lines
  lines=$(wc -l < "$LOG")
  if [ "$lines" -gt "$shown" ]; then
    sed -n "$((shown + 1)),${lines}p" "$LOG" | sed 's/^/    | /'
    shown=$lines
    return 0
  fi
  return 1
}

fail_with_log() {
  echo "hjcg-demo: $1" >&2
  echo "hjcg-demo: the last lines of $LOG:" >&2
  tail -n 25 "$LOG" | sed 's/^/    | /' >&2
  exit 1
}

echo "==> starting the server: hjcg serve --model $MODEL --listen $TARGET (log: $LOG)"
echo "    (the first start converts the embedded model's GGUF weights once, ~30 s; later starts take seconds)"
: > "$LOG"
"$BIN/hjcg" serve --model "$MODEL" --listen "$TARGET" >> "$LOG" 2>&1 &
server=$!
echo "$server" > "$PIDFILE"

start=$SECONDS
quiet_since=$SECONDS
while :; do
  show_new_log_lines && quiet_since=$SECONDS
  if ! kill -0 "$server" 2> /dev/null; then
    wait "$server"
    fail_with_log "the server exited with status $? before it was ready"
  fi
  if "$BIN/hjcg-client" --target "$TARGET" health --timeout 1 2> /dev/null | grep -q '^SERVING$'; then
    break
  fi
  if [ $((SECONDS - start)) -ge "$TIMEOUT" ]; then
    fail_with_log "the server is not serving after $TIMEOUT s"
  fi
  if [ $((SECONDS - quiet_since)) -ge 10 ]; then
    echo "    ... still starting ($((SECONDS - start)) s)"
    quiet_since=$SECONDS
  fi
  sleep 0.5
done
show_new_log_lines
echo "==> ready after $((SECONDS - start)) s"
echo
echo "\$ hjcg-client generate --chat \"$QUESTION\""
"$BIN/hjcg-client" --target "$TARGET" generate --chat "$QUESTION"

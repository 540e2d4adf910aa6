#!/usr/bin/env bash
# Installs (once per machine) and runs the Kafka-protocol broker the real-broker tests use: nisshi.
#
#   scripts/kafka-broker.sh install   # cargo +nightly install nisshi@0.8.1 unless already installed
#   scripts/kafka-broker.sh start     # start on a free 127.0.0.1 port; prints the kafka:// URL
#   scripts/kafka-broker.sh url       # the running broker's kafka:// URL
#   scripts/kafka-broker.sh stop
#
# State lives in .broker/ (pid, port, log). The broker keeps everything in memory: a fresh start is empty.
set -euo pipefail

NISSHI_VERSION=0.8.1
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="$ROOT/.broker"
mkdir -p "$STATE"

nisshi_bin() {
  if command -v nisshi >/dev/null 2>&1; then command -v nisshi; return; fi
  if [ -x "$HOME/.cargo/bin/nisshi" ]; then echo "$HOME/.cargo/bin/nisshi"; return; fi
  return 1
}

install() {
  if bin="$(nisshi_bin)" && "$bin" --version 2>/dev/null | grep -q "$NISSHI_VERSION"; then
    echo "nisshi $NISSHI_VERSION already installed at $bin" >&2
    return
  fi
  echo "installing nisshi $NISSHI_VERSION (needs the nightly toolchain; ~20 min on 2 cores, once per machine)" >&2
  cargo +nightly install "nisshi@$NISSHI_VERSION" --locked >&2
}

running() {
  [ -f "$STATE/pid" ] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null
}

url() {
  running || { echo "no broker running (scripts/kafka-broker.sh start)" >&2; exit 1; }
  echo "kafka://127.0.0.1:$(cat "$STATE/port")"
}

start() {
  if running; then url; return; fi
  install
  local bin port
  bin="$(nisshi_bin)"
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  # No initial rebalance delay: every test uses a fresh group, and 3 s per join adds up.
  # A plain background command (no wrapping subshell), so $! is the broker itself and nothing keeps this
  # script's stdout open: callers capture the URL with $(...).
  cd "$STATE"
  nohup "$bin" broker \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine memory://nisshi/ \
      --group-initial-rebalance-delay 0s \
      </dev/null >"$STATE/nisshi.log" 2>&1 &
  echo $! >"$STATE/pid"
  cd "$ROOT"
  echo "$port" >"$STATE/port"
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      url
      return
    fi
    running || break
    sleep 0.1
  done
  echo "nisshi did not start; its log:" >&2
  cat "$STATE/nisshi.log" >&2 || true
  exit 1
}

stop() {
  if running; then
    kill "$(cat "$STATE/pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do running || break; sleep 0.1; done
    running && kill -9 "$(cat "$STATE/pid")" 2>/dev/null || true
  fi
  rm -f "$STATE/pid" "$STATE/port"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  url) url ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|url|stop" >&2; exit 2 ;;
esac

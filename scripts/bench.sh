#!/usr/bin/env bash
# Runs the benchmarks (issue 5) in release mode, side by side, and prints their tables.
#
#   scripts/bench.sh                 # everything: the framework micro-bench, then the Kafka suite
#   scripts/bench.sh --rounds 5      # extra arguments go to the Kafka suite (see benches/kafka.rs)
#
# Installs what it needs once per machine: nisshi (the Kafka-protocol broker, via scripts/kafka-broker.sh)
# and FastStream 0.7.8 for the comparison rows (pip, into the user's Python 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${FERROSTREAM_BENCH_PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; from importlib.metadata import version; sys.exit(version("faststream") != "0.7.8")' 2>/dev/null; then
  echo "installing faststream[kafka]==0.7.8" >&2
  "$PYTHON" -m pip install --quiet 'faststream[kafka]==0.7.8' >&2
fi

echo "== framework cost on the in-memory broker (cargo bench --bench framework)"
cargo bench --bench framework

scripts/kafka-broker.sh install
started=""
if ! url="$(scripts/kafka-broker.sh url 2>/dev/null)"; then
  url="$(scripts/kafka-broker.sh start)"
  started=1
fi
trap '[ -n "$started" ] && scripts/kafka-broker.sh stop' EXIT

echo "== Kafka side by side against nisshi at $url (cargo bench --features kafka --bench kafka)"
FERROSTREAM_BENCH_BROKER="$url" FERROSTREAM_BENCH_PYTHON="$PYTHON" \
  cargo bench --features kafka --bench kafka -- "$@"

#!/usr/bin/env bash
# Runs the benchmarks (issue 5) in release mode, side by side, and prints their tables.
#
#   scripts/bench.sh                 # everything: the framework micro-bench, the Kafka suite, the RabbitMQ suite
#   scripts/bench.sh --rounds 5      # extra arguments go to the Kafka suite (see benches/kafka.rs)
#   FERROSTREAM_BENCH_AMQP_ARGS="--n 200000 --rounds 5" scripts/bench.sh   # the RabbitMQ suite's arguments
#
# Installs what it needs once per machine: nisshi (the Kafka-protocol broker, via scripts/kafka-broker.sh)
# and FastStream 0.7.8 with its Kafka and RabbitMQ extras for the comparison rows (pip, into the user's
# Python 3.11). The RabbitMQ suite needs a running RabbitMQ server: FERROSTREAM_BENCH_AMQP, by default
# amqp://guest:guest@127.0.0.1:5672/%2f (see benches/amqp.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${FERROSTREAM_BENCH_PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys, aiokafka; from importlib.metadata import version; sys.exit(version("faststream") != "0.7.8")' 2>/dev/null; then
  echo "installing faststream[kafka]==0.7.8" >&2
  "$PYTHON" -m pip install --quiet 'faststream[kafka]==0.7.8' >&2
fi
if ! "$PYTHON" -c 'import sys, aio_pika; from importlib.metadata import version; sys.exit(version("faststream") != "0.7.8")' 2>/dev/null; then
  echo "installing faststream[rabbit]==0.7.8" >&2
  "$PYTHON" -m pip install --quiet 'faststream[rabbit]==0.7.8' >&2
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

# The Kafka broker is not needed any more: stop it (if this script started it) before the RabbitMQ runs.
if [ -n "$started" ]; then
  scripts/kafka-broker.sh stop
  started=""
fi

echo "== RabbitMQ side by side (cargo bench --features amqp --bench amqp)"
read -r -a amqp_args <<< "${FERROSTREAM_BENCH_AMQP_ARGS:-}"
FERROSTREAM_BENCH_PYTHON="$PYTHON" \
  cargo bench --features amqp --bench amqp -- ${amqp_args[@]+"${amqp_args[@]}"}

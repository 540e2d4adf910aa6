#!/usr/bin/env bash
# Installs what the tests need and runs every test:
#   1. lint: rustfmt and clippy (warnings are errors);
#   2. the whole suite on the in-memory broker (no external service, no librdkafka build);
#   3. the same suite plus the Kafka-only tests against a real Kafka-protocol broker (nisshi), which this
#      script installs if missing and starts on a free 127.0.0.1 port.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== lint"
cargo fmt --all -- --check
cargo clippy --all-targets --features kafka -- -D warnings

echo "== tests on memory://"
cargo test

echo "== tests on a real Kafka-protocol broker"
scripts/kafka-broker.sh install
url="$(scripts/kafka-broker.sh start)"
trap 'scripts/kafka-broker.sh stop' EXIT
echo "broker: $url"
FERROSTREAM_TEST_BROKER="$url" cargo test --features kafka

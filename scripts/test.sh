#!/usr/bin/env bash
# Installs what the tests need and runs every test:
#   1. lint: rustfmt and clippy (warnings are errors);
#   2. the whole suite on the in-memory broker (no external service, no librdkafka build);
#   3. the same suite plus the Kafka-only tests against a real Kafka-protocol broker (nisshi), which this
#      script installs if missing and starts on a free 127.0.0.1 port;
#   and the quickstart demo on both brokers (it exits non-zero if any message is not settled as shown).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== lint"
cargo fmt --all -- --check
cargo clippy --all-targets --features kafka -- -D warnings

echo "== tests on memory://"
cargo test
echo "== the demo on memory://"
cargo run -q --example quickstart >/dev/null

echo "== tests on a real Kafka-protocol broker"
scripts/kafka-broker.sh install
url="$(scripts/kafka-broker.sh start)"
trap 'scripts/kafka-broker.sh stop' EXIT
echo "broker: $url"
FERROSTREAM_TEST_BROKER="$url" cargo test --features kafka
echo "== the demo on $url"
cargo run -q --features kafka --example quickstart -- --broker "$url" >/dev/null

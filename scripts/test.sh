#!/usr/bin/env bash
# Installs what the tests need and runs every test:
#   1. lint: rustfmt and clippy (warnings are errors);
#   2. the whole suite on the in-memory broker (no external service, no librdkafka build);
#   3. the same suite plus the Kafka-only tests against a real Kafka-protocol broker (nisshi), which this
#      script installs if missing and starts on a free 127.0.0.1 port;
#   4. the broker-neutral suites (policy table, settling) plus the RabbitMQ-only tests (exchanges, retries,
#      reconnect, SIGKILL crash test) against the RabbitMQ server on 127.0.0.1:5672 (FERROSTREAM_TEST_AMQP
#      overrides its URL; it is a service of the machine, started with `rabbitmq-server -detached`);
#   and the demos (quickstart, orders) on every broker (it exits non-zero if any message is not settled as shown).
# The service's docs and command line (features `docs`, `cli`) are tested on every broker: the AsyncAPI
# document checked by the official parser (npm's @asyncapi/parser) and the docs page in Debian's headless
# chromium (driven by npm's playwright-core), both installed here once per machine by scripts/test-tools.sh;
# the page's screenshot is kept in target/artifacts/docs-page.png. Metrics (feature `prometheus`) are read
# with the Prometheus project's parser (PyPI's prometheus_client) and scraped by a real Prometheus server
# (Debian's prometheus), also installed by scripts/test-tools.sh.
# The optional features are tested in the memory stage: `macros` (#[debug_handler], compile-fail
# snapshots) and `msgpack` (MessagePack codec; Python's `msgpack` package, installed here if missing,
# checks that another language reads what we write).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== lint"
cargo fmt --all -- --check
cargo clippy --all-targets --features kafka,amqp,macros,msgpack,cli,otlp -- -D warnings
cargo clippy -p ferrostream-macros --all-targets -- -D warnings

echo "== tests on memory://"
cargo test
python3 -c "import msgpack" 2>/dev/null || pip3 install --quiet msgpack || pip3 install --quiet --break-system-packages msgpack
# The compile-error snapshots list the extractor types of the default build: `macros` alone.
cargo test --features macros --test debug_handler
cargo test --features msgpack --test codecs --lib
cargo test --features macros,msgpack,cli --doc
cargo test -p ferrostream-macros
echo "== the docs and the command line on memory://"
scripts/test-tools.sh
cargo test --features cli,otlp --lib --test asyncapi --test docs_page --test cli --test metrics --test otel
echo "== the demo on memory://"
cargo run -q --example quickstart >/dev/null
cargo run -q --example orders >/dev/null

echo "== tests on a real Kafka-protocol broker"
scripts/kafka-broker.sh install
url="$(scripts/kafka-broker.sh start)"
trap 'scripts/kafka-broker.sh stop' EXIT
echo "broker: $url"
FERROSTREAM_TEST_BROKER="$url" cargo test --features kafka,cli,otlp
echo "== the demo on $url"
cargo run -q --features kafka,cli,otlp --example quickstart -- --broker "$url" >/dev/null
cargo run -q --features kafka,cli,otlp --example orders -- --broker "$url" >/dev/null

echo "== tests on RabbitMQ"
amqp="${FERROSTREAM_TEST_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}"
if [ -z "${FERROSTREAM_TEST_AMQP:-}" ] && ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "RabbitMQ is not listening on 127.0.0.1:5672; starting the machine's server (rabbitmq-server -detached)"
  rabbitmq-server -detached
  for _ in $(seq 1 120); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 0.5; done
fi
echo "broker: $amqp"
FERROSTREAM_TEST_BROKER="$amqp" FERROSTREAM_TEST_AMQP="$amqp" \
  cargo test --features amqp,cli --test policy_table --test settling --test application --test request_reply \
  --test test_client --test amqp --test amqp_crash --test asyncapi --test docs_page --test cli --test metrics
FERROSTREAM_TEST_AMQP="$amqp" cargo test --features amqp,cli --doc
echo "== the demo on RabbitMQ"
cargo run -q --features amqp,cli --example quickstart -- --broker "$amqp" >/dev/null
cargo run -q --features amqp,cli --example orders -- --broker "$amqp" >/dev/null

#!/usr/bin/env bash
# Installs (once per machine) what the docs and metrics tests need: Debian's chromium (the docs page is
# checked in a real headless browser) and prometheus (a real server scrapes a running service); in
# tools/docs/node_modules, npm's @asyncapi/parser (the official validator of AsyncAPI documents) and
# playwright-core (drives that chromium; it downloads no browser of its own); PyPI's prometheus_client
# (the Prometheus project's parser of the text format).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

if ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian's chromium (browser tests of the docs page)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi

if ! command -v prometheus >/dev/null 2>&1; then
  echo "installing Debian's prometheus (a real scrape of a running service)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q prometheus >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }
fi

python3 -c "import prometheus_client" 2>/dev/null || pip3 install --quiet prometheus_client 2>/dev/null \
  || pip3 install --quiet --break-system-packages prometheus_client

cd "$ROOT/tools/docs"
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "installing the docs tools from npm (tools/docs: @asyncapi/parser, playwright-core)" >&2
  npm ci --no-audit --no-fund --loglevel=error >&2
fi

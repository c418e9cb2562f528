#!/usr/bin/env bash
# Runs every test: unit, integration (real SQLite, PostgreSQL and Redis, a
# mock LLM upstream), and the official openai/ollama Python clients.
# Starts what the tests need if it is not running.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

# Redis (cluster-mode tests): a local server on 6379 without persistence.
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  if ! command -v redis-server >/dev/null; then
    say "installing redis-server"
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  fi
  say "starting redis-server"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# PostgreSQL (cluster-mode tests): trust auth for user postgres on 5432.
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  say "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 100); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.1; done
fi

# Python clients for the compatibility test.
if ! .venv/bin/python -c 'import openai, ollama' >/dev/null 2>&1; then
  say "installing the openai and ollama Python clients into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/python/requirements.txt
fi

# Static checks of the Dockerfile, compose file and Helm chart (no engine here).
if ! .venv/bin/python -c 'import yaml, jsonschema' >/dev/null 2>&1; then
  .venv/bin/pip install -q --disable-pip-version-check -r tests/deploy/requirements.txt
fi
say "deployment files (tests/deploy/check.py)"
.venv/bin/python tests/deploy/check.py

# Browser test of the admin UI (tests/it/ui.rs, browser_end_to_end):
# Debian's Chromium, driven by playwright-core from tests/e2e.
if [ ! -x /usr/bin/chromium ]; then
  say "installing chromium"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  say "installing nodejs and npm"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
if [ ! -d tests/e2e/node_modules/playwright-core ]; then
  say "installing playwright-core into tests/e2e"
  (cd tests/e2e && npm ci --no-audit --no-fund --silent)
fi

say "cargo test"
cargo test --locked "$@"

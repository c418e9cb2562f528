#!/usr/bin/env bash
# Soak: two cluster-mode replicas, steady mixed load, bounded time (default
# 10 minutes); see scripts/soak.py for what it checks.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --workspace --bins
exec python3 scripts/soak.py "$@"

#!/usr/bin/env bash
# The full planted-bug report: for every planted bug and configuration (3 and 5 replicas,
# volatile and durable), the first seed the simulator's checks catch it at and the share of
# the first N seeds (default 100) that fail. Takes long (about 7,000 runs at N = 100);
# CI runs the bounded form (`--first-only`) from scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --profile sim -p ballot --features sim --bin ballot-sim
./target/sim/ballot-sim --planted-report --seeds "${1:-100}"

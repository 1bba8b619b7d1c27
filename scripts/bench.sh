#!/usr/bin/env bash
# The main job (README quick start): a three-replica cluster benchmark on this machine
# (RDMA where a device exists, else TCP over loopback; see docs/benchmarks.md).
# Installs the build dependencies and, if needed, a Rust toolchain
# (scripts/install-build-deps.sh), then runs `ballot-bench` with the arguments given,
# e.g. `scripts/bench.sh --help`, `scripts/bench.sh compare --plot cmp.svg`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-build-deps.sh >&2 # stdout is the benchmark's (e.g. --json)
export PATH="$HOME/.cargo/bin:$PATH"
exec cargo run --release -p ballot-bench -- "$@"

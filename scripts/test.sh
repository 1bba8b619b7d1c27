#!/usr/bin/env bash
# The project's test command (README quick start, CI). Runs, in order:
#   1. cargo test for the whole workspace (unit, property, simulator seeds, planted bugs,
#      TCP fabric refusals, real ballot-node processes under kill -9 / SIGSTOP);
#   2. the README's main job, bounded: scripts/bench.sh (the first quick-start command) with
#      a 2 s measured window, checked to report commits;
#   3. scripts/sweep.sh, bounded: ballot-sim over 200 seeds of 3 and 5 replicas, volatile
#      and durable, 20 long runs of 4000 ticks; then the planted-bug report (contracts
#      off, first 50 seeds): the bugs caught in every configuration today must stay
#      caught (BALLOT_SWEEP_SEEDS=1000 for the full sweep);
#   4. the Soft-RoCE guest (QEMU + rdma_rxe): verbs tests, a 3-replica RDMA cluster with a
#      leader kill, three `ballot-node --fabric rdma` under a ballot-cli workload with a
#      leader kill and restart, ballot-bench and ib_write_lat side by side
#      (skip with BALLOT_SKIP_RXE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
phase() { echo "== $1 (at $((SECONDS - start)) s)"; }
scripts/install-build-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
phase "cargo test (workspace)"
cargo test --workspace --release --features ballot-verbs/sim 2>&1 | tee /tmp/ballot-cargo-test.log | grep -E "^(test result|running|FAIL|failures|error)" || true
if grep -qE "^test result: FAILED|^error" /tmp/ballot-cargo-test.log || ! grep -q "^test result" /tmp/ballot-cargo-test.log; then
    echo "cargo test failed; see /tmp/ballot-cargo-test.log" >&2
    grep -E "panicked|FAILED|failures:" -A3 /tmp/ballot-cargo-test.log | head -60 >&2
    exit 1
fi
phase "README main job, bounded (scripts/bench.sh --duration 2 --warmup 1)"
scripts/bench.sh --duration 2 --warmup 1 --quiet --json >/tmp/ballot-bench-ci.json 2>/tmp/ballot-bench-ci.err || {
    cat /tmp/ballot-bench-ci.err >&2
    echo "scripts/bench.sh failed" >&2
    exit 1
}
if ! grep -qE '"kind":"cluster".*"commits":[1-9]' /tmp/ballot-bench-ci.json; then
    cat /tmp/ballot-bench-ci.json /tmp/ballot-bench-ci.err >&2
    echo "scripts/bench.sh reported no commits" >&2
    exit 1
fi
echo "scripts/bench.sh: $(grep -oE '"throughput_ops_s":[0-9.]+' /tmp/ballot-bench-ci.json | head -1)"
phase "ballot-sim (bounded sweep; scripts/sweep.sh runs 1000 seeds per configuration)"
scripts/sweep.sh "${BALLOT_SWEEP_SEEDS:-200}"
if [ "${BALLOT_SKIP_RXE:-0}" != 1 ]; then
    phase "Soft-RoCE guest"
    scripts/rxe-vm.sh
fi
passed=$(grep -E "^test result: ok" /tmp/ballot-cargo-test.log | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{ n += $1 } END { print n + 0 }')
echo "ALL CHECKS: $passed passed, 0 failed ($((SECONDS - start)) s)"

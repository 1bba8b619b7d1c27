#!/usr/bin/env bash
# The project's test command (README quick start, CI). Runs, in order:
#   1. cargo test for the whole workspace (unit, property, simulator seeds, planted bugs,
#      TCP fabric refusals, real ballot-node processes under kill -9 / SIGSTOP);
#   2. ballot-sim over 1000 seeds: 3 and 5 replicas volatile, 3 replicas durable (and 300
#      seeds of 5 replicas durable, 100 long runs of 4000 ticks); then the planted-bug
#      report (contracts off, first 50 seeds): the bugs caught in every configuration
#      today must stay caught;
#   3. the Soft-RoCE guest (QEMU + rdma_rxe): verbs tests, a 3-replica RDMA cluster with a
#      leader kill, three `ballot-node --fabric rdma` under a ballot-cli workload with a
#      leader kill and restart, ballot-bench and ib_write_lat side by side
#      (skip with BALLOT_SKIP_RXE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-build-deps.sh
echo "== cargo test (workspace)"
cargo test --workspace --release 2>&1 | tee /tmp/ballot-cargo-test.log | grep -E "^(test result|running|FAIL|failures|error)" || true
if grep -qE "^test result: FAILED|^error" /tmp/ballot-cargo-test.log || ! grep -q "^test result" /tmp/ballot-cargo-test.log; then
    echo "cargo test failed; see /tmp/ballot-cargo-test.log" >&2
    grep -E "panicked|FAILED|failures:" -A3 /tmp/ballot-cargo-test.log | head -60 >&2
    exit 1
fi
echo "== ballot-sim"
cargo build --profile sim -p ballot --bin ballot-sim
./target/sim/ballot-sim --seeds 1000 --replicas 3
./target/sim/ballot-sim --seeds 1000 --replicas 5
./target/sim/ballot-sim --seeds 1000 --replicas 3 --durability durable
./target/sim/ballot-sim --seeds 300 --replicas 5 --durability durable
./target/sim/ballot-sim --seeds 100 --first-seed 40000 --replicas 3 --ticks 4000   # long histories
echo "== planted bugs (scripts/planted-report.sh gives the shares)"
# Every planted bug is reported; those the simulator catches in every configuration today
# are a gate (a regression fails CI). The others are open work (docs/status.md).
./target/sim/ballot-sim --planted-report --first-only --seeds 50 \
    --must-catch ignore-promise,short-quorum,checkpoint-off-by-one,self-counted-twice,commit-off-by-one,adopt-lowest-ballot,amnesia-votes,phase1-ignores-base,follower-commit-uncapped
if [ "${BALLOT_SKIP_RXE:-0}" != 1 ]; then
    echo "== Soft-RoCE guest"
    scripts/rxe-vm.sh
fi
passed=$(grep -E "^test result: ok" /tmp/ballot-cargo-test.log | sed -E 's/.* ([0-9]+) passed.*/\1/' | paste -sd+ | bc)
echo "ALL CHECKS: $passed passed, 0 failed"

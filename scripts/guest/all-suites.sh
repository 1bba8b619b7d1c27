# What `scripts/rxe-vm.sh` runs with no --run: the default suite, then the cluster suite
# twice (both copied to /opt by the host script). Fails if either does.
set -e
echo "=== default suite"
sh /opt/default-suite.sh
echo "=== cluster suite, closed loop (1 command in flight: commit latency)"
sh /opt/cluster-suite.sh
echo "=== cluster suite, pipelined (16 in flight: batching, many writes outstanding per QP)"
CLUSTER_DEPTH=16 CLUSTER_CMDS=3000 CLUSTER_DIR=/tmp/cluster16 CLUSTER_PORT=7200 sh /opt/cluster-suite.sh

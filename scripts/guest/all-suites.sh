# What `scripts/rxe-vm.sh` runs with no --run: the default suite, the rdma-cluster suite
# (closed loop and pipelined), then the node suite (ballot-node --fabric rdma processes,
# ballot-cli, kill -9 / restart, ballot-bench vs ib_write_lat); all copied to /opt by the
# host script. Fails if any does.
set -e
echo "=== default suite"
sh /opt/default-suite.sh
echo "=== cluster suite, closed loop (1 command in flight: commit latency)"
sh /opt/cluster-suite.sh
echo "=== cluster suite, pipelined (16 in flight: batching, many writes outstanding per QP)"
CLUSTER_DEPTH=16 CLUSTER_CMDS=3000 CLUSTER_DIR=/tmp/cluster16 CLUSTER_PORT=7200 sh /opt/cluster-suite.sh
echo "=== node suite (ballot-node --fabric rdma, ballot-cli, ballot-bench)"
sh /opt/node-suite.sh

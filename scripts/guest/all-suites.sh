# What `scripts/rxe-vm.sh` runs with no --run: the default suite, then the cluster suite
# (both copied to /opt by the host script). Fails if either does.
set -e
echo "=== default suite"
sh /opt/default-suite.sh
echo "=== cluster suite"
sh /opt/cluster-suite.sh

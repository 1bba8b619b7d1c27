# The rxe-vm cluster suite: three Ballot replicas (rdma-cluster), one process each, all on
# rxe0 (lo, 127.0.0.1, the same GID; TCP bootstrap on ports $CLUSTER_PORT.. (7100-7102)).
# CLUSTER_CMDS (500), CLUSTER_DEPTH (1: proposals in flight), CLUSTER_DIR select a run. Checks:
#   1. a leader is elected and commits a workload of $CMDS commands;
#   2. all three replicas apply identical logs (digest = count, last index, hash);
#   3. kill -9 of the leader: a survivor is elected and commits $CMDS more;
#   4. the two survivors converge to identical applied logs with 2*$CMDS commands;
# then runs ib_write_lat in the same guest and prints replication p50/p99 next to it.
# Exit status 0 only if every check held (run by scripts/rxe-vm.sh, busybox sh).
set -u
CMDS="${CLUSTER_CMDS:-500}"
DEPTH="${CLUSTER_DEPTH:-1}"
D="${CLUSTER_DIR:-/tmp/cluster}"
PORT="${CLUSTER_PORT:-7100}"
mkdir -p "$D"
PEERS="0=127.0.0.1:$PORT,1=127.0.0.1:$((PORT + 1)),2=127.0.0.1:$((PORT + 2))"
now() { cut -d' ' -f1 /proc/uptime; }
field() { # field FILE KEY
    sed -n "s/.* $2=\([^ ]*\).*/\1/p; s/^$2=\([^ ]*\).*/\1/p" "$1" 2>/dev/null | head -1
}
fail() {
    echo "cluster-suite: FAIL: $*"
    for i in 0 1 2; do
        echo "--- status.$i: $(cat $D/status.$i 2>/dev/null)"
        echo "--- digest.$i: $(cat $D/digest.$i 2>/dev/null)"
        echo "--- log.$i (tail)"; tail -n 15 "$D/log.$i" 2>/dev/null
    done
    kill -9 $P0 $P1 $P2 2>/dev/null
    exit 1
}
start() { # start ID
    rdma-cluster --id "$1" --peers "$PEERS" --dev "$RXE_DEV" --gid-index "$RXE_GID_INDEX" \
        --commands "$CMDS" --depth "$DEPTH" --state-dir "$D" >"$D/log.$1" 2>&1 &
}
# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s.
wait_for() {
    secs=$1; what=$2; shift 2
    n=$((secs * 5))
    while [ $n -gt 0 ]; do
        if "$@"; then return 0; fi
        sleep 0.2
        n=$((n - 1))
    done
    fail "timed out after ${secs}s waiting for $what"
}
leader_done() { # sets LEADER to a replica among $ALIVE whose workload is done
    for i in $ALIVE; do
        if [ "$(field $D/status.$i role)" = leader ] && [ "$(field $D/status.$i workload)" = done ]; then
            LEADER=$i; return 0
        fi
    done
    return 1
}
converged() { # the digests of $ALIVE are equal and hold $1 commands
    ref=""
    for i in $ALIVE; do
        d="$(cat $D/digest.$i 2>/dev/null)"
        [ "$(field $D/digest.$i applied)" = "$1" ] || return 1
        [ -z "$ref" ] || [ "$d" = "$ref" ] || return 1
        ref="$d"
    done
    return 0
}

echo "== cluster: 3 replicas over $RXE_DEV (gid $RXE_GID_INDEX), $CMDS commands per leader, depth $DEPTH"
t0=$(now)
start 0; P0=$!
start 1; P1=$!
start 2; P2=$!
ALIVE="0 1 2"
LEADER=""
wait_for 150 "a leader to commit $CMDS commands" leader_done
L1=$LEADER
t1=$(now)
[ "$(field $D/status.$L1 failed)" = 0 ] || fail "leader $L1 had failed commands: $(cat $D/status.$L1)"
[ "$(field $D/status.$L1 commits)" = "$CMDS" ] || fail "leader $L1 committed $(field $D/status.$L1 commits), not $CMDS"
wait_for 60 "3 replicas to converge on $CMDS commands" converged "$CMDS"
echo "cluster: leader $L1 committed $CMDS commands; started at ${t0}s, done at ${t1}s"
grep -h '^WORKLOAD' $D/log.$L1 | sed "s/^/cluster: phase 1 /"
P1_LINE="$(grep -h '^WORKLOAD' $D/log.$L1 | tail -1)"
for i in 0 1 2; do echo "cluster: digest.$i $(cat $D/digest.$i)"; done

echo "== cluster: kill -9 leader $L1"
case $L1 in 0) kill -9 $P0 ;; 1) kill -9 $P1 ;; 2) kill -9 $P2 ;; esac
tk=$(now)
ALIVE="$(echo 0 1 2 | tr ' ' '\n' | grep -v "^$L1\$" | tr '\n' ' ')"
LEADER=""
wait_for 150 "a new leader to commit $CMDS more commands" leader_done
L2=$LEADER
t2=$(now)
[ "$L2" != "$L1" ] || fail "no new leader"
[ "$(field $D/status.$L2 failed)" = 0 ] || fail "leader $L2 had failed commands: $(cat $D/status.$L2)"
[ "$(field $D/status.$L2 commits)" = "$CMDS" ] || fail "leader $L2 committed $(field $D/status.$L2 commits), not $CMDS"
wait_for 60 "survivors $ALIVE to converge on $((2 * CMDS)) commands" converged "$((2 * CMDS))"
echo "cluster: new leader $L2 ($(grep -h 'leader ballot=\|leading, proposing' $D/log.$L2 | tail -1)); killed at ${tk}s, workload done at ${t2}s"
grep -h '^WORKLOAD' $D/log.$L2 | sed "s/^/cluster: phase 2 /"
P2_LINE="$(grep -h '^WORKLOAD' $D/log.$L2 | tail -1)"
for i in $ALIVE; do echo "cluster: digest.$i $(cat $D/digest.$i)"; done
# The old leader's commands are all in the survivors' logs, in its order.
for i in $ALIVE; do
    n="$(awk -v n="$L1" '$2 == n' $D/applied.$i | wc -l)"
    [ "$n" = "$CMDS" ] || fail "replica $i applied $n of the old leader's $CMDS commands"
done
echo "cluster: survivors $ALIVE converged (identical digests, $((2 * CMDS)) commands, all of leader $L1's)"
for i in $ALIVE; do case $i in 0) kill $P0 ;; 1) kill $P1 ;; 2) kill $P2 ;; esac; done
wait 2>/dev/null
for i in 0 1 2; do # what each replica saw (role changes, broken QPs), at most 12 lines each
    grep -v '^WORKLOAD' "$D/log.$i" | head -n 12 | sed "s/^/cluster: log.$i: /"
done

echo "== ib_write_lat 64 B (same guest, for comparison)"
ib_write_lat -d "$RXE_DEV" -x "$RXE_GID_INDEX" -n 1000 -s 64 >/tmp/lat-server.log 2>&1 &
srv=$!
sleep 1
ib_write_lat -d "$RXE_DEV" -x "$RXE_GID_INDEX" -n 1000 -s 64 "$RXE_IP" >/tmp/lat-client.log 2>&1 || { cat /tmp/lat-client.log; fail "ib_write_lat"; }
wait $srv
LAT="$(awk '$1 == 64 && NF >= 8 { print "t_typical_us=" $5 " t_avg_us=" $6 " p99_us=" $8 }' /tmp/lat-client.log)"
[ -n "$LAT" ] || { cat /tmp/lat-client.log; fail "cannot parse ib_write_lat output"; }
echo "FIGURES depth $DEPTH replication phase1: $(echo "$P1_LINE" | sed 's/^WORKLOAD //')"
echo "FIGURES depth $DEPTH replication phase2: $(echo "$P2_LINE" | sed 's/^WORKLOAD //')"
echo "FIGURES ib_write_lat 64B: $LAT"
echo "cluster-suite: PASS"

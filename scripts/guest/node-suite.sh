# The rxe-vm node suite: three `ballot-node --fabric rdma` processes on rxe0 (bootstrap on
# 127.0.0.1:$NODE_PORT.., clients on $NODE_PORT+10..), driven by `ballot-cli`. Checks:
#   1. a leader is elected; puts, gets and cas (a matching and a failing one) commit;
#   2. kill -9 of the leader: a new leader serves puts;
#   3. the killed node restarts (volatile: recovering, it re-bootstraps its QPs with the
#      survivors and rebuilds from the majority), catches up: `ballot-cli status --json`
#      shows three nodes, none recovering, with equal commit and applied indexes; the
#      nodes take a checkpoint every 512 bytes of commands and keep one, so the logs are
#      compacted and the restarted node must pull a checkpoint over the RDMA fabric (its
#      log says "checkpoint installed");
#   4. the leader's /metrics shows the RDMA fabric's per-peer counters (bytes sent above 0)
#      and the ring credit stall series;
#   5. every acknowledged put is readable, with its last acknowledged value;
# then `ballot-bench compare --fabric rdma` and ib_write_lat in the same guest, and prints
# commit p50 / raw RDMA WRITE p50. Exit status 0 only if every check held (busybox sh).
set -u
D="${NODE_DIR:-/tmp/nodes}"
PORT="${NODE_PORT:-7300}"
N1="${NODE_PUTS:-30}"
mkdir -p "$D"
echo "rxe-vm node suite key $$" >"$D/key"
PEERS="0=127.0.0.1:$PORT,1=127.0.0.1:$((PORT + 1)),2=127.0.0.1:$((PORT + 2))"
CPEERS="0=127.0.0.1:$((PORT + 10)),1=127.0.0.1:$((PORT + 11)),2=127.0.0.1:$((PORT + 12))"
CL="127.0.0.1:$((PORT + 10)),127.0.0.1:$((PORT + 11)),127.0.0.1:$((PORT + 12))"
: >"$D/acked"
now() { cut -d' ' -f1 /proc/uptime; }
P0=""; P1=""; P2=""
fail() {
    echo "node-suite: FAIL: $*"
    echo "--- status at $(now)s: $(ballot-cli --cluster "$CL" --timeout 3 status 2>&1)"
    for i in 0 1 2; do echo "--- node$i.log (tail)"; tail -n 40 "$D/node$i.log" 2>/dev/null; done
    kill -9 $P0 $P1 $P2 2>/dev/null
    exit 1
}
start() { # start ID
    RUST_LOG="${NODE_LOG:-info,ballot::driver=debug}" ballot-node --node "$1" --cluster 0xBA11 --peers "$PEERS" --client-peers "$CPEERS" \
        --client-addr "127.0.0.1:$((PORT + 10 + $1))" --data-dir "$D/data$1" --key-file "$D/key" \
        --fabric rdma --rdma-device "$RXE_DEV" --rdma-gid-index "$RXE_GID_INDEX" \
        --heartbeat-timeout-ms 300 --election-timeout-ms 300 \
        --checkpoint-every 512 --checkpoints-keep 1 --metrics-addr "127.0.0.1:$((PORT + 20 + $1))" \
        $([ -e "$D/data$1/ballot-node.boot" ] || echo --initial-cluster-state new) >>"$D/node$1.log" 2>&1 &
    case $1 in 0) P0=$! ;; 1) P1=$! ;; 2) P2=$! ;; esac
}
cli() { ballot-cli --cluster "$CL" --timeout 10 "$@"; }
# One line per answering node: the fields of its status object.
status_lines() { ballot-cli --cluster "$CL" --timeout 3 status --json 2>/dev/null | tr '{' '\n' | grep '"role"'; }
num() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }
leader() { status_lines | grep '"role":"leader"' | num node | head -1; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    secs=$1; what=$2; shift 2
    n=$((secs * 5))
    while [ $n -gt 0 ]; do
        if "$@"; then return 0; fi
        sleep 0.2
        n=$((n - 1))
    done
    fail "timed out after ${secs}s waiting for $what"
}
has_leader() { L="$(leader)"; [ -n "$L" ]; }
new_leader() { L="$(leader)"; [ -n "$L" ] && [ "$L" != "$OLD" ]; }
converged() { # three nodes, none recovering, equal commit and applied
    s="$(status_lines)"
    [ "$(echo "$s" | grep -c '"role"')" = 3 ] || return 1
    echo "$s" | grep -q '"role":"recovering"' && return 1
    c="$(echo "$s" | num commit | sort -u)"; a="$(echo "$s" | num applied | sort -u)"
    [ "$(echo "$c" | wc -l)" = 1 ] && [ "$(echo "$a" | wc -l)" = 1 ] && [ "$c" = "$a" ] && [ "$c" -gt 0 ]
}
puts() { # puts FROM TO TAG: put kI=vI-TAG, recording acknowledged ones; 3 failures in a row fail
    i=$1; bad=0
    while [ "$i" -le "$2" ]; do
        if cli put "k$i" "v$i-$3" >/dev/null 2>>"$D/cli.err"; then
            echo "k$i v$i-$3" >>"$D/acked"; bad=0
        else
            bad=$((bad + 1))
            [ $bad -lt 3 ] || fail "3 puts in a row failed (last k$i): $(tail -n 3 "$D/cli.err")"
        fi
        i=$((i + 1))
    done
}
kill_node() { case $1 in 0) kill -9 $P0 ;; 1) kill -9 $P1 ;; 2) kill -9 $P2 ;; esac; }

echo "== nodes: 3 x ballot-node --fabric rdma on $RXE_DEV (gid $RXE_GID_INDEX)"
t0=$(now)
start 0; start 1; start 2
wait_for 60 "a leader" has_leader
L1=$L
echo "node-suite: leader $L1 after $(echo "$(now) $t0" | awk '{printf "%.2f", $1 - $2}')s"
t1=$(now)
puts 1 "$N1" a
acked1=$(wc -l <"$D/acked")
[ "$acked1" = "$N1" ] || fail "only $acked1 of $N1 puts acknowledged: $(tail -3 "$D/cli.err")"
echo "node-suite: $N1 puts committed in $(echo "$(now) $t1" | awk '{printf "%.2f", $1 - $2}')s (one ballot-cli process each)"
[ "$(cli get k1)" = "v1-a" ] || fail "get k1"
cli cas k1 v1-a v1-cas >/dev/null || fail "cas k1 v1-a -> v1-cas did not apply"
cli cas k1 v1-a v1-bad >/dev/null 2>&1 && fail "cas with a stale old value applied"
[ $? = 1 ] || fail "failed cas did not exit 1"
echo "k1 v1-cas" >>"$D/acked"
[ "$(cli get k1)" = "v1-cas" ] || fail "get k1 after cas"
cli get nosuchkey >/dev/null 2>&1; [ $? = 1 ] || fail "get of an absent key did not exit 1"
echo "node-suite: get, cas (applied), cas (refused, exit 1), get absent (exit 1) ok"

echo "== nodes: kill -9 leader $L1"
OLD=$L1
kill_node "$L1"
tk=$(now)
wait_for 60 "a new leader" new_leader
L2=$L
puts $((N1 + 1)) $((2 * N1)) b
tn=$(now)
acked2=$(($(wc -l <"$D/acked") - acked1 - 1))
[ "$acked2" -gt 0 ] || fail "no put acknowledged after the kill: $(tail -3 "$D/cli.err")"
echo "node-suite: new leader $L2 $(echo "$tk" | awk -v t="$tn" '{printf "(%s puts acked, %.2fs after the kill)", "'"$acked2"'", t - $1}')"

echo "== nodes: restart node $L1 (volatile: recovering, re-bootstrap)"
start "$L1"
tr0=$(now)
puts $((2 * N1 + 1)) $((2 * N1 + 10)) c
wait_for 90 "node $L1 to catch up (status --json: 3 nodes, equal commit/applied)" converged
echo "node-suite: converged $(echo "$(now) $tr0" | awk '{printf "%.2f", $1 - $2}')s after the restart:"
status_lines | sed 's/^/node-suite:   /'
for i in 0 1 2; do
    [ "$i" = "$L1" ] && continue
    grep -q "peer $L1 re-bootstrapped" "$D/node$i.log" || fail "node $i did not re-bootstrap peer $L1"
done
grep -q "checkpoint installed" "$D/node$L1.log" || fail "node $L1 caught up without installing a checkpoint"
echo "node-suite: node $L1 caught up through a checkpoint: $(grep -h "checkpoint installed" "$D/node$L1.log" | head -1 | sed 's/.*checkpoint installed/checkpoint installed/' | cut -c1-100)"
echo "node-suite: survivors replaced node $L1's QPs: $(grep -h "re-bootstrapped" "$D"/node*.log | sed 's/.*node \([0-9]\): peer \([0-9]\).*/\1<-\2/' | tr '\n' ' ')"

echo "== nodes: a process with the wrong cluster key is refused at the RDMA bootstrap"
echo "not the cluster key" >"$D/wrongkey"
ballot-node --node 2 --cluster 0xBA11 --peers "0=127.0.0.1:$PORT,1=127.0.0.1:$((PORT + 1)),2=127.0.0.1:$((PORT + 9))" \
    --client-addr "127.0.0.1:$((PORT + 19))" --data-dir "$D/rogue" --key-file "$D/wrongkey" \
    --fabric rdma --rdma-device "$RXE_DEV" --rdma-gid-index "$RXE_GID_INDEX" \
    --initial-cluster-state new >"$D/rogue.log" 2>&1 &
rp=$!
n=100; while [ $n -gt 0 ] && kill -0 $rp 2>/dev/null; do sleep 0.1; n=$((n - 1)); done
kill -0 $rp 2>/dev/null && { kill -9 $rp; fail "the wrong-key node is still running"; }
wait $rp; rrc=$?
[ "$rrc" != 0 ] || fail "the wrong-key node exited 0"
grep -q "refused" "$D/rogue.log" || fail "the wrong-key node did not report a refusal: $(cat "$D/rogue.log")"
n=50; while [ $n -gt 0 ] && ! grep -q "bootstrap connection from .* refused" "$D/node0.log"; do sleep 0.1; n=$((n - 1)); done
grep -q "bootstrap connection from .* refused" "$D/node0.log" || fail "node 0 did not log the refused bootstrap connection"
converged || fail "the cluster is not converged after the wrong-key attempt"
echo "node-suite: wrong key: exit $rrc, \"$(grep -o 'refused.*' "$D/rogue.log" | head -1 | cut -c1-120)\"; node 0: \"$(grep -o 'bootstrap connection from .* refused.*' "$D/node0.log" | head -1 | cut -c1-120)\""

echo "== nodes: the RDMA fabric's per-peer counters on /metrics (leader $L2)"
busybox wget -q -O "$D/metrics" "http://127.0.0.1:$((PORT + 20 + L2))/metrics" || fail "cannot scrape node $L2's /metrics"
sent="$(grep -E '^ballot_fabric_sent_bytes[a-z_]*[{].*peer="[0-9]+".*[}] [1-9]' "$D/metrics" | head -1)"
[ -n "$sent" ] || fail "no RDMA per-peer sent bytes above 0 on /metrics: $(grep ballot_fabric "$D/metrics" | head -5)"
grep -qE '^ballot_ring_credit_stalls[a-z_]*[{]' "$D/metrics" || fail "no ring credit stall series on /metrics"
echo "node-suite: /metrics: $sent; $(grep -cE '^ballot_fabric_' "$D/metrics") fabric samples, ring credit stalls exported"

echo "== nodes: every acknowledged put is readable"
# The last acknowledged value of each key.
awk '{ v[$1] = $2 } END { for (k in v) print k, v[k] }' "$D/acked" >"$D/expect"
bad=0
while read -r k v; do
    got="$(cli get "$k" 2>&1)"
    [ "$got" = "$v" ] || { echo "node-suite: $k: got '$got', want '$v'"; bad=$((bad + 1)); }
done <"$D/expect"
[ "$bad" = 0 ] || fail "$bad acknowledged keys unreadable or wrong"
echo "node-suite: all $(wc -l <"$D/expect") acknowledged keys read back ($(wc -l <"$D/acked") acknowledged writes)"
kill $P0 $P1 $P2 2>/dev/null
wait 2>/dev/null
for i in 0 1 2; do # elections won, data-QP reconnects, re-bootstraps, refused bootstrap connections
    echo "node-suite: node$i.log: $(grep -c ' leading ' "$D/node$i.log") terms led, $(grep -c 'reconnect requested' "$D/node$i.log") data-QP reconnects, $(grep -c 're-bootstrapped' "$D/node$i.log") re-bootstraps, $(grep -c 'refused' "$D/node$i.log") refused"
done

echo "== ballot-bench compare --fabric rdma (3 replica threads, this guest)"
ballot-bench compare --fabric rdma --clients 1 --outstanding 1 --duration 3 --warmup 1 --raw-duration 2 --quiet --json \
    >"$D/bench.json" 2>"$D/bench.err" || { cat "$D/bench.err"; fail "ballot-bench compare --fabric rdma"; }
jf() { sed -n "s/.*\"kind\":\"$1\".*\"$2\":\([0-9.a-z]*\).*/\1/p" "$D/bench.json" | head -1; }
RAW=$(jf raw p50_us); COMMIT=$(jf cluster p50_us); OPS=$(jf cluster throughput_ops_s); RATIO=$(jf cluster ratio_p50)
[ -n "$RAW" ] && [ -n "$COMMIT" ] || { cat "$D/bench.json" "$D/bench.err"; fail "cannot parse ballot-bench output"; }
echo "== ib_write_lat 64 B (same guest)"
ib_write_lat -d "$RXE_DEV" -x "$RXE_GID_INDEX" -n 1000 -s 64 >/tmp/nlat-server.log 2>&1 &
srv=$!
sleep 1
ib_write_lat -d "$RXE_DEV" -x "$RXE_GID_INDEX" -n 1000 -s 64 "$RXE_IP" >/tmp/nlat-client.log 2>&1 || { cat /tmp/nlat-client.log; fail "ib_write_lat"; }
wait $srv
IBL=$(awk '$1 == 64 && NF >= 8 { print $5 }' /tmp/nlat-client.log)
[ -n "$IBL" ] || { cat /tmp/nlat-client.log; fail "cannot parse ib_write_lat"; }
echo "FIGURES rdma raw WRITE+completion p50 (ballot-bench raw): ${RAW} us"
echo "FIGURES rdma commit p50 (ballot-bench cluster, 3 replicas, 1 command in flight): ${COMMIT} us at ${OPS} cmd/s"
echo "FIGURES ib_write_lat 64B typical: ${IBL} us"
echo "FIGURES ratio commit p50 / raw RDMA WRITE p50: $(echo "$COMMIT $RAW" | awk '{printf "%.2f", $1 / $2}') (bench's own: ${RATIO}); commit p50 / ib_write_lat: $(echo "$COMMIT $IBL" | awk '{printf "%.2f", $1 / $2}')"
echo "== ballot-bench raw as a server/client pair (two processes over $RXE_DEV, perftest's manner)"
RAWARGS="--fabric rdma --rdma-device $RXE_DEV --gid-index $RXE_GID_INDEX --quiet"
ballot-bench raw $RAWARGS --server --listen "127.0.0.1:$((PORT + 30))" >"$D/raw-server.log" 2>&1 &
rs=$!
sleep 1
ballot-bench raw $RAWARGS --connect "127.0.0.1:$((PORT + 30))" --iterations 2000 --payload 64,4096 --json \
    >"$D/raw-pair.json" 2>"$D/raw-pair.err" || { cat "$D/raw-pair.err" "$D/raw-server.log"; kill -9 $rs 2>/dev/null; fail "ballot-bench raw --connect"; }
n=50; while [ $n -gt 0 ] && kill -0 $rs 2>/dev/null; do sleep 0.1; n=$((n - 1)); done
kill -0 $rs 2>/dev/null && { kill -9 $rs; fail "ballot-bench raw --server did not exit after its client's run"; }
wait $rs || { cat "$D/raw-server.log"; fail "ballot-bench raw --server failed"; }
[ "$(grep -c '"p50_us"' "$D/raw-pair.json")" = 2 ] || { cat "$D/raw-pair.json" "$D/raw-pair.err"; fail "raw pair: want two results (64 and 4096 B)"; }
echo "FIGURES rdma raw pair (two processes) p50: $(sed -n 's/.*"payload":\([0-9]*\).*"p50_us":\([0-9.]*\).*/\1 B \2 us/p' "$D/raw-pair.json" | tr '\n' ';')"
echo "node-suite: PASS"

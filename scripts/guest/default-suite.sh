# The default rxe-vm suite: device listing, ballot's verbs selftest, perftest latency.
set -e
echo "== ibv_devices"
ibv_devices
echo "== ibv_devinfo"
ibv_devinfo -d "$RXE_DEV" | grep -E 'hca_id|transport|state|active_mtu|max_mtu|link_layer' || true
if [ -x /opt/bin/verbs-selftest ]; then
    echo "== verbs-selftest"
    verbs-selftest --dev "$RXE_DEV" --gid-index "$RXE_GID_INDEX"
fi
echo "== ib_write_lat (server and client on rxe0, same guest)"
ib_write_lat -d "$RXE_DEV" -x "$RXE_GID_INDEX" -n 1000 -s 64 >/tmp/lat-server.log 2>&1 &
srv=$!
sleep 1
ib_write_lat -d "$RXE_DEV" -x "$RXE_GID_INDEX" -n 1000 -s 64 "$RXE_IP"
wait $srv

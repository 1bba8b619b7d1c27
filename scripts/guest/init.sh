#!/bin/busybox sh
# /init of the rxe-vm guest (see scripts/rxe-vm.sh). Prints exactly one marker line:
#   RXE-VM: PASS   or   RXE-VM: FAIL <reason>
/bin/busybox --install -s
export PATH=/opt/bin:/usr/bin:/usr/sbin:/bin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm && mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp

finish() {
    echo "RXE-VM: $*"
    sync
    poweroff -f
    sleep 5
}

echo "rxe-vm guest: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) vCPUs, uptime $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /etc/rxe-modules); do
    modprobe "$m" || finish "FAIL modprobe $m"
done
/bin/ip link set lo up || finish "FAIL ip link set lo up"
/usr/bin/rdma link add rxe0 type rxe netdev lo || finish "FAIL rdma link add rxe0 type rxe netdev lo"
[ -e /dev/infiniband/uverbs0 ] || finish "FAIL /dev/infiniband/uverbs0 missing"
# One grep over the whole GID table (a process per entry costs ~20 s under TCG).
gidfile="$(grep -l '0000:0000:0000:0000:0000:ffff:7f00:0001' /sys/class/infiniband/rxe0/ports/1/gids/* 2>/dev/null | head -1)"
[ -n "$gidfile" ] || finish "FAIL no IPv4-mapped GID for 127.0.0.1 on rxe0"
export RXE_DEV=rxe0 RXE_GID_INDEX="${gidfile##*/}" RXE_IP=127.0.0.1
echo "rxe-vm guest: rxe0 on lo up, GID index $RXE_GID_INDEX ($(cat "$gidfile")), uptime $(cut -d' ' -f1 /proc/uptime)s"

[ -f /opt/run.sh ] || finish "FAIL no /opt/run.sh given"
cd /tmp
sh /opt/run.sh
rc=$?
echo "rxe-vm guest: test script exited $rc, uptime $(cut -d' ' -f1 /proc/uptime)s"
if [ "$rc" = 0 ]; then finish "PASS"; else finish "FAIL test script exited $rc"; fi

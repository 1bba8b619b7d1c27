#!/usr/bin/env bash
# Creates a Soft-RoCE (rdma_rxe) device on a real Linux host whose kernel has rdma_rxe, and
# prints the device and its GIDs. (When the kernel has no RDMA at all, `ibv_get_device_list`
# fails with ENOSYS: use scripts/rxe-vm.sh, which runs Soft-RoCE inside a QEMU guest.)
#
# usage: sudo scripts/setup-rxe.sh [NETDEV] [RXE_NAME]   (defaults: the default-route netdev, rxe0)
set -euo pipefail
NETDEV="${1:-$(ip -o route show default 2>/dev/null | awk '{print $5; exit}')}"
NAME="${2:-rxe0}"
[ -n "$NETDEV" ] || { echo "setup-rxe: no netdev given and no default route" >&2; exit 2; }
ip link show "$NETDEV" >/dev/null 2>&1 || { echo "setup-rxe: no netdev $NETDEV" >&2; exit 2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
if ! command -v rdma >/dev/null || ! command -v ibv_devices >/dev/null; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        iproute2 rdma-core ibverbs-utils ibverbs-providers perftest
fi
if ! $SUDO modprobe rdma_rxe 2>/dev/null; then
    echo "setup-rxe: cannot load rdma_rxe: this kernel has no Soft-RoCE (CONFIG_RDMA_RXE)." >&2
    echo "           Use scripts/rxe-vm.sh to run the RDMA tests inside a QEMU guest." >&2
    exit 1
fi
$SUDO modprobe ib_uverbs
if ! rdma link show "$NAME/1" >/dev/null 2>&1; then
    $SUDO rdma link add "$NAME" type rxe netdev "$NETDEV"
fi
rdma link show "$NAME/1"
ibv_devices
echo "GIDs of $NAME port 1 (index: gid; use an IPv4-mapped ::ffff:a.b.c.d one for RoCE v2):"
grep -H -v '^0000:0000:0000:0000:0000:0000:0000:0000$' /sys/class/infiniband/"$NAME"/ports/1/gids/* 2>/dev/null \
    | sed 's#.*/gids/##' | head -16
echo "memlock limit for this shell: $(ulimit -l) (registrations need it; see docs/rdma.md)"

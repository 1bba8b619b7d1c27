#!/usr/bin/env bash
# Runs tests against a real Soft-RoCE (rdma_rxe) device inside a QEMU guest.
#
# The host kernel needs no RDMA support: the guest boots Debian bookworm's stock kernel
# (TCG, no KVM), loads rdma_rxe, creates rxe0 on `lo`, runs a caller-given script and
# prints exactly one marker line:  RXE-VM: PASS   or   RXE-VM: FAIL <reason>
#
# usage: scripts/rxe-vm.sh [--bin HOST_BINARY]... [--file HOST_FILE[:GUEST_PATH]]...
#                          [--run GUEST_SCRIPT] [--timeout SECONDS] [--log FILE]
#                          [--suite default|cluster|node|all] [--no-build]
#   --bin     copied to /opt/bin/<name> in the guest, with its shared-library closure
#   --file    copied to GUEST_PATH (default /opt/files/<name>)
#   --run     a sh script run in the guest as `sh /opt/run.sh` (busybox sh; PATH has
#             /opt/bin); exit status 0 means PASS. The rxe device is rxe0, its IPv4-mapped
#             GID index is in $RXE_GID_INDEX, its IPv4 address in $RXE_IP.
#   No --run: --suite all (the default): the default suite (ibv_devices, ballot's
#             verbs-selftest, ib_write_lat), then the cluster suite (three rdma-cluster
#             replicas: elect, commit, kill -9 the leader, re-elect, commit, converge; vs
#             ib_write_lat), then the node suite (three `ballot-node --fabric rdma`, a
#             ballot-cli workload, kill -9 the leader, restart it, catch-up, every
#             acknowledged put readable; `ballot-bench compare --fabric rdma` vs ib_write_lat),
#             building the binaries with cargo first (unless --no-build).
#             --suite default / cluster / node: only one of them.
#
# Everything the guest needs is fetched as Debian packages (apt-get download + dpkg -x)
# into .cache/rxe-vm/ (cached between runs); only qemu-system-x86 is installed on the host.
# Background facts about rxe and the guest: docs/rdma.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${RXE_VM_CACHE:-$ROOT/.cache/rxe-vm}"
BASE_VERSION=3 # bump when the base initramfs recipe changes
TIMEOUT=300
LOG=""
RUN=""
NO_BUILD=0
SUITE=all
BINS=()
FILES=()

die() { echo "rxe-vm: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --bin) [ $# -ge 2 ] || die "--bin needs a path"; BINS+=("$2"); shift 2 ;;
        --file) [ $# -ge 2 ] || die "--file needs a path"; FILES+=("$2"); shift 2 ;;
        --run) [ $# -ge 2 ] || die "--run needs a script"; RUN="$2"; shift 2 ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; TIMEOUT="$2"; shift 2 ;;
        --log) [ $# -ge 2 ] || die "--log needs a file"; LOG="$2"; shift 2 ;;
        --no-build) NO_BUILD=1; shift ;;
        --suite) [ $# -ge 2 ] || die "--suite needs default|cluster|node|all"; SUITE="$2"; shift 2 ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
case "$TIMEOUT" in ''|*[!0-9]*) die "--timeout wants whole seconds, got '$TIMEOUT'" ;; esac
for b in "${BINS[@]+"${BINS[@]}"}"; do [ -f "$b" ] && [ -x "$b" ] || die "--bin $b: not an executable file"; done
for f in "${FILES[@]+"${FILES[@]}"}"; do [ -f "${f%%:*}" ] || die "--file ${f%%:*}: no such file"; done
[ -z "$RUN" ] || [ -f "$RUN" ] || die "--run $RUN: no such file"

if [ -z "$RUN" ]; then
    case "$SUITE" in
        default) RUN="$ROOT/scripts/guest/default-suite.sh"; WANT="verbs-selftest" ;;
        cluster) RUN="$ROOT/scripts/guest/cluster-suite.sh"; WANT="rdma-cluster" ;;
        node) RUN="$ROOT/scripts/guest/node-suite.sh"; WANT="ballot-node ballot-cli ballot-bench" ;;
        all) RUN="$ROOT/scripts/guest/all-suites.sh"
             WANT="verbs-selftest rdma-cluster ballot-node ballot-cli ballot-bench"
             FILES+=("$ROOT/scripts/guest/default-suite.sh:/opt/default-suite.sh"
                     "$ROOT/scripts/guest/cluster-suite.sh:/opt/cluster-suite.sh"
                     "$ROOT/scripts/guest/node-suite.sh:/opt/node-suite.sh") ;;
        *) die "--suite wants default, cluster, node or all, got '$SUITE'" ;;
    esac
    if [ "$NO_BUILD" = 0 ]; then
        "$ROOT/scripts/install-build-deps.sh" >&2
        echo "rxe-vm: building $WANT" >&2
        (cd "$ROOT" && cargo build --release -p ballot-verbs -p ballot-node -p ballot-bench --features ballot-verbs/sim \
            $(for b in $WANT; do echo --bin "$b"; done)) >&2
    fi
    for b in $WANT; do
        b="${CARGO_TARGET_DIR:-$ROOT/target}/release/$b"
        [ -x "$b" ] || die "$b missing (build it or drop --no-build)"
        BINS+=("$b")
    done
fi

# ---------------------------------------------------------------- host tools
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if ! command -v qemu-system-x86_64 >/dev/null; then
    echo "rxe-vm: installing qemu-system-x86" >&2
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >&2
fi

# ---------------------------------------------------------------- guest packages
KPKG="$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1)"
if [ -z "$KPKG" ]; then
    $SUDO apt-get update -qq
    KPKG="$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1)"
fi
[ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 to a kernel package"
KVER="${KPKG#linux-image-}"
TOOLS="busybox-static libibverbs1 ibverbs-providers librdmacm1 rdmacm-utils ibverbs-utils perftest iproute2"
# Library packages the tools need (recursively), minus libc/libgcc, which come from the host
# (also Debian 12) together with the host-built binaries.
LIBS="$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances --no-pre-depends $TOOLS 2>/dev/null \
        | grep -E '^lib' | grep -vE '^(libc6|libgcc-s1|libpam|libsemanage|libdebian-installer|libnewt|libslang|libtextwrap|libreadline)' | sort -u)"
PKGS="$(echo "$KPKG $TOOLS $LIBS" | tr ' ' '\n' | sort -u | tr '\n' ' ')"
STAMP="v$BASE_VERSION $PKGS"

DEBS="$CACHE/debs"
STAGE="$CACHE/stage"
BASE="$CACHE/base.cpio.gz"
KERNEL="$CACHE/vmlinuz"
mkdir -p "$DEBS"

build_base() {
    echo "rxe-vm: building base initramfs for kernel $KVER" >&2
    local missing=()
    for p in $PKGS; do
        ls "$DEBS/${p}_"*.deb >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "rxe-vm: apt-get download ${missing[*]}" >&2
        (cd "$DEBS" && apt-get download "${missing[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) \
            || { $SUDO apt-get update -qq; (cd "$DEBS" && apt-get download "${missing[@]}" >&2); }
    fi
    rm -rf "$STAGE"
    mkdir -p "$STAGE"
    for p in $PKGS; do dpkg -x "$(ls "$DEBS/${p}_"*.deb | head -1)" "$STAGE"; done
    cp "$STAGE/boot/vmlinuz-$KVER" "$KERNEL"

    local ir="$CACHE/initramfs" bb="$STAGE/bin/busybox"
    rm -rf "$ir"
    mkdir -p "$ir"/{bin,sbin,etc,proc,sys,dev,tmp,run,opt/bin,lib64,lib/x86_64-linux-gnu,usr/bin,usr/sbin}
    mkdir -p "$ir/usr/lib/x86_64-linux-gnu/libibverbs" "$ir/etc/libibverbs.d"
    cp "$bb" "$ir/bin/busybox"

    # Kernel modules: the closure (from busybox depmod's modules.dep) of what rxe needs.
    local mods="crc32_generic ib_core ib_uverbs udp_tunnel ip6_udp_tunnel rdma_rxe ib_cm iw_cm rdma_cm rdma_ucm veth"
    "$bb" depmod -b "$STAGE" "$KVER"
    local dep="$STAGE/lib/modules/$KVER/modules.dep" want=() m line
    for m in $mods; do
        line="$(grep -E "(^|/)${m}\.ko:" "$dep" || true)"
        [ -n "$line" ] || die "module $m not in $KVER"
        want+=(${line%%:*} ${line#*:})
    done
    for m in $(printf '%s\n' "${want[@]}" | sort -u); do
        mkdir -p "$ir/lib/modules/$KVER/$(dirname "$m")"
        cp "$STAGE/lib/modules/$KVER/$m" "$ir/lib/modules/$KVER/$m"
    done
    "$bb" depmod -b "$ir" "$KVER"
    echo "$mods" >"$ir/etc/rxe-modules"

    # User space: tools + their ldd closure; the dlopen()ed rxe provider and libgcc_s.
    local t
    for t in usr/bin/ibv_devices usr/bin/ibv_devinfo usr/bin/rping usr/bin/ib_write_lat \
             usr/bin/ib_write_bw usr/bin/ib_read_lat usr/bin/ib_send_lat bin/ip usr/bin/rdma; do
        [ -x "$STAGE/$t" ] || die "$t missing from the staged packages"
        cp "$STAGE/$t" "$ir/$t"
        copy_closure "$STAGE/$t" "$ir"
    done
    cp "$STAGE/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so" "$ir/usr/lib/x86_64-linux-gnu/libibverbs/"
    copy_closure "$STAGE/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so" "$ir"
    cp "$STAGE/etc/libibverbs.d/rxe.driver" "$ir/etc/libibverbs.d/"
    cp -L "$(ldconfig -p | sed -n 's/.*libgcc_s.so.1 (libc6,x86-64) => //p' | head -1)" "$ir/lib/x86_64-linux-gnu/"
    cp "$ROOT/scripts/guest/init.sh" "$ir/init"
    chmod +x "$ir/init"
    echo "root:x:0:0:root:/:/bin/sh" >"$ir/etc/passwd"
    (cd "$ir" && find . | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null | gzip -1 >"$BASE.tmp")
    mv "$BASE.tmp" "$BASE"
    echo "$STAMP" >"$CACHE/base.stamp"
}

# Copies the shared-library closure of $1 into root $2, preferring the staged guest packages.
copy_closure() {
    local lp="$STAGE/lib/x86_64-linux-gnu:$STAGE/usr/lib/x86_64-linux-gnu"
    local out lib
    out="$(LD_LIBRARY_PATH="$lp" ldd "$1" 2>&1)" || die "ldd $1 failed: $out"
    if echo "$out" | grep -q "not found"; then die "unresolved libraries for $1: $(echo "$out" | grep 'not found')"; fi
    for lib in $(echo "$out" | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p'); do
        [ -e "$2/lib/x86_64-linux-gnu/$(basename "$lib")" ] || cp -L "$lib" "$2/lib/x86_64-linux-gnu/"
    done
    [ -e "$2/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$2/lib64/"
}

if [ ! -f "$BASE" ] || [ ! -f "$KERNEL" ] || [ "$(cat "$CACHE/base.stamp" 2>/dev/null)" != "$STAMP" ] \
    || [ "$ROOT/scripts/guest/init.sh" -nt "$BASE" ] || [ "$0" -nt "$BASE" ]; then
    build_base
fi

# ---------------------------------------------------------------- per-run cpio
RUNDIR="$(mktemp -d "${TMPDIR:-/tmp}/rxe-vm.XXXXXX")"
trap 'rm -rf "$RUNDIR"' EXIT
X="$RUNDIR/extra"
mkdir -p "$X/opt/bin" "$X/opt/files" "$X/lib/x86_64-linux-gnu" "$X/lib64"
for b in "${BINS[@]+"${BINS[@]}"}"; do
    cp "$b" "$X/opt/bin/"
    copy_closure "$b" "$X"
done
for f in "${FILES[@]+"${FILES[@]}"}"; do
    src="${f%%:*}"; dst="/opt/files/$(basename "$src")"
    [ "$src" = "$f" ] || dst="${f#*:}"
    case "$dst" in /*) ;; *) die "--file $f: guest path must be absolute" ;; esac
    mkdir -p "$X$(dirname "$dst")"
    cp "$src" "$X$dst"
done
cp "$RUN" "$X/opt/run.sh"
(cd "$X" && find . | LC_ALL=C sort | "$STAGE/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1 >"$RUNDIR/extra.cpio.gz")
cat "$BASE" "$RUNDIR/extra.cpio.gz" >"$RUNDIR/initrd.gz"

# ---------------------------------------------------------------- boot
[ -n "$LOG" ] || LOG="$RUNDIR/console.log"
echo "rxe-vm: booting $KVER (TCG, timeout ${TIMEOUT}s); guest output follows" >&2
start=$(date +%s)
set +e
timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 2G -smp 2 \
    -nographic -no-reboot -nodefaults -serial stdio -display none \
    -kernel "$KERNEL" -initrd "$RUNDIR/initrd.gz" \
    -append "console=ttyS0 quiet panic=-1 loglevel=3" </dev/null 2>&1 | tr -d '\r' | sed -u 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g' | tee "$LOG"
qrc=${PIPESTATUS[0]}
set -e
secs=$(( $(date +%s) - start ))
marker="$(grep -aE '^RXE-VM: (PASS|FAIL)' "$LOG" | tail -1 || true)"
if [ -z "$marker" ]; then
    if [ "$qrc" = 124 ]; then echo "rxe-vm: FAIL: timed out after ${TIMEOUT}s without a marker" >&2
    else echo "rxe-vm: FAIL: VM exited (status $qrc) without a marker" >&2; fi
    exit 1
fi
echo "rxe-vm: $marker (VM run ${secs}s)" >&2
case "$marker" in "RXE-VM: PASS"*) exit 0 ;; *) exit 1 ;; esac

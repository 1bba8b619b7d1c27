#!/usr/bin/env bash
# Installs what building the workspace needs on Debian 12 (idempotent; run as yourself,
# it uses sudo for apt-get unless run as root):
#   - Debian packages: a C toolchain and linker (build-essential), and for ballot-verbs
#     (rdma-sys: pkg-config + bindgen over the verbs headers) pkg-config libibverbs-dev
#     librdmacm-dev libclang-dev; curl and ca-certificates to fetch rustup;
#   - a Rust toolchain at least the workspace's rust-version (Debian 12's own rustc, 1.63,
#     is too old): rustup's stable into ~/.cargo, if cargo is missing or older. Callers
#     then put ~/.cargo/bin on PATH (scripts/bench.sh and scripts/test.sh do).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PKGS="build-essential pkg-config libibverbs-dev librdmacm-dev libclang-dev curl ca-certificates"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -z "$missing" ]; then
    echo "build deps present: $PKGS"
else
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

need="$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml")"
export PATH="$HOME/.cargo/bin:$PATH"
have="$(cargo --version 2>/dev/null | awk '{print $2}' || true)"
if [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" = "$need" ]; then
    echo "rust toolchain present: cargo $have (need $need)"
elif command -v rustup >/dev/null; then
    echo "cargo ${have:-missing}, need $need: installing rustup's stable toolchain"
    rustup toolchain install stable --profile minimal
    rustup default stable
else
    echo "cargo ${have:-missing}, need $need: installing rustup (stable, into ~/.cargo)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
fi

#!/usr/bin/env bash
# Installs what building ballot-verbs (rdma-sys: pkg-config + bindgen over the verbs headers)
# needs on Debian 12. Idempotent; run as root or with sudo.
set -euo pipefail
PKGS="pkg-config libibverbs-dev librdmacm-dev libclang-dev"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -z "$missing" ] && { echo "build deps present: $PKGS"; exit 0; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing

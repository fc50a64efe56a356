#!/usr/bin/env bash
# The README's first command: install what the lab needs, build, and run the demo.
#
#   sudo ./scripts/demo.sh            # up, traffic, underlay capture, proof, down
#   sudo ./scripts/demo.sh --keep     # ... and leave the lab running (lab status / exec / down)
#   sudo ./scripts/demo.sh --nodes 3 --cni ptp
#
# Works on a fresh Debian 12 machine as root. Everything the lab creates lives in network
# namespaces it creates (pods 10.244.<node>.0/24, underlay 172.31.254.0/24, service VIPs
# 10.244.250.0/24) and in the state directory (default /var/run/ambient-lab).
#
# SKIP_SETUP=1 skips the package installation (scripts/setup.sh).
#
# Build profile: debug. On a 2-core machine a from-scratch debug build of the workspace's
# binaries takes a fraction of the release build's time (no optimisation passes over
# rustls/h2/tokio), and the demo itself runs in a few seconds either way: the proof is about
# what crosses the wire, not speed. Set PROFILE=release to build and run optimised binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "run as root: the lab creates network namespaces and nftables rules" >&2
  exit 1
fi

# SKIP_SETUP=1 for machines whose packages are managed otherwise.
[ "${SKIP_SETUP:-0}" = 1 ] || ./scripts/setup.sh

# Rust toolchain (the workspace needs Rust >= 1.85; Debian 12's rustc is older).
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "installing the Rust toolchain with rustup (https://rustup.rs)..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends curl ca-certificates >/dev/null
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

PROFILE="${PROFILE:-debug}"
flags=(--workspace --bins --locked)
[ "$PROFILE" = release ] && flags+=(--release)
echo "building the workspace binaries ($PROFILE)..." >&2
cargo build "${flags[@]}"

exec "${CARGO_TARGET_DIR:-target}/$PROFILE/lab" demo "$@"

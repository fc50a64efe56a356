#!/usr/bin/env bash
# The whole test suite: unit, property, spec, network-namespace, containerd and end-to-end
# tests, plus fmt and clippy. Run as root on Debian 12 (network namespaces, nftables).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the network tests create namespaces and nftables rules" >&2; exit 1; }

./scripts/setup.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The network tests exec the workspace binaries from the target directory.
cargo build --workspace --bins --locked
# The plugin as shipped (static), for the empty-chroot and installer tests.
./scripts/static-plugin.sh >/dev/null
# The previous release's ztunnel, for the rollout test (built once, then cached).
./scripts/previous-ztunnel.sh >/dev/null
# ztunnel as it ships (release, fat LTO) must carry its code layout (ztunnel/build.rs).
./scripts/check-release-layout.sh
if cargo nextest --version >/dev/null 2>&1; then
  run_tests() { cargo nextest run --locked --no-fail-fast "$@"; }
else
  run_tests() { cargo test --locked --no-fail-fast "$@"; }
fi
# Everything, against the agent's default backend (nftables on this kernel).
run_tests --workspace
# The backend matrix: the redirect, end-to-end, fault and attack suites again with the agent's
# iptables backend (kube-proxy's stand-in then in iptables too), in both iptables variants.
AMBIENT_TEST_BACKEND=iptables-nft run_tests -p ambient-tests \
  --test redirect --test e2e --test faults --test attacks --test attacks_proxy
AMBIENT_TEST_BACKEND=iptables-legacy run_tests -p ambient-tests \
  --test redirect --test e2e --test attacks

#!/usr/bin/env bash
# Builds ambient-cni as a static executable (glibc linked in, crt-static) and prints its path.
# The container runtime execs the plugin on the host, whose libc may be older than the
# build machine's (RHEL 8, Ubuntu 20.04, Amazon Linux 2) or absent: the static build needs
# only the kernel. install-cni refuses to install anything else unless told otherwise.
#
# Usage: scripts/static-plugin.sh [--release]   (honours CARGO_TARGET_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
triple=x86_64-unknown-linux-gnu
profile=debug
flags=()
if [[ "${1:-}" == --release ]]; then profile=release; flags=(--release); fi
# An explicit --target keeps the flag off build scripts and proc macros (host artefacts).
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build "${flags[@]}" --locked -p ambient-cni --bin ambient-cni --target "$triple" >&2
echo "${CARGO_TARGET_DIR:-target}/$triple/$profile/ambient-cni"

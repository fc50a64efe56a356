#!/usr/bin/env bash
# Builds ztunnel as it ships (release profile, fat LTO) and fails unless the code layout of
# ztunnel/build.rs is in the binary: a `.text.ordered` section of at least MIN_KIB. Without
# it ztunnel's idle resident memory is about 8.8 MiB instead of 5.6-5.8 (docs/performance.md),
# over the 8 MB target; the layout is lost silently by a RUSTFLAGS in the environment (it
# replaces .cargo/config.toml's v0 mangling), another linker, or a stale link-order.txt.
# Honours CARGO_TARGET_DIR. Usage: scripts/check-release-layout.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MIN_KIB=512
cargo build --release --locked -p ztunnel --bin ztunnel
BIN="${CARGO_TARGET_DIR:-target}/release/ztunnel"
size_hex="$(readelf -SW "$BIN" | sed 's/^ *\[ *[0-9]*\] *//' | awk '$1 == ".text.ordered" { print $5 }')"
if [ -z "$size_hex" ]; then
  echo "check-release-layout: $BIN has no .text.ordered section (see ztunnel/build.rs)" >&2
  exit 1
fi
kib=$(( 16#$size_hex / 1024 ))
if [ "$kib" -lt "$MIN_KIB" ]; then
  echo "check-release-layout: .text.ordered is $kib KiB, under $MIN_KIB: link-order.txt no longer matches (scripts/ztunnel-link-order.sh)" >&2
  exit 1
fi
echo "check-release-layout: .text.ordered $kib KiB"

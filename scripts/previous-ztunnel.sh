#!/usr/bin/env bash
# Builds ztunnel as it was at the previous release (PREVIOUS_RELEASE, a commit of main; default:
# the last landed state before the current development cycle) and prints the binary's path. The
# rollout test runs it beside the current ztunnel on one node, as a DaemonSet update does.
# The tree comes from `git archive` (nothing checked out), built with its own Cargo.lock into
# its own target directory under $CARGO_TARGET_DIR (cached: built once per release).
#
# Usage: scripts/previous-ztunnel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${PREVIOUS_RELEASE:-835e431}"
target="${CARGO_TARGET_DIR:-$PWD/target}"
[[ "$target" == /* ]] || target="$PWD/$target"
out="$target/previous-release"
bin="$out/ztunnel-$rev"
mkdir -p "$out"
rm -f "$out/UNAVAILABLE"
if [[ ! -x "$bin" ]]; then
  if ! git cat-file -e "$rev^{commit}" 2>/dev/null; then
    # A shallow clone: the rollout test reports itself skipped (reading this file) rather
    # than failing for want of history.
    echo "commit $rev is not in this clone (shallow?); the rollout test will be skipped" \
      | tee "$out/UNAVAILABLE" >&2
    exit 0
  fi
  src="$out/src-$rev"
  rm -rf "$src"; mkdir -p "$src"
  git archive "$rev" | tar -x -C "$src"
  (cd "$src" && env -u RUSTFLAGS CARGO_TARGET_DIR="$out/target" \
     cargo build --locked -p ztunnel --bin ztunnel >&2)
  cp "$out/target/debug/ztunnel" "$bin.tmp"
  mv "$bin.tmp" "$bin"
  rm -rf "$src"
fi
echo "$bin"

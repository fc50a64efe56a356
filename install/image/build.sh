#!/usr/bin/env bash
# Builds the ambient container image with podman, without pulling from any registry:
#   1. the project's binaries (cargo, release profile unless PROFILE=debug),
#   2. a minimal Debian root filesystem (debootstrap --variant=minbase) with the tools the
#      binaries call or link: nft + libnftables1, iptables, iproute2 (cached between runs),
#   3. `podman build` of install/image/Containerfile (FROM scratch + that rootfs + binaries).
#
# The plugin is the static build (scripts/static-plugin.sh): it runs on any host's libc.
#
# Usage: install/image/build.sh [--rootfs-only] [--tag TAG] [--save FILE]
# Env:   PROFILE=release|debug  SUITE=bookworm  MIRROR=http://deb.debian.org/debian
#        WORK=<dir> (default target/image)  BIN_DIR=<dir with prebuilt binaries>
# Needs root (debootstrap), debootstrap and podman (Debian packages of the same names).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
profile="${PROFILE:-release}"
suite="${SUITE:-bookworm}"
mirror="${MIRROR:-http://deb.debian.org/debian}"
work="${WORK:-$repo/target/image}"
tag="localhost/ambient:0.1.0"
rootfs_only=0
save=""
while (($#)); do
  case "$1" in
    --rootfs-only) rootfs_only=1 ;;
    --tag) tag="$2"; shift ;;
    --save) save="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

bins=(install-cni ambient-cni node-agent ztunnel ambient-issuer)
packages=nftables,libnftables1,iptables,iproute2,ca-certificates

# 1. Binaries.
if [[ -z "${BIN_DIR:-}" ]]; then
  flag=(--release); dir=release
  [[ "$profile" == debug ]] && { flag=(); dir=debug; }
  (cd "$repo" && cargo build "${flag[@]}" -p install -p node-agent -p ztunnel -p ambient-issuer)
  built="${CARGO_TARGET_DIR:-$repo/target}/$dir"
  # The plugin runs on the host, not in this image: the static build, which needs no libc.
  static_args=(); [[ "$profile" == release ]] && static_args=(--release)
  static="$(cd "$repo" && scripts/static-plugin.sh "${static_args[@]}")"
  [[ "$static" == /* ]] || static="$repo/$static"
  BIN_DIR="$work/bin"
  rm -rf "$BIN_DIR"; mkdir -p "$BIN_DIR"
  for b in install-cni node-agent ztunnel ambient-issuer; do cp "$built/$b" "$BIN_DIR/"; done
  cp "$static" "$BIN_DIR/ambient-cni"
fi
for b in "${bins[@]}"; do
  [[ -x "$BIN_DIR/$b" ]] || { echo "missing binary $BIN_DIR/$b" >&2; exit 1; }
done

# 2. Root filesystem (cached: debootstrap downloads ~40 MB of packages).
mkdir -p "$work"
cache="$work/rootfs-$suite.tar"
if [[ ! -s "$cache" ]]; then
  rm -rf "$work/rootfs"
  debootstrap --variant=minbase --include="$packages" "$suite" "$work/rootfs" "$mirror"
  # What a container never needs: docs, manuals, locales, apt's caches and lists.
  rm -rf "$work/rootfs"/usr/share/{doc,man,info,locale,lintian} \
         "$work/rootfs"/var/cache/apt/* "$work/rootfs"/var/lib/apt/lists/* \
         "$work/rootfs"/var/log/* "$work/rootfs"/debootstrap
  tar -C "$work/rootfs" --numeric-owner -cf "$cache.tmp" .
  mv "$cache.tmp" "$cache"
  rm -rf "$work/rootfs"
fi

# The build context: rootfs tarball + binaries.
ctx="$work/context"
rm -rf "$ctx"; mkdir -p "$ctx/bin"
cp "$cache" "$ctx/rootfs.tar"
for b in "${bins[@]}"; do install -m 0755 "$BIN_DIR/$b" "$ctx/bin/$b"; done
# install-cni refuses a plugin that needs a program interpreter: check it here too.
if readelf -l "$ctx/bin/ambient-cni" 2>/dev/null | grep -q 'program interpreter'; then
  echo "$ctx/bin/ambient-cni is dynamically linked; build it with scripts/static-plugin.sh" >&2
  exit 1
fi
cp "$here/Containerfile" "$ctx/Containerfile"

# Sanity check without podman: the binaries run inside the rootfs (their shared libraries,
# libnftables among them, resolve there).
check="$work/check"
rm -rf "$check"; mkdir -p "$check"
tar -C "$check" -xf "$cache"
mkdir -p "$check/opt/ambient/bin"; cp "$ctx/bin/"* "$check/opt/ambient/bin/"
for b in install-cni node-agent ztunnel ambient-issuer; do
  chroot "$check" "/opt/ambient/bin/$b" --version >/dev/null
done
CNI_COMMAND=VERSION chroot "$check" /opt/ambient/bin/ambient-cni </dev/null | grep -q supportedVersions
for tool in nft iptables ip iptables-legacy-restore iptables-nft-restore ip6tables-nft-restore ebtables-nft-restore; do chroot "$check" sh -c "command -v $tool" >/dev/null; done
echo "rootfs ok: $(du -sh "$check" | cut -f1) with ${bins[*]} and nft, iptables, ip"
rm -rf "$check"
((rootfs_only)) && { echo "context ready in $ctx"; exit 0; }

# 3. Image.
podman build --pull=never --network=none -t "$tag" -f "$ctx/Containerfile" "$ctx"
echo "built $tag"
if [[ -n "$save" ]]; then
  podman save --format oci-archive -o "$save" "$tag"
  echo "saved $save (load on a node: ctr -n k8s.io images import $save)"
fi

#!/usr/bin/env bash
# Checks that every binary the manifests run starts in the image, then runs the image's
# installer against a temporary "host" directory, as the DaemonSet does: install (binary
# copied, plugin appended to the primary conflist), run + SIGTERM with --on-exit uninstall
# (the chain comes back as the primary CNI wrote it), and the one-shot uninstall. Build the
# image first: install/image/build.sh. Needs podman and python3.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
image="${IMAGE:-localhost/ambient:0.1.0}"
host="$(mktemp -d)"
name="ambient-install-test-$$"
cleanup() { pm rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$host"; }
trap cleanup EXIT
mkdir -p "$host/etc/cni/net.d" "$host/opt/cni/bin"
fixture="$here/../tests/fixtures/cni/10-flannel.conflist"
cp "$fixture" "$host/etc/cni/net.d/"
conf="$host/etc/cni/net.d/10-flannel.conflist"
mounts=(-v "$host/etc/cni/net.d:/host/etc/cni/net.d" -v "$host/opt/cni/bin:/host/opt/cni/bin")
# Sandboxes (like this project's VMs: hybrid cgroups, a hard RLIMIT_NOFILE of 20000) refuse
# podman's defaults; these settings work there and on an ordinary host. Override with
# PODMAN_GLOBAL / PODMAN_RUN.
read -r -a pg <<<"${PODMAN_GLOBAL:---cgroup-manager=cgroupfs}"
read -r -a pr <<<"${PODMAN_RUN:---runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network=none}"
pm() { podman "${pg[@]}" "$@"; }

last_type() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["plugins"][-1]["type"])' "$1"; }
same_json() { python3 -c 'import json,sys; sys.exit(json.load(open(sys.argv[1])) != json.load(open(sys.argv[2])))' "$1" "$2"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# 0. Every binary the manifests run is in the image, where they expect it, and starts there.
for b in install-cni node-agent ztunnel ambient-issuer; do
  pm run --rm "${pr[@]}" "$image" "/opt/ambient/bin/$b" --version >/dev/null \
    || fail "/opt/ambient/bin/$b does not run in the image"
done
echo "ok: binaries"

# 1. One install pass.
pm run --rm "${pr[@]}" "${mounts[@]}" "$image" /opt/ambient/bin/install-cni install
[[ -x "$host/opt/cni/bin/ambient-cni" ]] || fail "binary not installed"
[[ "$(last_type "$conf")" == ambient-cni ]] || fail "plugin not last in the chain"
CNI_COMMAND=VERSION "$host/opt/cni/bin/ambient-cni" | grep -q supportedVersions || fail "installed binary does not run"
echo "ok: install"

# 2. Uninstall restores the primary's configuration and removes the binary.
pm run --rm "${pr[@]}" "${mounts[@]}" "$image" /opt/ambient/bin/install-cni uninstall
same_json "$conf" "$fixture" || fail "uninstall did not restore the original"
[[ ! -e "$host/opt/cni/bin/ambient-cni" ]] || fail "binary left behind"
echo "ok: uninstall"

# 3. The long-running installer repairs a rewrite, then uninstalls on SIGTERM.
pm run -d --name "$name" "${pr[@]}" "${mounts[@]}" "$image" \
  /opt/ambient/bin/install-cni run --on-exit uninstall >/dev/null
wait_for() { for _ in $(seq 100); do eval "$1" && return 0; sleep 0.1; done; fail "timed out: $1"; }
wait_for '[[ "$(last_type "$conf" 2>/dev/null)" == ambient-cni ]]'
cp "$fixture" "$conf"   # the primary CNI rewrites its file
wait_for '[[ "$(last_type "$conf" 2>/dev/null)" == ambient-cni ]]'
echo "ok: repaired a rewrite"
pm stop -t 10 "$name" >/dev/null
same_json "$conf" "$fixture" || fail "SIGTERM + --on-exit uninstall did not restore the original"
[[ ! -e "$host/opt/cni/bin/ambient-cni" ]] || fail "binary left behind after SIGTERM"
pm logs "$name" 2>&1 | grep -q "stopping and uninstalling" || fail "no uninstall log line"
echo "ok: run + SIGTERM"
echo "4 passed, 0 failed"

#!/usr/bin/env bash
# Regenerates ztunnel/link-order.txt: the functions ztunnel runs while it starts, loads its
# manifests, takes the node agent's push (issuing certificates) and answers probes and
# scrapes, as recorded by valgrind's callgrind. ztunnel/build.rs hands the list to the
# linker for release builds, which packs that code together (see build.rs for why).
#
# The list holds symbol-name patterns without crate hashes, so it stays valid across
# dependency updates, feature sets and profiles; rerun this when ztunnel's startup or idle
# code changes shape (the mesh benchmark prints the size of the ordered code, and
# `readelf -S` shows it as .text.ordered). Needs root (a network namespace), valgrind and
# python3. Usage: scripts/ztunnel-link-order.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (network namespace)" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

# The profiled build has no code layout (ztunnel/build.rs): valgrind does not attribute code
# in .text.ordered to its functions, so a laid-out binary's profile lists only what the
# current list left out (runs on a laid-out binary gave 281 and 928 disjoint patterns). It
# goes to a target directory of its own so the shipped build is not relinked back and forth.
TARGET="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/link-order-profile"
ZTUNNEL_NO_CODE_LAYOUT=1 CARGO_TARGET_DIR="$TARGET" cargo build --release --locked -p ztunnel --bin ztunnel
BIN="$TARGET/release/ztunnel"

WORK="$(mktemp -d)"
NS="zt-order-$$"
PID=""
cleanup() {
  if [ -n "$PID" ]; then kill -KILL "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
"$BIN" ca init --dir "$WORK/ca" >/dev/null
mkdir "$WORK/manifests"
cat > "$WORK/manifests/cluster.yaml" <<'YAML'
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: a1, namespace: shop, uid: uid-a1, labels: {app: a1}}
spec: {nodeName: n0, serviceAccountName: a1}
status: {phase: Running, podIP: 10.9.1.2, podIPs: [{ip: 10.9.1.2}], hostIP: 10.9.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: a2, namespace: plain, uid: uid-a2, labels: {app: a2}}
spec: {nodeName: n0, serviceAccountName: default}
status: {phase: Running, podIP: 10.9.1.3, podIPs: [{ip: 10.9.1.3}], hostIP: 10.9.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b1, namespace: shop, uid: uid-b1, labels: {app: b1}}
spec: {nodeName: n1, serviceAccountName: b1}
status: {phase: Running, podIP: 10.9.2.2, podIPs: [{ip: 10.9.2.2}], hostIP: 10.9.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: b-1, namespace: shop, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
endpoints: [{addresses: [10.9.2.2], conditions: {ready: true}}]
ports: [{name: http, port: 8080, protocol: TCP}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-plain, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [plain]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
YAML

# What the node agent and a kubelet/Prometheus do to an idle ztunnel.
cat > "$WORK/drive.py" <<'PY'
import json, socket, struct, sys, time, urllib.request
sock_path = sys.argv[1]
def get(port, path):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read()
    except Exception:
        return None
deadline = time.time() + 120
while get(15021, "/healthz/ready") is None:
    if time.time() > deadline:
        sys.exit("ztunnel did not become ready")
    time.sleep(0.5)
def workload(name, ip):
    return {"uid": "uid-" + name, "namespace": "shop", "name": name,
            "service_account": name, "node": "n0", "ips": [ip]}
s = socket.socket(socket.AF_UNIX)
for _ in range(100):
    try:
        s.connect(sock_path)
        break
    except OSError:
        time.sleep(0.2)
def call(op, args):
    body = json.dumps({"version": 1, "op": op, "args": args}).encode()
    s.sendall(struct.pack(">I", len(body)) + body)
    n = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
    reply = json.loads(s.recv(n, socket.MSG_WAITALL))
    if reply.get("result") != "ack":
        sys.exit(f"agent push refused: {reply}")
call("snapshot", [workload("a1", "10.9.1.2")])
call("add", workload("f1", "10.9.1.9"))
for _ in range(3):
    for port, path in [(15021, "/healthz/ready"), (15020, "/metrics"),
                       (15000, "/config_dump"), (15000, "/connections")]:
        get(port, path)
    time.sleep(3)
PY

: > "$WORK/functions"
for format in text json; do
  ip netns exec "$NS" valgrind -q --tool=callgrind --demangle=no --compress-strings=no \
    --compress-pos=no --callgrind-out-file="$WORK/cg.$format" \
    "$BIN" run --node-name n0 --ca-dir "$WORK/ca" --manifest-dir "$WORK/manifests" \
    --agent-socket "$WORK/zt.sock" --log-format "$format" >"$WORK/log.$format" 2>&1 &
  PID=$!
  ip netns exec "$NS" python3 "$WORK/drive.py" "$WORK/zt.sock" || { cat "$WORK/log.$format" >&2; exit 1; }
  callgrind_control -d "$PID" >/dev/null
  # The dump is written by the (slow) instrumented process: wait until the file exists and
  # its size has stopped changing, or a list cut short by the kill below would be silently
  # smaller (runs of this script once gave 281 and 928 patterns from the same build).
  dump=""; last=-1; stable=0
  for _ in $(seq 300); do
    dump="$(ls "$WORK"/cg."$format".* 2>/dev/null | head -1 || true)"
    size="$( [ -n "$dump" ] && stat -c %s "$dump" || echo 0)"
    if [ "$size" -gt 0 ] && [ "$size" = "$last" ]; then
      stable=$((stable + 1)); [ "$stable" -ge 4 ] && break
    else
      stable=0
    fi
    last="$size"; sleep 0.5
  done
  [ "$stable" -ge 4 ] || { echo "callgrind's dump of the $format run never completed" >&2; exit 1; }
  kill -KILL "$PID"; wait "$PID" 2>/dev/null || true; PID=""
  cat "$WORK"/cg."$format".* >> "$WORK/functions"
done

python3 - "$WORK/functions" ztunnel/link-order.txt <<'PY'
import re, sys
seen, patterns, obj = set(), [], None
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("ob="):
        obj = line[3:].strip()
    elif line.startswith("fn=") and obj and obj.endswith("/ztunnel"):
        name = re.sub(r"'\d+$", "", line[3:].strip())   # callgrind's recursion marks
        name = re.sub(r"\.\d+$", "", name)               # LLVM's suffix on local copies
        if not name.startswith("_R"):
            continue   # C and assembly (ring): whole objects, left where they are
        # Crate hashes (Cs<hash>_) and back-references (B<offset>_, offsets that move
        # when a hash's length does) become wildcards: the pattern then names the same
        # function in any build of the same source.
        pattern = re.sub(r"Cs[0-9A-Za-z]+_", "Cs*_", name)
        pattern = re.sub(r"B[0-9A-Za-z]{0,3}_", "B*_", pattern)
        if pattern not in seen:
            seen.add(pattern)
            patterns.append(pattern)
with open(sys.argv[2], "w") as out:
    out.write("# Generated by scripts/ztunnel-link-order.sh; read by ztunnel/build.rs.\n")
    out.write("# Functions ztunnel runs to start, load manifests, take the agent's push and\n")
    out.write("# answer probes and scrapes (v0 symbol names, crate hashes as wildcards).\n")
    out.write("\n".join(patterns) + "\n")
print(f"{len(patterns)} function patterns -> {sys.argv[2]}")
PY

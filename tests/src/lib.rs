//! The shared test harness of the ambient data plane: everything the network tests, the
//! containerd end-to-end test, the benchmarks and the local lab need to build nodes and pods out
//! of network namespaces and to drive the real binaries.
//!
//! # Layout
//! - [`netns`]: [`netns::NetNs`], a network namespace owned by a test (unique name
//!   `<tag>-<pid>-<n>`, created with `ip netns add`; `Drop` stops the processes registered with
//!   it, deletes the links it created and the namespace) and [`netns::eventually`], the polling
//!   helper used instead of sleeps.
//! - [`addrs`]: the one allocator of test address ranges: a [`addrs::Block`] is a leased
//!   `10.<octet>.0.0/16` (and `fd00:<octet hex>::/32`), exclusive between test processes.
//! - [`bins`]: where the workspace binaries are (`target/<profile>/`, next to the running test
//!   executable; a clear panic says to run `cargo build --workspace` when one is missing) and
//!   where Debian's CNI plugins are (`/usr/lib/cni`).
//! - [`cni`]: a CNI chain executed with libcni's semantics (ADD in order with `prevResult`, DEL in
//!   reverse and CHECK in order with the cached result, `runtimeConfig` by capability, the spec's
//!   error object as a typed error). Plugins run inside a node namespace through
//!   `ip netns exec`, so what they create lands there and `/sys` is the node's.
//! - [`topo`]: [`topo::Node`] (a namespace with its pod CIDR, its chain `bridge|ptp` +
//!   `host-local` + `ambient-cni` with `agentSocket`, optional underlay links to other nodes) and
//!   [`topo::Pod`] (a namespace attached through the chain, DEL on drop).
//! - [`probe`]: TCP echo server, original-destination recorder (`SO_ORIGINAL_DST`) and client;
//!   the `netprobe` binary runs them inside namespaces.
//! - [`capture`]: `tcpdump` on a namespace's interface and a pcap reader, to show what crossed
//!   a link (a plaintext marker, the ports used).
//! - [`recorder`]: a chained CNI plugin that records its calls (`cni-recorder` binary), to check
//!   what runtimes hand a chained plugin independently of `ambient-cni`.
//! - [`fake_agent`]: a stand-in node agent speaking `ambient_common::agent_api` over
//!   `ambient_common::frame`, recording requests.
//! - [`manifests`]: Namespace and Pod objects for a manifest directory, written atomically.
//! - [`agent`]: the real `node-agent` started in a node namespace, and its `pods` listing.
//! - [`backend`]: the redirection backend under test (`AMBIENT_TEST_BACKEND`: nftables,
//!   iptables-nft, iptables-legacy) for the suites' backend matrix: agent flags, the
//!   kube-proxy stand-in in the same tool, and reading or disturbing the agent's rules.
//! - [`oci`]: a static pause binary (C, `gcc -static`) packed into an OCI image archive.
//! - [`cluster`]: a whole ambient cluster (N nodes on an underlay bridge, CA, shared manifest
//!   directory, real `node-agent` + `ztunnel` per node, pods through the real chain with echo
//!   servers, Services with kube-proxy-style DNAT), used by `tests/e2e.rs`, `tests/faults.rs`
//!   and the `lab` binary; [`cluster::Cluster::persist`] hands it over to a state file. Its
//!   files split it by concern: lifecycle, addressing, services, state, metrics, probes.
//! - [`inns`]: work inside a namespace from a thread (`setns`), a small HTTP GET, and a large
//!   echo transfer checked with SHA-256.
//! - [`ztunnel_lab`]: ztunnel alone between two node namespaces with routed pods, behind the
//!   node agent's real capture (`ambient_rules`), for ztunnel's own system tests.
//! - [`containerd`]: Debian's containerd with all its state in one directory, running inside a
//!   node namespace (through `nsenter` + `unshare`, keeping the host's cgroups under the node's
//!   `/sys`), cleaned up by PID on drop.
//!
//! # Running
//! Everything that touches the kernel needs root. Unit tests (`cargo test -p ambient-tests
//! --lib`) do not. The root tests are in `tests/`: `harness.rs` (the harness itself, with the
//! recorder plugin), `containerd.rs` (the CRI path: recorder, `ambient-cni` + fake agent, real
//! `ambient-cni` + `node-agent`, cleanup after a crash) and the data-plane tests written on top.
//! Build the workspace first (`cargo build --workspace`), then
//! `cargo test -p ambient-tests` or `cargo nextest run -p ambient-tests`. Each test uses its own
//! namespace names and its own 10.2xx.0.0/16 range, so they run in parallel.
//!
//! System packages: iproute2, util-linux (`nsenter`, `unshare`, `mount`), nftables,
//! containernetworking-plugins, containerd, runc, tcpdump, gcc and libc6-dev (static libc), tar, protoc
//! (for the `k8s-cri` dev-dependency).
#![forbid(unsafe_code)]

pub mod addrs;
pub mod agent;
pub mod backend;
pub mod bins;
pub mod capture;
pub mod cluster;
pub mod cni;
pub mod containerd;
pub mod fake_agent;
pub mod inns;
pub mod issuer;
pub mod manifests;
pub mod netns;
pub mod oci;
pub mod probe;
pub mod recorder;
pub mod topo;
pub mod ztunnel_lab;

pub use netns::{eventually, NetNs};

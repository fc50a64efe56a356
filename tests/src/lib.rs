//! The shared test harness of the ambient data plane: everything the network tests, the
//! containerd end-to-end test and the local lab need to build nodes and pods out of network
//! namespaces and drive the real binaries.
//!
//! Layout:
//! - [`netns`]: [`netns::NetNs`], a network namespace owned by a test (unique name, `Drop`
//!   kills registered processes, removes links and the namespace), and [`netns::eventually`].
//! - [`bins`]: where the workspace binaries (`target/<profile>/`) and Debian's CNI plugins are.
//! - [`cni`]: a CNI chain executed with libcni's semantics (ADD/DEL/CHECK, `prevResult`,
//!   `runtimeConfig`, typed errors), plugins run inside a node namespace.
//! - [`topo`]: [`topo::Node`] and [`topo::Pod`] on top of the two.
//! - [`probe`]: TCP echo / original-destination recorder / client, also the `netprobe` binary.
//! - [`oci`]: a static pause binary and an OCI image archive built from it.
//! - [`containerd`]: Debian's containerd run inside a node namespace with everything in a
//!   tempdir, for the CRI end-to-end test.
//! - [`recorder`]: a chained CNI plugin that records its calls (`cni-recorder` binary).
//! - [`manifests`]: Namespace and Pod objects for a manifest directory, written atomically.
//! - [`agent`]: the real `node-agent` started in a node namespace, and its `pods` listing.
//! - [`fake_agent`]: a stand-in node agent speaking `common::agent_api`, recording requests.
//!
//! Everything that touches the kernel needs root; the unit tests here do not. The root tests
//! are in `tests/` (`cargo test -p ambient-tests`, as root, after `cargo build --workspace`).
#![forbid(unsafe_code)]

pub mod agent;
pub mod bins;
pub mod cni;
pub mod containerd;
pub mod fake_agent;
pub mod manifests;
pub mod netns;
pub mod oci;
pub mod probe;
pub mod recorder;
pub mod topo;

pub use netns::{eventually, NetNs};

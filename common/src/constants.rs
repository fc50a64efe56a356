//! Ports, marks, paths and names: the one place where they are written down.
//! `docs/architecture.md` repeats them in a table; keep the two in step.

/// ztunnel's outbound capture listener.
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's inbound plaintext capture listener.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// ztunnel's inbound HBONE (mTLS) listener, and the port HBONE tunnels are addressed to.
pub const HBONE_PORT: u16 = 15008;
/// ztunnel's admin endpoint (localhost only).
pub const ADMIN_PORT: u16 = 15000;
/// ztunnel's Prometheus endpoint (`/metrics`).
pub const METRICS_PORT: u16 = 15020;
/// ztunnel's readiness endpoint (`/healthz/ready`).
pub const READINESS_PORT: u16 = 15021;
/// Node agent's Prometheus endpoint (`/metrics`).
pub const AGENT_METRICS_PORT: u16 = 15014;

/// Socket mark carried by every connection ztunnel itself opens. Capture rules never match it.
pub const ZTUNNEL_MARK: u32 = 0x539;
/// The bits of the packet/socket mark that belong to this project.
pub const MARK_MASK: u32 = 0xfff;
/// Policy routing table that delivers marked reply packets to the local ztunnel.
pub const ROUTE_TABLE: u32 = 133;
/// Priority of the `ip rule` that selects [`ROUTE_TABLE`].
pub const ROUTE_RULE_PRIORITY: u32 = 32_000;

/// The CNI plugin's type name in the conflist.
pub const PLUGIN_NAME: &str = "ambient-cni";
/// Default run directory: sockets and the agent's state (survives agent restart, not reboot).
pub const RUN_DIR: &str = "/var/run/ambient";
/// Where libcni (containerd, CRI-O) caches each attachment's ADD result: the node agent
/// adopts pods that were running before it from there.
pub const CNI_CACHE_DIR: &str = "/var/lib/cni/results";
/// Default plugin -> agent socket.
pub const CNI_SOCKET: &str = "/var/run/ambient/cni.sock";
/// Default agent -> ztunnel socket.
pub const ZTUNNEL_SOCKET: &str = "/var/run/ambient/ztunnel.sock";
/// Directory (inside the run directory) holding one file per attachment the agent knows.
pub const STATE_DIR: &str = "attachments";
/// The nftables table owned by this project (in the `inet` and `bridge` families).
pub const NFT_TABLE: &str = "ambient";
/// The interface group (`ip link set dev X group N`) the iptables backend gives routed ambient
/// pods' host veths, so one fixed rule (`-m devgroup`) can tell them apart: ipsets have no
/// set of interface names.
pub const ROUTED_PORT_GROUP: u32 = 0x0a4d_4201;

/// Enrolment label, on a namespace or a pod.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Label value that enrols.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Label value that opts a pod out even in an ambient namespace.
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Namespaces the plugin and agent leave alone unless configured otherwise.
pub const DEFAULT_EXCLUDED_NAMESPACES: &[&str] = &["kube-system"];

/// CNI spec versions the plugin accepts and reports.
pub const SUPPORTED_CNI_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Annotation recording the node agent's decision on an ambient pod (Istio's key, so existing
/// tooling reads it): `enabled` while the pod is ambient, removed when it no longer is. The
/// only field the agent may change on a pod (`install/manifests/admission.yaml`).
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// The uid:gid ztunnel becomes after its root-only start-up steps (`ztunnel run --run-as`), in
/// the DaemonSet and in the lab: a uid of its own, so no other process joins its listeners'
/// reuseport groups.
pub const ZTUNNEL_RUN_AS: &str = "1337:1337";

/// The certificate issuer's gRPC port (Istio's `IstioCertificateService`, TLS), as istiod uses.
pub const ISSUER_GRPC_PORT: u16 = 15012;
/// The certificate issuer's Prometheus and readiness endpoint (`/metrics`, `/ready`).
pub const ISSUER_METRICS_PORT: u16 = 15016;
/// The service account ztunnel runs as (`install/manifests`); by default the only one the
/// issuer lets ask on another workload's behalf (`<namespace>/<name>`).
pub const ZTUNNEL_SERVICE_ACCOUNT: &str = "ambient-system/ztunnel";
/// The issuer's Service name, in its serving certificate by default.
pub const ISSUER_SERVICE_DNS: &str = "ambient-issuer.ambient-system.svc";
/// Where the DaemonSet mounts ztunnel's projected service-account token (audience
/// `istio-ca`), as Istio's ztunnel reads it.
pub const ZTUNNEL_TOKEN_PATH: &str = "/var/run/secrets/tokens/istio-token";
/// Longest lifetime the issuer gives a workload certificate, and its default.
pub const MAX_WORKLOAD_CERT_TTL_SECS: u64 = 24 * 3600;

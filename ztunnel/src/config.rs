//! ztunnel's configuration: command-line flags ([`RunArgs`]) turned into a typed [`Config`] by
//! a pure function ([`Config::from_args`]) that reports every bad field at once. Nothing here
//! binds a socket; [`crate::app::App::build`] does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambient_common::constants;
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::identity::IssuerSettings;

/// Istio's default cluster id (`--cluster-id`), sent to the issuer as `clusterid`.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// Default most streams per pooled HBONE connection (`--pool-max-streams`): as many as the
/// inbound side accepts ([`crate::hbone::SERVER_MAX_STREAMS`]). Istio's ztunnel defaults to
/// 100; with 10,000 open connections between two nodes, 100 means 100 HBONE connections
/// (~3.3 MiB of TLS and HTTP/2 buffers on each side) where 1000 means 10.
pub const DEFAULT_POOL_MAX_STREAMS: usize = crate::hbone::SERVER_MAX_STREAMS as usize;

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

/// What to do with connections to destinations outside the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutsideMesh {
    /// Connect directly (plain TCP).
    Allow,
    /// Refuse the connection.
    Deny,
}

/// When another node's pod is reached through HBONE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteCapture {
    /// When its labels make it ambient (a source without the agents' reports: manifests).
    Labels,
    /// When its labels make it ambient and its node's agent reports it captured (the pod
    /// annotation `ambient.istio.io/redirection: enabled`, as Istio's control plane decides);
    /// otherwise it is outside the mesh. Needs `AMBIENT_ANNOTATE_PODS=true` on every node.
    Annotation,
}

/// Default mutual-TLS mode for plaintext arriving at a local ambient pod, when no
/// PeerAuthentication says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MtlsMode {
    /// Accept plaintext (subject to authorization policy).
    Permissive,
    /// Refuse plaintext.
    Strict,
}

/// Where the cluster's objects come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A directory of manifests (`--manifest-dir`), polled.
    Manifests,
    /// The Kubernetes API (list+watch, cluster-wide).
    Kube,
}

/// The configured cluster source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Source {
    /// No directory: only the node agent's push (local workloads).
    None,
    Manifests {
        dir: PathBuf,
    },
    /// `kubeconfig: None`: the in-cluster service account.
    Kube {
        kubeconfig: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

fn d(s: &str) -> String {
    s.to_owned()
}

/// Flags of `ztunnel run`. Every port, address, mark and path is a flag.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Name of this node (pods whose spec.nodeName equals it are local).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Where Pods, Namespaces, Services, EndpointSlices, AuthorizationPolicies and
    /// PeerAuthentications come from: a manifest directory or the Kubernetes API.
    #[arg(long, value_enum, default_value_t = SourceKind::Manifests)]
    pub source: SourceKind,
    /// Directory of Kubernetes manifests (with --source=manifests); polled for changes.
    #[arg(long)]
    pub manifest_dir: Option<PathBuf>,
    /// Kubeconfig for --source=kube (default: the in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Development mode: this node holds a CA key. Directory holding ca-cert.pem,
    /// ca-key.pem and root-cert.pem (see `ztunnel ca init`). Exactly one of --ca-dir and
    /// --ca-address.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// The certificate issuer (Istio's certificate API over TLS, e.g.
    /// https://ambient-issuer.istio-system.svc:15012 or istiod). Exactly one of --ca-dir and
    /// --ca-address.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// PEM roots for the issuer's serving certificate, and the first trust bundle (required
    /// with --ca-address).
    #[arg(long)]
    pub ca_root: Option<PathBuf>,
    /// ztunnel's service-account token (audience istio-ca), read for every request.
    #[arg(long, default_value = constants::ZTUNNEL_TOKEN_PATH)]
    pub ca_token: PathBuf,
    /// Name the issuer's serving certificate must carry (default: the host of --ca-address;
    /// an IP address is matched against the certificate's IP SANs).
    #[arg(long)]
    pub ca_server_name: Option<String>,
    /// The cluster's id: sent to the issuer (`clusterid` header) and reported as
    /// `source_cluster`/`destination_cluster` in the metrics, as Istio does.
    #[arg(long, default_value = DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,
    /// Unix socket on which the node agent pushes local workloads.
    #[arg(long, default_value = constants::ZTUNNEL_SOCKET)]
    pub agent_socket: PathBuf,
    /// After the steps that need root (reading the CA, binding --agent-socket, setting
    /// tcp_migrate_req), become UID:GID keeping only CAP_NET_ADMIN, before any thread and any
    /// TCP listener exists: the capture listeners' reuseport groups then belong to that uid,
    /// and no other process of the node (root included) can join them.
    #[arg(long, env = "ZTUNNEL_RUN_AS")]
    pub run_as: Option<String>,
    /// The only uid allowed to push workloads on --agent-socket (the node agent's),
    /// checked with SO_PEERCRED.
    #[arg(long, default_value_t = 0)]
    pub agent_peer_uid: u32,
    /// With a cluster source: how long an agent push the source contradicts in a way it may
    /// still settle (an IP of a pod of this node being reused) is held before it is refused.
    #[arg(long, default_value = "1s")]
    pub agent_confirm_wait: String,
    /// With a cluster source: how long a workload pushed by the agent is kept while the
    /// source does not know its pod.
    #[arg(long, default_value = "30s")]
    pub agent_unconfirmed_ttl: String,
    /// SPIFFE trust domain.
    #[arg(long, default_value = constants::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Outbound capture listener(s), repeatable. `[::]` is skipped on a node without IPv6.
    #[arg(long = "outbound-addr", default_values_t = [d("0.0.0.0:15001"), d("[::]:15001")])]
    pub outbound_addrs: Vec<String>,
    /// Inbound HBONE listener(s), repeatable. `[::]` is skipped on a node without IPv6.
    #[arg(long = "inbound-addr", default_values_t = [d("0.0.0.0:15008"), d("[::]:15008")])]
    pub inbound_addrs: Vec<String>,
    /// Inbound plaintext capture listener(s), repeatable. `[::]` is skipped on a node
    /// without IPv6.
    #[arg(
        long = "inbound-plaintext-addr",
        default_values_t = [d("0.0.0.0:15006"), d("[::]:15006")]
    )]
    pub inbound_plaintext_addrs: Vec<String>,
    /// Port HBONE tunnels are addressed to on the destination pod's IP.
    #[arg(long, default_value_t = constants::HBONE_PORT)]
    pub hbone_port: u16,
    /// Admin endpoint (/config_dump, /connections); keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: String,
    /// Prometheus endpoint (/metrics). `0.0.0.0` listens on both families where the node
    /// has IPv6 (one dual-stack socket).
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: String,
    /// Readiness endpoint (/healthz/ready). `0.0.0.0` listens on both families where the
    /// node has IPv6.
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: String,
    /// Socket mark on every socket ztunnel opens (decimal or 0x hex).
    #[arg(long, default_value = "0x539")]
    pub mark: String,
    /// Keep the client pod's source IP when connecting to a local pod (IP_TRANSPARENT).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub transparent: bool,
    /// Connections to destinations outside the mesh.
    #[arg(long, value_enum, default_value_t = OutsideMesh::Allow)]
    pub outside_mesh: OutsideMesh,
    /// When another node's pod is reached through HBONE: `labels`, or `annotation` (only
    /// once its node's agent reports it captured).
    #[arg(long, value_enum, env = "AMBIENT_REMOTE_CAPTURE", default_value_t = RemoteCapture::Labels)]
    pub remote_capture: RemoteCapture,
    /// The cluster's pod and service ranges, comma-separated (e.g. 10.244.0.0/16,10.96.0.0/12).
    /// An outbound destination inside them that ztunnel does not know yet (a pod or Service
    /// just created, not yet read) is never treated as outside the mesh: ztunnel waits up to
    /// --discovery-wait for it, then refuses the connection rather than send it in plaintext.
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidrs: Vec<String>,
    /// How long an outbound connection to an unknown in-cluster destination waits for it.
    #[arg(long, default_value = "2s")]
    pub discovery_wait: String,
    /// Default mTLS mode for plaintext to local ambient pods.
    #[arg(long, value_enum, default_value_t = MtlsMode::Permissive)]
    pub default_mtls_mode: MtlsMode,
    /// Namespace whose AuthorizationPolicies and PeerAuthentications apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
    /// Namespaces never enrolled (as the node agent is configured), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = constants::DEFAULT_EXCLUDED_NAMESPACES.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    pub excluded_namespaces: Vec<String>,
    /// Lifetime of issued workload certificates (rotated at half-life).
    #[arg(long, default_value = "24h")]
    pub cert_ttl: String,
    /// How often the manifest directory is checked for changes.
    #[arg(long, default_value = "1s")]
    pub poll_interval: String,
    /// Most concurrent streams on one pooled HBONE connection (fewer if the server
    /// allows fewer). Each HBONE connection costs ~30 KiB (TLS and HTTP/2 buffers) whether
    /// its streams are busy or idle.
    #[arg(long, default_value_t = DEFAULT_POOL_MAX_STREAMS)]
    pub pool_max_streams: usize,
    /// Pooled HBONE connections unused for this long are closed.
    #[arg(long, default_value = "60s")]
    pub pool_idle_timeout: String,
    /// Interval of HTTP/2 PINGs on pooled connections (dead-connection detection).
    #[arg(long, default_value = "10s")]
    pub ping_interval: String,
    /// A PING unanswered for this long marks the connection dead.
    #[arg(long, default_value = "5s")]
    pub ping_timeout: String,
    /// Timeout to connect to a destination (TCP and TLS).
    #[arg(long, default_value = "10s")]
    pub connect_timeout: String,
    /// An inbound HBONE connection must finish its TLS handshake (client certificate
    /// verified) within this.
    #[arg(long, default_value = "5s")]
    pub hbone_handshake_timeout: String,
    /// Most inbound HBONE connections still in their TLS handshake from one source IP; more
    /// are closed at once.
    #[arg(long, default_value_t = 64)]
    pub hbone_handshakes_per_source: usize,
    /// Most inbound HBONE connections still in their TLS handshake in total.
    #[arg(long, default_value_t = 1024)]
    pub hbone_handshakes_total: usize,
    /// On SIGTERM, how long existing connections may drain before ztunnel exits.
    #[arg(long, default_value = "30s")]
    pub drain_timeout: String,
    /// Worker threads of the data-plane runtime.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or `tracing` filter (`info`, `debug`, `info,ztunnel::proxy=debug`);
    /// `RUST_LOG`, when set, takes precedence (for debugging).
    #[arg(long, env = "AMBIENT_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log one access-log line per connection (target `access`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,
    /// Set net.ipv4.tcp_migrate_req=1 in ztunnel's network namespace so connections queued on
    /// a closing listener move to a new ztunnel's (SO_REUSEPORT takeover).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub tcp_migrate_req: bool,
}

/// The effective configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub node_name: String,
    pub source: Source,
    pub ca: CaSource,
    pub agent_socket: PathBuf,
    /// (uid, gid) to become after the root-only steps (`--run-as`).
    pub run_as: Option<(u32, u32)>,
    pub agent_peer_uid: u32,
    pub agent_confirm_wait: Duration,
    pub agent_unconfirmed_ttl: Duration,
    pub trust_domain: String,
    pub outbound_addrs: Vec<SocketAddr>,
    pub inbound_addrs: Vec<SocketAddr>,
    pub inbound_plaintext_addrs: Vec<SocketAddr>,
    pub hbone_port: u16,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub mark: u32,
    pub transparent: bool,
    pub outside_mesh: OutsideMesh,
    pub remote_capture: RemoteCapture,
    pub cluster_cidrs: Vec<ambient_common::IpPrefix>,
    pub discovery_wait: Duration,
    pub default_mtls_mode: MtlsMode,
    pub root_namespace: String,
    pub excluded_namespaces: Vec<String>,
    pub cert_ttl: Duration,
    pub poll_interval: Duration,
    pub pool: PoolConfig,
    pub connect_timeout: Duration,
    pub hbone_handshake_timeout: Duration,
    pub hbone_handshakes_per_source: usize,
    pub hbone_handshakes_total: usize,
    pub drain_timeout: Duration,
    pub workers: usize,
    pub log_format: LogFormat,
    /// A valid `tracing` filter directive.
    pub log_level: String,
    /// The cluster's id, for telemetry (`--cluster-id`).
    pub cluster_id: String,
    pub access_log: bool,
    pub tcp_migrate_req: bool,
}

/// Where workload certificates come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum CaSource {
    /// Development: the node holds a CA key (`--ca-dir`).
    File { dir: PathBuf },
    /// A remote issuer (`--ca-address`).
    Issuer(IssuerSettings),
}

/// Host and port of `--ca-address` (`https://host[:port]`, port 15012 by default; an IPv6
/// host without its brackets).
pub fn parse_ca_address(s: &str) -> Result<(String, u16), String> {
    let uri: http::Uri = s.parse().map_err(|_| {
        format!("{s:?} is not a URL like https://ambient-issuer.istio-system.svc:15012")
    })?;
    if uri.scheme_str() != Some("https") {
        return Err(format!(
            "{s:?}: the issuer is reached over TLS (want https://)"
        ));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("{s:?}: want no path"));
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{s:?} has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, uri.port_u16().unwrap_or(constants::ISSUER_GRPC_PORT)))
}

/// HBONE client pool settings.
#[derive(Debug, Clone, Serialize)]
pub struct PoolConfig {
    pub max_streams: usize,
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams: DEFAULT_POOL_MAX_STREAMS,
            idle_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(5),
        }
    }
}

/// Parses `500ms`, `30s`, `5m`, `24h` (a bare number is seconds): the one syntax of every
/// binary's duration flags.
pub use ambient_common::duration::parse_duration;

/// Parses a mark: decimal or `0x` hexadecimal.
pub fn parse_mark(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a mark (decimal or 0x hex)"))
}

/// `UID:GID` (numeric; a missing `:GID` means the same number), never root.
fn parse_run_as(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("{s:?} is not UID:GID (numbers, like 1337:1337)"))
    };
    let (uid, gid) = (num(u)?, num(g)?);
    if uid == 0 {
        return Err(format!("{s:?}: uid 0 is what --run-as exists to leave"));
    }
    Ok((uid, gid))
}

/// `--ca-dir` or `--ca-address` and its companions.
fn ca_source(a: &RunArgs, errs: &mut Vec<String>) -> CaSource {
    let placeholder = CaSource::File {
        dir: PathBuf::new(),
    };
    match (&a.ca_dir, &a.ca_address) {
        (Some(_), Some(_)) => {
            errs.push("--ca-dir and --ca-address: give one (--ca-dir: this node holds a CA key, for development; --ca-address: ask the issuer)".into());
            placeholder
        }
        (None, None) => {
            errs.push("--ca-address (the certificate issuer) or --ca-dir (development: a CA key on this node): one is required".into());
            placeholder
        }
        (Some(dir), None) => {
            for (flag, given) in [
                ("--ca-root", a.ca_root.is_some()),
                ("--ca-server-name", a.ca_server_name.is_some()),
            ] {
                if given {
                    errs.push(format!("{flag}: only used with --ca-address"));
                }
            }
            CaSource::File { dir: dir.clone() }
        }
        (None, Some(address)) => {
            let (host, port) = parse_ca_address(address).unwrap_or_else(|e| {
                errs.push(format!("--ca-address: {e}"));
                (String::new(), 0)
            });
            let root = a.ca_root.clone().unwrap_or_else(|| {
                errs.push(
                    "--ca-root: required with --ca-address (PEM roots for the issuer's serving certificate)"
                        .into(),
                );
                PathBuf::new()
            });
            let server_name = a.ca_server_name.clone().unwrap_or_else(|| host.clone());
            if a.ca_server_name.is_some() || !host.is_empty() {
                if let Err(e) = rustls::pki_types::ServerName::try_from(server_name.as_str()) {
                    errs.push(format!(
                        "--ca-server-name: {server_name:?} is not a DNS name or IP address ({e})"
                    ));
                }
            }
            if a.ca_token.as_os_str().is_empty() {
                errs.push("--ca-token: must not be empty".into());
            }
            if a.cluster_id.trim().is_empty() {
                errs.push("--cluster-id: must not be empty".into());
            }
            CaSource::Issuer(IssuerSettings {
                address: address.clone(),
                host,
                port,
                server_name,
                root,
                token: a.ca_token.clone(),
                cluster_id: a.cluster_id.clone(),
            })
        }
    }
}

impl Config {
    /// Validates flags; every problem is reported, not just the first.
    pub fn from_args(a: &RunArgs) -> Result<Self, ConfigError> {
        let mut errs = Vec::new();
        let mut addr = |flag: &str, v: &str| -> SocketAddr {
            v.parse().unwrap_or_else(|_| {
                errs.push(format!("--{flag}: {v:?} is not an address:port"));
                SocketAddr::from(([0, 0, 0, 0], 0))
            })
        };
        let outbound_addrs = a
            .outbound_addrs
            .iter()
            .map(|v| addr("outbound-addr", v))
            .collect();
        let inbound_addrs = a
            .inbound_addrs
            .iter()
            .map(|v| addr("inbound-addr", v))
            .collect();
        let inbound_plaintext_addrs = a
            .inbound_plaintext_addrs
            .iter()
            .map(|v| addr("inbound-plaintext-addr", v))
            .collect();
        let admin_addr = addr("admin-addr", &a.admin_addr);
        let metrics_addr = addr("metrics-addr", &a.metrics_addr);
        let readiness_addr = addr("readiness-addr", &a.readiness_addr);
        let mut dur = |flag: &str, v: &str| -> Duration {
            parse_duration(v).unwrap_or_else(|e| {
                errs.push(format!("--{flag}: {e}"));
                Duration::ZERO
            })
        };
        let cert_ttl = dur("cert-ttl", &a.cert_ttl);
        let poll_interval = dur("poll-interval", &a.poll_interval);
        let idle_timeout = dur("pool-idle-timeout", &a.pool_idle_timeout);
        let ping_interval = dur("ping-interval", &a.ping_interval);
        let ping_timeout = dur("ping-timeout", &a.ping_timeout);
        let connect_timeout = dur("connect-timeout", &a.connect_timeout);
        let hbone_handshake_timeout = dur("hbone-handshake-timeout", &a.hbone_handshake_timeout);
        let drain_timeout = dur("drain-timeout", &a.drain_timeout);
        let discovery_wait = dur("discovery-wait", &a.discovery_wait);
        let agent_confirm_wait = dur("agent-confirm-wait", &a.agent_confirm_wait);
        let agent_unconfirmed_ttl = dur("agent-unconfirmed-ttl", &a.agent_unconfirmed_ttl);
        let cluster_cidrs = a
            .cluster_cidrs
            .iter()
            .filter(|c| !c.trim().is_empty())
            .filter_map(|c| match c.trim().parse() {
                Ok(p) => Some(p),
                Err(e) => {
                    errs.push(format!("--cluster-cidrs: {e}"));
                    None
                }
            })
            .collect();
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&a.log_level) {
            errs.push(format!(
                "--log-level: {:?} is not a log level or filter: {e}",
                a.log_level
            ));
        }
        let run_as = a.run_as.as_deref().and_then(|v| {
            parse_run_as(v)
                .map_err(|e| errs.push(format!("--run-as: {e}")))
                .ok()
        });
        let mark = parse_mark(&a.mark).unwrap_or_else(|e| {
            errs.push(format!("--mark: {e}"));
            0
        });
        if a.node_name.trim().is_empty() {
            errs.push("--node-name: must not be empty".into());
        }
        if a.trust_domain.is_empty() || a.trust_domain.contains('/') {
            errs.push(format!(
                "--trust-domain: {:?} is not a trust domain",
                a.trust_domain
            ));
        }
        if cert_ttl < Duration::from_secs(10) && !cert_ttl.is_zero() {
            errs.push("--cert-ttl: must be at least 10s".into());
        }
        if cert_ttl > Duration::from_secs(constants::MAX_WORKLOAD_CERT_TTL_SECS) {
            errs.push(format!(
                "--cert-ttl: must be at most {}h (the issuer's limit)",
                constants::MAX_WORKLOAD_CERT_TTL_SECS / 3600
            ));
        }
        let ca = ca_source(a, &mut errs);
        if poll_interval.is_zero() {
            errs.push("--poll-interval: must be positive".into());
        }
        if ping_interval.is_zero() || ping_timeout.is_zero() {
            errs.push("--ping-interval/--ping-timeout: must be positive".into());
        }
        if a.pool_max_streams == 0 {
            errs.push("--pool-max-streams: must be at least 1".into());
        }
        if hbone_handshake_timeout.is_zero()
            || a.hbone_handshakes_per_source == 0
            || a.hbone_handshakes_total == 0
        {
            errs.push("--hbone-handshake-timeout/--hbone-handshakes-per-source/--hbone-handshakes-total: must be positive".into());
        }
        if a.workers == 0 {
            errs.push("--workers: must be at least 1".into());
        }
        if a.hbone_port == 0 {
            errs.push("--hbone-port: must not be 0".into());
        }
        if mark & constants::MARK_MASK != mark && mark != 0 {
            tracing::debug!("mark {mark:#x} has bits outside the project's mask");
        }
        let source = match (a.source, &a.manifest_dir) {
            (SourceKind::Manifests, Some(dir)) => Source::Manifests { dir: dir.clone() },
            (SourceKind::Manifests, None) => Source::None,
            (SourceKind::Kube, None) => Source::Kube {
                kubeconfig: a.kubeconfig.clone(),
            },
            (SourceKind::Kube, Some(_)) => {
                errs.push("--manifest-dir: not used with --source=kube (give one source)".into());
                Source::None
            }
        };
        if !errs.is_empty() {
            return Err(ConfigError(errs));
        }
        Ok(Self {
            node_name: a.node_name.clone(),
            source,
            ca,
            agent_socket: a.agent_socket.clone(),
            run_as,
            agent_peer_uid: a.agent_peer_uid,
            agent_confirm_wait,
            agent_unconfirmed_ttl,
            trust_domain: a.trust_domain.clone(),
            outbound_addrs,
            inbound_addrs,
            inbound_plaintext_addrs,
            hbone_port: a.hbone_port,
            admin_addr,
            metrics_addr,
            readiness_addr,
            mark,
            transparent: a.transparent,
            outside_mesh: a.outside_mesh,
            remote_capture: a.remote_capture,
            cluster_cidrs,
            discovery_wait,
            default_mtls_mode: a.default_mtls_mode,
            root_namespace: a.root_namespace.clone(),
            excluded_namespaces: a.excluded_namespaces.clone(),
            cert_ttl,
            poll_interval,
            pool: PoolConfig {
                max_streams: a.pool_max_streams,
                idle_timeout,
                ping_interval,
                ping_timeout,
            },
            connect_timeout,
            hbone_handshake_timeout,
            hbone_handshakes_per_source: a.hbone_handshakes_per_source,
            hbone_handshakes_total: a.hbone_handshakes_total,
            drain_timeout,
            workers: a.workers,
            log_format: a.log_format,
            log_level: a.log_level.clone(),
            cluster_id: a.cluster_id.clone(),
            access_log: a.access_log,
            tcp_migrate_req: a.tcp_migrate_req,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["ztunnel", "--node-name", "n1", "--ca-dir", "/ca"];
        argv.extend_from_slice(extra);
        Config::from_args(&Cli::try_parse_from(argv).unwrap().run)
    }

    #[test]
    fn defaults_follow_the_brief() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.outbound_addrs[0].port(), constants::OUTBOUND_PORT);
        // Both families by default (IPv6 left out at bind time where the node has none).
        for addrs in [
            &c.outbound_addrs,
            &c.inbound_addrs,
            &c.inbound_plaintext_addrs,
        ] {
            assert_eq!(addrs.len(), 2, "{addrs:?}");
            assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6(), "{addrs:?}");
            assert_eq!(addrs[0].port(), addrs[1].port());
        }
        assert_eq!(c.inbound_addrs[0].port(), constants::HBONE_PORT);
        assert_eq!(
            c.inbound_plaintext_addrs[0].port(),
            constants::INBOUND_PLAINTEXT_PORT
        );
        assert_eq!(c.admin_addr.port(), constants::ADMIN_PORT);
        assert!(c.admin_addr.ip().is_loopback());
        assert_eq!(c.metrics_addr.port(), constants::METRICS_PORT);
        assert_eq!(c.readiness_addr.port(), constants::READINESS_PORT);
        assert_eq!(c.mark, constants::ZTUNNEL_MARK);
        assert_eq!(c.cert_ttl, Duration::from_secs(24 * 3600));
        assert!(c.transparent);
        assert_eq!(c.agent_socket, PathBuf::from(constants::ZTUNNEL_SOCKET));
        assert_eq!(c.agent_peer_uid, 0);
        assert_eq!(c.run_as, None);
        assert_eq!(c.hbone_handshake_timeout, Duration::from_secs(5));
        assert_eq!(
            (c.hbone_handshakes_per_source, c.hbone_handshakes_total),
            (64, 1024)
        );
        assert_eq!(c.agent_confirm_wait, Duration::from_secs(1));
    }

    #[test]
    fn every_bad_field_is_reported() {
        let err = parse(&[
            "--outbound-addr",
            "nope",
            "--cert-ttl",
            "3x",
            "--mark",
            "0xzz",
            "--workers",
            "0",
            "--log-level",
            "ztunnel=loud",
        ])
        .unwrap_err();
        assert_eq!(err.0.len(), 5, "{err}");
        assert!(err.to_string().contains("--log-level"), "{err}");
        assert_eq!(
            parse(&["--log-level", "info,ztunnel::proxy=debug"])
                .unwrap()
                .log_level,
            "info,ztunnel::proxy=debug"
        );
        let c = parse(&["--transparent", "false", "--outbound-addr", "127.0.0.1:0"]).unwrap();
        assert!(!c.transparent);
    }

    #[test]
    fn source_flags() {
        assert_eq!(parse(&[]).unwrap().source, Source::None);
        assert_eq!(
            parse(&["--manifest-dir", "/m"]).unwrap().source,
            Source::Manifests { dir: "/m".into() }
        );
        assert_eq!(
            parse(&["--source=kube"]).unwrap().source,
            Source::Kube { kubeconfig: None }
        );
        assert_eq!(
            parse(&["--source", "kube", "--kubeconfig", "/k"])
                .unwrap()
                .source,
            Source::Kube {
                kubeconfig: Some("/k".into())
            }
        );
        let err = parse(&["--source=kube", "--manifest-dir", "/m"]).unwrap_err();
        assert!(err.to_string().contains("--manifest-dir"), "{err}");
        let argv = [
            "ztunnel",
            "--node-name",
            "n",
            "--ca-dir",
            "/c",
            "--source",
            "etcd",
        ];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn run_as_is_a_non_root_uid_and_gid() {
        assert_eq!(parse_run_as("1337:1337"), Ok((1337, 1337)));
        assert_eq!(parse_run_as("1337"), Ok((1337, 1337)));
        assert_eq!(parse_run_as("1000:2000"), Ok((1000, 2000)));
        for bad in ["0", "0:1337", "ztunnel", "1337:", ":1337", "-1", "1337:x"] {
            assert!(parse_run_as(bad).is_err(), "{bad}");
        }
        let c = parse(&["--run-as", "1337:1337"]).unwrap();
        assert_eq!(c.run_as, Some((1337, 1337)));
        let err = parse(&["--run-as", "0"]).unwrap_err();
        assert!(err.to_string().contains("--run-as"), "{err}");
    }

    fn parse_argv(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["ztunnel", "--node-name", "n1"];
        argv.extend_from_slice(args);
        Config::from_args(&Cli::try_parse_from(argv).unwrap().run)
    }

    #[test]
    fn ca_flags() {
        let issuer = |address: &str, server_name: Option<&str>| {
            let mut argv = vec!["--ca-address", address, "--ca-root", "/r.pem"];
            if let Some(n) = server_name {
                argv.extend(["--ca-server-name", n]);
            }
            parse_argv(&argv).map(|c| c.ca)
        };
        let want = |host: &str, port: u16, name: &str, address: &str| {
            CaSource::Issuer(IssuerSettings {
                address: address.into(),
                host: host.into(),
                port,
                server_name: name.into(),
                root: "/r.pem".into(),
                token: constants::ZTUNNEL_TOKEN_PATH.into(),
                cluster_id: "Kubernetes".into(),
            })
        };
        // (address, --ca-server-name, host, port, server name)
        for (address, name, host, port, server_name) in [
            (
                "https://10.0.0.1:15012",
                None,
                "10.0.0.1",
                15012,
                "10.0.0.1",
            ),
            (
                "https://ambient-issuer.istio-system.svc:15012",
                None,
                "ambient-issuer.istio-system.svc",
                15012,
                "ambient-issuer.istio-system.svc",
            ),
            (
                "https://istiod.istio-system.svc",
                None,
                "istiod.istio-system.svc",
                constants::ISSUER_GRPC_PORT,
                "istiod.istio-system.svc",
            ),
            ("https://[fd00::1]:9000/", None, "fd00::1", 9000, "fd00::1"),
            (
                "https://10.0.0.1:15012",
                Some("istiod.istio-system.svc"),
                "10.0.0.1",
                15012,
                "istiod.istio-system.svc",
            ),
        ] {
            assert_eq!(
                issuer(address, name).unwrap(),
                want(host, port, server_name, address),
                "{address}"
            );
        }
        // (flags, text every error must carry)
        let bad: &[(&[&str], &[&str])] = &[
            (&[], &["--ca-address", "--ca-dir", "one is required"]),
            (
                &[
                    "--ca-dir",
                    "/ca",
                    "--ca-address",
                    "https://a:1",
                    "--ca-root",
                    "/r",
                ],
                &["--ca-dir and --ca-address: give one"],
            ),
            (&["--ca-address", "https://a:1"], &["--ca-root: required"]),
            (
                &["--ca-address", "http://a:1", "--ca-root", "/r"],
                &["--ca-address", "https://"],
            ),
            (
                &["--ca-address", "https://a:1/x", "--ca-root", "/r"],
                &["--ca-address", "no path"],
            ),
            (
                &["--ca-address", "a b", "--ca-root", "/r"],
                &["--ca-address", "not a URL"],
            ),
            (
                &["--ca-dir", "/ca", "--ca-root", "/r"],
                &["--ca-root: only used with --ca-address"],
            ),
            (
                &[
                    "--ca-address",
                    "https://a:1",
                    "--ca-root",
                    "/r",
                    "--ca-server-name",
                    "bad name!",
                ],
                &["--ca-server-name"],
            ),
            (
                &[
                    "--ca-address",
                    "https://a:1",
                    "--ca-root",
                    "/r",
                    "--cluster-id",
                    " ",
                ],
                &["--cluster-id"],
            ),
            (
                &["--ca-dir", "/ca", "--cert-ttl", "25h"],
                &["--cert-ttl: must be at most 24h"],
            ),
        ];
        for (argv, texts) in bad {
            let err = parse_argv(argv).unwrap_err().to_string();
            for t in *texts {
                assert!(err.contains(t), "{argv:?}: {err}");
            }
        }
        let two = parse_argv(&["--ca-address", "http://a", "--cert-ttl", "48h"]).unwrap_err();
        assert_eq!(two.0.len(), 3, "every bad field at once: {two}");
        assert_eq!(
            parse_argv(&["--ca-dir", "/ca"]).unwrap().ca,
            CaSource::File { dir: "/ca".into() }
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert_eq!(parse_mark("1337").unwrap(), 0x539);
    }
}

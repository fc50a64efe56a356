//! Interop with Istio's ztunnel, both directions, over HBONE, with every certificate issued by
//! this project's `ambient-issuer` through Istio's certificate API (`CreateCertificate` over TLS
//! on 15012). Neither proxy holds a CA key: ours runs with `--ca-address` and a node
//! credential, Istio's in dedicated mode (no istiod, `FAKE_CA` unset) with a token bound to the
//! one pod it serves.
//!
//! Topology (`10.<octet>.0.0/24` of a leased block, `ambient_tests::addrs`):
//! - namespace A, .1: the pod `default/client` of node-a, served by Istio's ztunnel
//!   (`PROXY_MODE=dedicated`), with the issuer beside it (Istio's ztunnel reaches it on
//!   127.0.0.1, ours on .1) and an echo server; its outbound to the app port is
//!   REDIRECTed to Istio's 15001 (its own marked sockets excepted);
//! - namespace B, .2, joined to A by a veth pair: node-b, where our ztunnel runs
//!   (`--transparent false`);
//! - namespace S, .3, joined to B by a veth pair: node-b's pod `default/server`, with
//!   an echo server. B captures as the node agent would, in PREROUTING: S's connections to the
//!   app port go to our 15001, HBONE to S's 15008 (A routes .3 via B) to our 15008.
//!   B does not forward, so nothing reaches S or leaves it except through our ztunnel.
//!
//! The server pod has an address of its own because our ztunnel never connects to one of its
//! node's addresses on a pod's behalf (`proxy::local::classify`, attack 4): a pod that *is*
//! the node namespace gets `DENY` (HTTP 401 on the HBONE stream).
//!
//! Istio's ztunnel is not part of this project: the test uses the binary named by
//! `ISTIO_ZTUNNEL`, else `/work/shared/peers/istio-ztunnel/ztunnel`, and passes with a note when
//! there is none. Run as root after `cargo build --workspace --bins`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ambient_common::constants::{
    ADMIN_PORT, DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, HBONE_PORT, ISSUER_GRPC_PORT,
    ISSUER_METRICS_PORT, MARK_MASK, METRICS_PORT, OUTBOUND_PORT, READINESS_PORT, ZTUNNEL_MARK,
};
use ambient_tests::addrs::Block;
use ambient_tests::bins;
use ambient_tests::cluster::{sum_samples, tail};
use ambient_tests::inns::{http_get, in_ns};
use ambient_tests::netns::{eventually, run, NetNs};
use serde_json::Value;
use tempfile::TempDir;

/// Where Istio's ztunnel is when `ISTIO_ZTUNNEL` does not say.
const ISTIO_ZTUNNEL_DEFAULT: &str = "/work/shared/peers/istio-ztunnel/ztunnel";
const ISTIO_ZTUNNEL_ENV: &str = "ISTIO_ZTUNNEL";

/// The three namespaces' addresses, from the test's leased block: `10.<octet>.0.1-3/24`.
#[derive(Debug, Clone, Copy)]
struct Ips {
    a: Ipv4Addr,
    b: Ipv4Addr,
    s: Ipv4Addr,
}

impl Ips {
    fn of(block: &Block) -> Self {
        Self {
            a: block.v4(0, 1),
            b: block.v4(0, 2),
            s: block.v4(0, 3),
        }
    }
}
const PREFIX_LEN: u8 = 24;
/// A's end and B's end of the A-B link; B's end and S's end of the pod's link.
const A_IF: &str = "iz-a";
const B_IF: &str = "iz-b";
const B_POD_IF: &str = "iz-bs";
const S_IF: &str = "iz-s";
/// The echo servers' port in both namespaces (the only port either side captures).
const APP_PORT: u16 = 8080;

const TRUST_DOMAIN: &str = "cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
/// The service account node proxies ask as (given explicitly to both the credential and the
/// issuer, so the test does not depend on either default).
const NODE_PROXY_SA: &str = "istio-system/ztunnel";

/// Readiness of the three processes, and each connection's retries.
const WAIT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(3);
const LOG_TAIL: usize = 60;

/// Istio's static "XDS" state (`LOCAL_XDS_PATH`): the two pods, both HBONE.
fn istio_local_xds(ips: Ips) -> String {
    let workload = |name: &str, ip: Ipv4Addr, node: &str| {
        format!(
            "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  \
             serviceAccount: {name}\n  trustDomain: {TRUST_DOMAIN}\n  workloadIps: [\"{ip}\"]\n  \
             protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n"
        )
    };
    format!(
        "workloads:\n{}{}policies: []\nservices: []\n",
        workload("client", ips.a, "node-a"),
        workload("server", ips.s, "node-b"),
    )
}

/// The cluster as our ztunnel and the issuer read it (`--source manifests`).
fn cluster_manifest(ips: Ips) -> String {
    let pod = |name: &str, ip: Ipv4Addr, node: &str, host: Ipv4Addr| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, uid: uid-{name}, \
             labels: {{app: {name}}}}}\nspec: {{nodeName: {node}, serviceAccountName: {name}}}\n\
             status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: \"{ip}\"}}], hostIP: {host}}}\n"
        )
    };
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: \
         {{{DATAPLANE_MODE_LABEL}: {DATAPLANE_MODE_AMBIENT}}}}}\n{}{}",
        pod("client", ips.a, "node-a", ips.a),
        pod("server", ips.s, "node-b", ips.b),
    )
}

/// Istio's ztunnel, or `None` (with the reason printed) when it is not there.
fn istio_ztunnel() -> Option<PathBuf> {
    let path = std::env::var_os(ISTIO_ZTUNNEL_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(ISTIO_ZTUNNEL_DEFAULT));
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipped: Istio's ztunnel not found at {} (set {ISTIO_ZTUNNEL_ENV}=<path> to run this test)",
            path.display()
        );
        None
    }
}

/// Whether process `pid` (a child not yet reaped) is still running.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn log_file(path: &Path) -> (std::fs::File, std::fs::File) {
    let f = std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let g = f.try_clone().unwrap();
    (f, g)
}

/// GET `path` on `127.0.0.1:port` inside `ns`.
fn get(ns: &NetNs, port: u16, path: &str) -> Result<(u16, String), String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    in_ns(&ns.path(), || http_get(addr, path, IO_TIMEOUT))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

fn get_ok(ns: &NetNs, port: u16, path: &str) -> Result<String, String> {
    match get(ns, port, path)? {
        (200, body) => Ok(body),
        (s, body) => Err(format!("{path} answered {s}: {body}")),
    }
}

/// Connects from `ns` to `to`, sends `payload`, expects it echoed.
fn echo_from(ns: &NetNs, to: SocketAddr, payload: &str) -> Result<String, String> {
    in_ns(&ns.path(), || {
        ambient_tests::probe::connect(to, payload.as_bytes(), Some(payload.as_bytes()), IO_TIMEOUT)
    })
    .map_err(|e| e.to_string())?
    .map(|r| r.received)
    .map_err(|e| ambient_common::error::chain(&e))
}

/// The two namespaces, the directory holding the CA, credentials, manifests and logs, and the
/// three processes. Dropping it prints the logs' tails when the test failed, then stops every
/// process and removes the namespaces (their guards), then the directory.
struct Lab {
    a: NetNs,
    b: NetNs,
    s: NetNs,
    dir: TempDir,
    istio_bin: PathBuf,
    ips: Ips,
    _block: Block,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (what, log) in [
                ("ambient-issuer (netns A)", self.issuer_log()),
                ("our ztunnel (netns B)", self.ours_log()),
                ("Istio's ztunnel (netns A)", self.istio_log()),
            ] {
                eprintln!("==== {what} log (tail) ====\n{}", tail(&log, LOG_TAIL));
            }
        }
    }
}

impl Lab {
    fn new(istio_bin: PathBuf) -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("interop-")
            .tempdir()
            .unwrap();
        let block = Block::lease();
        let ips = Ips::of(&block);
        let a = NetNs::new("iz-a").unwrap();
        let b = NetNs::new("iz-b").unwrap();
        let s = NetNs::new("iz-s").unwrap();
        NetNs::veth_pair(
            &a,
            A_IF,
            Some(&format!("{}/{PREFIX_LEN}", ips.a)),
            &b,
            B_IF,
            Some(&format!("{}/{PREFIX_LEN}", ips.b)),
        )
        .unwrap();
        // The pod's link as the ptp plugin makes it: a /32 on each side (the node's address
        // again on its end, which REDIRECT in PREROUTING needs), a host route on the node
        // side, the node's address as the pod's gateway.
        NetNs::veth_pair(
            &b,
            B_POD_IF,
            Some(&format!("{}/32", ips.b)),
            &s,
            S_IF,
            Some(&format!("{}/32", ips.s)),
        )
        .unwrap();
        let (s32, b_ip) = (format!("{}/32", ips.s), ips.b.to_string());
        b.ip(&["route", "add", &s32, "dev", B_POD_IF]).unwrap();
        s.ip(&["route", "add", &format!("{}/32", ips.b), "dev", S_IF])
            .unwrap();
        s.ip(&["route", "add", "default", "via", &b_ip, "dev", S_IF])
            .unwrap();
        a.ip(&["route", "add", &s32, "via", &b_ip]).unwrap();
        Lab {
            a,
            b,
            s,
            dir,
            istio_bin,
            ips,
            _block: block,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca_dir(&self) -> PathBuf {
        self.path("ca")
    }

    fn root_cert(&self) -> PathBuf {
        self.ca_dir().join("root-cert.pem")
    }

    fn manifest_dir(&self) -> PathBuf {
        self.path("manifests")
    }

    fn credentials(&self) -> PathBuf {
        self.path("credentials.yaml")
    }

    fn issuer_log(&self) -> PathBuf {
        self.path("ambient-issuer.log")
    }

    fn ours_log(&self) -> PathBuf {
        self.path("ztunnel-ours.log")
    }

    fn istio_log(&self) -> PathBuf {
        self.path("ztunnel-istio.log")
    }

    fn issuer(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bins::binary(bins::ISSUER));
        cmd.args(args);
        cmd
    }

    /// The CA (in the issuer's directory only), the manifests, and two credentials: node-b's
    /// for our ztunnel, and one bound to pod default/client for Istio's.
    fn write_config(&self) {
        run(self
            .issuer(&["ca", "init", "--trust-domain", TRUST_DOMAIN, "--dir"])
            .arg(self.ca_dir()))
        .unwrap();
        std::fs::create_dir_all(self.manifest_dir()).unwrap();
        std::fs::write(
            self.manifest_dir().join("cluster.yaml"),
            cluster_manifest(self.ips),
        )
        .unwrap();
        std::fs::write(self.path("istio-local.yaml"), istio_local_xds(self.ips)).unwrap();
        for (token, args) in [
            (
                "node-b.token",
                ["--node", "node-b", "--service-account", NODE_PROXY_SA],
            ),
            (
                "client.token",
                [
                    "--service-account",
                    "default/client",
                    "--pod",
                    "default/client",
                ],
            ),
        ] {
            run(self
                .issuer(&["credential", "add", "--file"])
                .arg(self.credentials())
                .arg("--token-out")
                .arg(self.path(token))
                .args(args))
            .unwrap();
        }
    }

    /// `what` (pid `pid`) until `ready()`, failing early if it exited.
    fn wait_ready(&self, what: &str, pid: u32, ready: impl Fn() -> Result<(), String>) {
        eventually(WAIT, || {
            if !alive(pid) {
                return Ok(Err(()));
            }
            ready().map(Ok)
        })
        .unwrap_or_else(|e| panic!("{what} not ready: {e}"))
        .unwrap_or_else(|()| panic!("{what} exited"));
    }

    fn start_issuer(&self) {
        let (out, err) = log_file(&self.issuer_log());
        let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, ISSUER_GRPC_PORT)).to_string();
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, ISSUER_METRICS_PORT)).to_string();
        let mut cmd = self.a.command(bins::binary(bins::ISSUER));
        cmd.args(["run", "--trust-domain", TRUST_DOMAIN, "--ca-dir"])
            .arg(self.ca_dir())
            .args(["--source", "manifests", "--manifest-dir"])
            .arg(self.manifest_dir())
            .arg("--credentials")
            .arg(self.credentials())
            .args([
                "--serving-ip",
                "127.0.0.1",
                "--serving-ip",
                &self.ips.a.to_string(),
            ])
            .args(["--listen", &listen, "--metrics-listen", &metrics])
            .args(["--node-proxy-service-account", NODE_PROXY_SA])
            .args(["--reload-interval", "200ms"])
            .env("RUST_LOG", log_level())
            .stdout(out)
            .stderr(err);
        let pid = self.a.spawn(&mut cmd).unwrap();
        self.wait_ready("ambient-issuer", pid, || {
            get_ok(&self.a, ISSUER_METRICS_PORT, "/ready").map(drop)
        });
    }

    /// Istio's ztunnel in A, serving default/client, its CA the issuer on 127.0.0.1. The
    /// environment is cleared first, so no `FAKE_CA` (nor anything else) leaks in.
    fn start_istio(&self) {
        let (out, err) = log_file(&self.istio_log());
        let mut cmd = self.a.command(&self.istio_bin);
        cmd.arg("proxy")
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("RUST_LOG", log_level())
            .env("XDS_ADDRESS", "")
            .env("LOCAL_XDS_PATH", self.path("istio-local.yaml"))
            .env(
                "CA_ADDRESS",
                format!("https://127.0.0.1:{ISSUER_GRPC_PORT}"),
            )
            .env("CA_ROOT_CA", self.root_cert())
            .env("AUTH_TOKEN", self.path("client.token"))
            .env("PROXY_MODE", "dedicated")
            .env("PROXY_WORKLOAD_INFO", "default/client/client")
            .env("PACKET_MARK", ZTUNNEL_MARK.to_string())
            .env("ENABLE_ORIG_SRC", "false")
            .env("NODE_NAME", "node-a")
            .env("CLUSTER_DOMAIN", TRUST_DOMAIN)
            .stdout(out)
            .stderr(err);
        let pid = self.a.spawn(&mut cmd).unwrap();
        self.wait_ready("Istio's ztunnel", pid, || {
            get_ok(&self.a, READINESS_PORT, "/healthz/ready").map(drop)
        });
        // Its capture (its README's rule, restricted to the app port): the client pod's own
        // connections off loopback go to 15001, Istio's ztunnel's marked ones do not.
        iptables(
            &self.a,
            &format!(
                "-t nat -A OUTPUT -p tcp ! -o lo --dport {APP_PORT} \
                 -m mark ! --mark {ZTUNNEL_MARK:#x}/{MARK_MASK:#x} \
                 -j REDIRECT --to-ports {OUTBOUND_PORT}"
            ),
        );
    }

    /// Our ztunnel in B: certificates from the issuer with node-b's credential; no CA key.
    fn start_ours(&self) {
        let (out, err) = log_file(&self.ours_log());
        let mut cmd = self.b.command(bins::binary(bins::ZTUNNEL));
        cmd.args([
            "run",
            "--node-name",
            "node-b",
            "--trust-domain",
            TRUST_DOMAIN,
        ])
        .arg("--manifest-dir")
        .arg(self.manifest_dir())
        .args([
            "--ca-address",
            &format!("https://{}:{ISSUER_GRPC_PORT}", self.ips.a),
        ])
        .arg("--ca-root")
        .arg(self.root_cert())
        .arg("--ca-token")
        .arg(self.path("node-b.token"))
        .arg("--agent-socket")
        .arg(self.path("ztunnel.sock"))
        .args(["--transparent", "false", "--drain-timeout", "1s"])
        // Short, so that the idle close is part of the test.
        .args(["--pool-idle-timeout", "2s"])
        .env("RUST_LOG", log_level())
        .stdout(out)
        .stderr(err);
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            !args.iter().any(|a| a == "--ca-dir"),
            "our ztunnel must hold no CA key"
        );
        let pid = self.b.spawn(&mut cmd).unwrap();
        self.wait_ready("our ztunnel", pid, || {
            get_ok(&self.b, READINESS_PORT, "/healthz/ready").map(drop)
        });
        // Node-b's captures, as the node agent's: the server pod's connections to the app
        // port go to our 15001, HBONE addressed to the pod to our 15008.
        for (iface, dst, dport, to) in [
            (B_POD_IF, self.ips.a, APP_PORT, OUTBOUND_PORT),
            (B_IF, self.ips.s, HBONE_PORT, HBONE_PORT),
        ] {
            iptables(
                &self.b,
                &format!(
                    "-t nat -A PREROUTING -i {iface} -p tcp -d {dst} --dport {dport} \
                     -j REDIRECT --to-ports {to}"
                ),
            );
        }
    }

    fn start_echo(&self, ns: &NetNs, name: &str) {
        let ready = self.path(&format!("echo-{name}.ready"));
        let mut cmd = ns.command(bins::binary(bins::NETPROBE));
        cmd.args([
            "listen-echo",
            "--port",
            &APP_PORT.to_string(),
            "--ready-file",
        ])
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        ns.spawn(&mut cmd).unwrap();
        eventually(WAIT, || {
            if ready.exists() {
                Ok(())
            } else {
                Err("echo server not listening")
            }
        })
        .unwrap_or_else(|e| panic!("echo server in {name}: {e}"));
    }

    fn issuer_metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        get_ok(&self.a, ISSUER_METRICS_PORT, "/metrics")
            .map(|t| sum_samples(&t, metric, labels))
            .unwrap_or(0.0)
    }

    fn metric(&self, ns: &NetNs, metric: &str, labels: &[(&str, &str)]) -> f64 {
        get_ok(ns, METRICS_PORT, "/metrics")
            .map(|t| sum_samples(&t, metric, labels))
            .unwrap_or(0.0)
    }

    fn config_dump(&self, ns: &NetNs) -> Value {
        let body = get_ok(ns, ADMIN_PORT, "/config_dump").unwrap();
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/config_dump: {e}: {body}"))
    }

    /// A connection from `ns` to `to`, retried while the proxies settle (Istio's ztunnel in
    /// dedicated mode asks for its certificate on its first connection).
    fn echo_eventually(&self, ns: &NetNs, to: SocketAddr, payload: &str) {
        let got = eventually(WAIT, || echo_from(ns, to, payload))
            .unwrap_or_else(|e| panic!("{payload:?} to {to}: {e}"));
        assert_eq!(got, payload);
    }
}

/// `iptables <rule>` inside `ns` (the rule's words separated by whitespace).
fn iptables(ns: &NetNs, rule: &str) {
    let args: Vec<&str> = rule.split_whitespace().collect();
    ns.exec("iptables", &args)
        .unwrap_or_else(|e| panic!("iptables {rule}: {e}"));
}

/// Every process's `RUST_LOG` (`INTEROP_LOG=debug` to see more on a failure).
fn log_level() -> String {
    std::env::var("INTEROP_LOG").unwrap_or_else(|_| "info".into())
}

/// One root of the issuer's published bundle, as each proxy's dump names it.
struct Root {
    /// Decimal, as Istio's ztunnel shows it.
    serial: String,
    /// SHA-256 of the DER, hex, as ours shows it.
    sha256: String,
}

fn issuer_roots(path: &Path) -> Vec<Root> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    use sha2::{Digest, Sha256};
    let pem = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    CertificateDer::pem_slice_iter(&pem)
        .map(|der| {
            let der = der.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let (_, x) = x509_parser::parse_x509_certificate(&der)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            Root {
                serial: x.tbs_certificate.serial.to_string(),
                sha256: Sha256::digest(&der)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            }
        })
        .collect()
}

#[test]
fn istio_ztunnel_and_ours_talk_hbone_both_ways_with_certificates_from_the_issuer() {
    let Some(istio_bin) = istio_ztunnel() else {
        return;
    };
    let lab = Lab::new(istio_bin);
    lab.write_config();
    lab.start_issuer();
    lab.start_ours();
    lab.start_istio();
    lab.start_echo(&lab.a, "client");
    lab.start_echo(&lab.s, "server");

    // Our ztunnel asked the issuer for the local pod `server`'s certificate on its behalf.
    eventually(WAIT, || {
        let n = lab.issuer_metric(
            "issuer_certificates_issued_total",
            &[("kind", "impersonated")],
        );
        if n >= 1.0 {
            Ok(())
        } else {
            Err("no impersonated certificate issued yet")
        }
    })
    .unwrap_or_else(|e| panic!("our ztunnel's certificate for server: {e}"));

    // 1. Istio's ztunnel → ours: the client pod (A) to the server pod (S).
    let server = SocketAddr::new(IpAddr::V4(lab.ips.s), APP_PORT);
    lab.echo_eventually(&lab.a, server, "istio-to-ours");
    let inbound = [
        ("reporter", "destination"),
        ("source_principal", CLIENT_ID),
        ("destination_principal", SERVER_ID),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        lab.metric(&lab.b, "istio_tcp_connections_opened_total", &inbound) >= 1.0,
        "our ztunnel saw no HBONE connection from Istio's (client's identity)"
    );
    // Istio's `forwarded: for="<ip>:<port>"` names the client pod: our side reports its
    // workload, not `unknown`.
    let named = [
        ("reporter", "destination"),
        ("source_principal", CLIENT_ID),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
    ];
    assert!(
        lab.metric(&lab.b, "istio_tcp_connections_opened_total", &named) >= 1.0,
        "our ztunnel did not read the client's address from Istio's Forwarded header: {}",
        get_ok(&lab.b, METRICS_PORT, "/metrics").unwrap_or_default()
    );
    assert!(
        lab.metric(
            &lab.a,
            "istio_tcp_connections_opened_total",
            &[("reporter", "source"), ("destination_principal", SERVER_ID)],
        ) >= 1.0,
        "Istio's ztunnel opened no connection to server's identity"
    );
    // Istio's ztunnel asked for its own identity, with its pod-bound token.
    assert!(
        lab.issuer_metric("issuer_certificates_issued_total", &[("kind", "own")]) >= 1.0,
        "the issuer signed no certificate for Istio's ztunnel's own identity"
    );

    // 2. Ours → Istio's ztunnel: the server pod (S) to the client pod (A).
    let client = SocketAddr::new(IpAddr::V4(lab.ips.a), APP_PORT);
    lab.echo_eventually(&lab.s, client, "ours-to-istio");
    let outbound = [
        ("reporter", "source"),
        ("source_principal", SERVER_ID),
        ("destination_principal", CLIENT_ID),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(
        lab.metric(&lab.b, "istio_tcp_connections_opened_total", &outbound) >= 1.0,
        "our ztunnel opened no HBONE connection to Istio's as server"
    );
    // Istio's ztunnel saw it arrive over mTLS from server's identity.
    assert!(
        lab.metric(
            &lab.a,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("source_principal", SERVER_ID)],
        ) >= 1.0,
        "Istio's ztunnel saw no connection from server's identity"
    );
    assert!(
        lab.issuer_metric(
            "issuer_certificates_issued_total",
            &[("kind", "impersonated")]
        ) >= 1.0
    );

    // Istio's dashboards and Kiali read the same labels from either proxy: every label
    // Istio's ztunnel puts on its TCP metrics, ours puts too.
    let label_names = |ns: &NetNs, metric: &str| -> BTreeSet<String> {
        let text = get_ok(ns, METRICS_PORT, "/metrics").unwrap();
        text.lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .flat_map(|l| {
                let inner = &l[l.find('{').unwrap() + 1..l.rfind('}').unwrap()];
                inner
                    .split("\",")
                    .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    for metric in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    ] {
        let (theirs, ours) = (label_names(&lab.a, metric), label_names(&lab.b, metric));
        assert!(!theirs.is_empty(), "Istio's ztunnel exports no {metric}");
        let missing: Vec<&String> = theirs.difference(&ours).collect();
        assert!(
            missing.is_empty(),
            "{metric}: labels of Istio's ztunnel that ours lacks: {missing:?}\nIstio's: {theirs:?}\nours: {ours:?}"
        );
    }
    let families = |ns: &NetNs| -> BTreeSet<String> {
        get_ok(ns, METRICS_PORT, "/metrics")
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .filter(|n| n.starts_with("istio_") || n.starts_with("process_"))
            .collect()
    };
    let (theirs, ours) = (families(&lab.a), families(&lab.b));
    let missing: Vec<&String> = theirs.difference(&ours).collect();
    assert!(
        missing.is_empty(),
        "metric families of Istio's ztunnel that ours lacks: {missing:?} (ours: {ours:?})"
    );

    // 3. Neither proxy holds a CA key, and both trust exactly the issuer's root: ours by
    // its flags (checked at start) and its dump; Istio's by its configuration (no fake CA,
    // the issuer as CA) and the roots its certificate came with.
    let roots = issuer_roots(&lab.root_cert());
    let dump = lab.config_dump(&lab.b);
    assert_eq!(dump["ca"]["source"]["mode"], "issuer", "{}", dump["ca"]);
    let bundle: Vec<&str> = dump["ca"]["trust_bundle"]
        .as_array()
        .map(|b| b.iter().filter_map(|r| r["sha256"].as_str()).collect())
        .unwrap_or_default();
    let want: Vec<&str> = roots.iter().map(|r| r.sha256.as_str()).collect();
    assert_eq!(bundle, want, "our ztunnel's trust bundle: {}", dump["ca"]);
    assert!(
        dump["certificates"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["identity"] == SERVER_ID)),
        "our ztunnel holds server's certificate: {}",
        dump["certificates"]
    );
    let istio = lab.config_dump(&lab.a);
    assert_eq!(istio["config"]["fakeCa"], false, "{}", istio["config"]);
    assert_eq!(
        istio["config"]["caAddress"],
        format!("https://127.0.0.1:{ISSUER_GRPC_PORT}"),
    );
    let certs = istio["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let client_cert = certs
        .iter()
        .find(|c| c["identity"] == CLIENT_ID)
        .unwrap_or_else(|| panic!("Istio's ztunnel holds no certificate for client: {certs:?}"));
    let istio_roots: Vec<&str> = client_cert["rootCerts"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|c| c["serialNumber"].as_str())
                .collect()
        })
        .unwrap_or_default();
    let want: Vec<&str> = roots.iter().map(|r| r.serial.as_str()).collect();
    assert_eq!(
        istio_roots, want,
        "Istio's ztunnel's roots are the issuer's: {client_cert}"
    );

    // 4. The three ways an application's connection ends, through our ztunnel's client to
    // Istio's server: a FIN, an RST, and the pooled HBONE connection closing once idle. Ours
    // ends each as Istio's own client does, and Istio's server logs no error for any.
    let seen = istio_error_lines(&lab.istio_log()).len();
    for i in 0..50 {
        echo_from(&lab.s, client, &format!("fin-{i}"))
            .unwrap_or_else(|e| panic!("connection {i} (FIN): {e}"));
        in_ns(&lab.s.path(), || {
            ambient_tests::probe::connect_then_reset(
                client,
                format!("reset-{i}").as_bytes(),
                IO_TIMEOUT,
            )
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("connection {i} (RST): {e}"));
    }
    // Our pool closes its connection to Istio's 15008 once it carried nothing for
    // --pool-idle-timeout.
    let hbone_peer = format!("{}:{HBONE_PORT}", lab.ips.a);
    eventually(Duration::from_secs(15), || {
        let open = lab
            .b
            .exec(
                "ss",
                &["-Htn", "state", "established", "dst", hbone_peer.as_str()],
            )
            .map_err(|e| e.to_string())?;
        match open.trim() {
            "" => Ok(()),
            o => Err(format!("still open: {o}")),
        }
    })
    .expect("our pool closes its idle HBONE connection to Istio's ztunnel");
    // Istio's ztunnel logs each connection as it closes.
    std::thread::sleep(Duration::from_secs(1));
    let new: Vec<String> = istio_error_lines(&lab.istio_log())
        .into_iter()
        .skip(seen)
        .collect();
    assert!(
        new.is_empty(),
        "Istio's ztunnel logged {} errors for 50 FIN, 50 RST and an idle close, e.g. {:?}",
        new.len(),
        new.first()
    );
}

/// The error-level lines of Istio's ztunnel's log (`<time>\terror\t<target>\t...`).
fn istio_error_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("error"))
        .map(str::to_owned)
        .collect()
}

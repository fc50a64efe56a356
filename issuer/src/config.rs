//! The issuer's configuration: flags ([`RunArgs`]) checked into a typed [`Config`] by a pure
//! function that reports every bad field at once.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ambient_common::constants;
use ambient_common::duration::parse_duration;
use clap::{Args, ValueEnum};

use crate::authz::ServiceAccount;

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// Pods from a manifest directory, callers from a credentials file (labs, no Kubernetes).
    Manifests,
    /// Pods from the Kubernetes API, callers by TokenReview.
    Kube,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `ambient-issuer run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Directory with ca-cert.pem, ca-key.pem and root-cert.pem (the published bundle);
    /// re-read when the files change.
    #[arg(long, env = "ISSUER_CA_DIR")]
    pub ca_dir: PathBuf,
    #[arg(long, default_value = constants::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// gRPC (TLS) listen address.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], constants::ISSUER_GRPC_PORT)))]
    pub listen: SocketAddr,
    /// `/metrics` and `/ready` listen address.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], constants::ISSUER_METRICS_PORT)))]
    pub metrics_listen: SocketAddr,
    /// DNS names of the serving certificate (repeatable).
    #[arg(long = "serving-dns", default_values_t = [String::from(constants::ISSUER_SERVICE_DNS)])]
    pub serving_dns: Vec<String>,
    /// IP addresses of the serving certificate (repeatable).
    #[arg(long = "serving-ip")]
    pub serving_ip: Vec<IpAddr>,
    /// Longest (and default) workload certificate lifetime.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub max_cert_ttl: Duration,
    /// A service account allowed to ask on behalf of workloads of its node (repeatable: add
    /// `istio-system/ztunnel` for Istio's ztunnel).
    #[arg(long = "node-proxy-service-account", default_values_t = [String::from(constants::ZTUNNEL_SERVICE_ACCOUNT)])]
    pub node_proxy_service_accounts: Vec<String>,
    /// The audience callers' tokens must carry.
    #[arg(long, default_value = ambient_common::ca_api::TOKEN_AUDIENCE)]
    pub token_audience: String,
    #[arg(long, value_enum, default_value_t = SourceKind::Kube)]
    pub source: SourceKind,
    /// With `--source manifests`: the manifest directory (pods).
    #[arg(long)]
    pub manifest_dir: Option<PathBuf>,
    /// With `--source manifests`: the credentials file (`ambient-issuer credential add`).
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// With `--source kube`: a kubeconfig (default: in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// How long a request waits for a pod the issuer has not seen yet.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub pod_wait: Duration,
    /// How often the CA directory (and the manifest directory) are checked for changes.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Where pods and callers come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Manifests { dir: PathBuf, credentials: PathBuf },
    Kube { kubeconfig: Option<PathBuf> },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub ca_dir: PathBuf,
    pub trust_domain: String,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub serving_dns: Vec<String>,
    pub serving_ip: Vec<IpAddr>,
    pub max_cert_ttl: Duration,
    pub node_proxies: Vec<ServiceAccount>,
    pub token_audience: String,
    pub source: Source,
    pub pod_wait: Duration,
    pub reload_interval: Duration,
}

impl Config {
    pub fn from_args(a: &RunArgs) -> Result<Self, ConfigError> {
        let mut errs = Vec::new();
        let mut node_proxies = Vec::new();
        for s in &a.node_proxy_service_accounts {
            match ServiceAccount::parse(s) {
                Some(sa) => node_proxies.push(sa),
                None => errs.push(format!(
                    "--node-proxy-service-account {s:?}: want namespace/name"
                )),
            }
        }
        let max = Duration::from_secs(constants::MAX_WORKLOAD_CERT_TTL_SECS);
        if a.max_cert_ttl < Duration::from_secs(60) || a.max_cert_ttl > max {
            errs.push(format!(
                "--max-cert-ttl {:?}: must be between 1m and {}h",
                a.max_cert_ttl,
                max.as_secs() / 3600
            ));
        }
        if a.trust_domain.is_empty() || a.trust_domain.contains('/') {
            errs.push(format!(
                "--trust-domain {:?}: not a trust domain",
                a.trust_domain
            ));
        }
        if a.token_audience.is_empty() {
            errs.push("--token-audience: must not be empty".into());
        }
        if a.serving_dns.is_empty() && a.serving_ip.is_empty() {
            errs.push("--serving-dns/--serving-ip: the serving certificate needs a name".into());
        }
        if a.reload_interval < Duration::from_millis(100) {
            errs.push("--reload-interval: at least 100ms".into());
        }
        let source = match a.source {
            SourceKind::Manifests => match (&a.manifest_dir, &a.credentials) {
                (Some(dir), Some(credentials)) => Some(Source::Manifests {
                    dir: dir.clone(),
                    credentials: credentials.clone(),
                }),
                _ => {
                    errs.push("--source manifests needs --manifest-dir and --credentials".into());
                    None
                }
            },
            SourceKind::Kube => {
                if a.manifest_dir.is_some() || a.credentials.is_some() {
                    errs.push("--manifest-dir/--credentials are for --source manifests".into());
                }
                Some(Source::Kube {
                    kubeconfig: a.kubeconfig.clone(),
                })
            }
        };
        match source {
            Some(source) if errs.is_empty() => Ok(Self {
                ca_dir: a.ca_dir.clone(),
                trust_domain: a.trust_domain.clone(),
                listen: a.listen,
                metrics_listen: a.metrics_listen,
                serving_dns: a.serving_dns.clone(),
                serving_ip: a.serving_ip.clone(),
                max_cert_ttl: a.max_cert_ttl,
                node_proxies,
                token_audience: a.token_audience.clone(),
                source,
                pod_wait: a.pod_wait,
                reload_interval: a.reload_interval,
            }),
            _ => Err(ConfigError(errs)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["t", "--ca-dir", "/ca"];
        v.extend_from_slice(args);
        let t = T::try_parse_from(v).map_err(|e| e.to_string())?;
        Config::from_args(&t.a).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_errors() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.port(), constants::ISSUER_GRPC_PORT);
        assert_eq!(c.max_cert_ttl, Duration::from_secs(86400));
        assert_eq!(
            c.node_proxies,
            vec![ServiceAccount::new("ambient-system", "ztunnel")]
        );
        assert_eq!(c.source, Source::Kube { kubeconfig: None });
        let e = parse(&[
            "--source",
            "manifests",
            "--max-cert-ttl",
            "48h",
            "--node-proxy-service-account",
            "x",
        ])
        .unwrap_err();
        assert!(e.contains("--manifest-dir and --credentials"), "{e}");
        assert!(e.contains("--max-cert-ttl"), "{e}");
        assert!(e.contains("--node-proxy-service-account"), "{e}");
        let c = parse(&[
            "--source",
            "manifests",
            "--manifest-dir",
            "/m",
            "--credentials",
            "/c",
        ])
        .unwrap();
        assert!(matches!(c.source, Source::Manifests { .. }));
        assert!(parse(&["--credentials", "/c"])
            .unwrap_err()
            .contains("for --source manifests"));
    }
}

//! `ambient-issuer`: the mesh's certificate issuer, the only process that holds the CA key.
//!
//! It speaks Istio's certificate API (`istio.v1.auth.IstioCertificateService`, gRPC over TLS
//! on port 15012), so this project's ztunnel and Istio's ztunnel both get certificates from
//! it. A node proxy (the ztunnel service account) gets a workload's certificate only while a
//! pod of that workload is scheduled on the proxy's own node; a workload gets only its own.
//!
//! Layout: [`authz`] is the decision (pure, table-tested); [`auth`] turns a bearer token into a
//! caller (TokenReview, or the lab's credentials file); [`pods`] is the issuer's own view of
//! pods; [`ca`] signs; [`server`] wires them to the network.

pub mod auth;
pub mod authz;
pub mod ca;
pub mod config;
pub mod credentials;
pub mod metrics;
pub mod pods;
pub mod server;

use std::sync::Arc;

use anyhow::Context;

use crate::auth::{Authenticator, CredentialsFile, TokenReviewer};
use crate::config::{Config, Source};
use crate::pods::Pods;

/// Runs the issuer until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let pods = Pods::new();
    let (auth, feeder): (Box<dyn Authenticator>, tokio::task::JoinHandle<()>) = match &cfg.source {
        Source::Manifests { dir, credentials } => (
            Box::new(CredentialsFile::new(credentials, &cfg.token_audience)),
            tokio::spawn(
                pods.clone().run_manifests(
                    dir.clone(),
                    cfg.reload_interval
                        .min(std::time::Duration::from_millis(500)),
                ),
            ),
        ),
        Source::Kube { kubeconfig } => {
            let client = ambient_kube_watch::client(kubeconfig.as_deref())
                .await
                .context("connecting to the Kubernetes API")?;
            (
                Box::new(TokenReviewer::new(client.clone(), &cfg.token_audience)),
                tokio::spawn(pods.clone().run_kube(client)),
            )
        }
    };
    let grpc = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let http = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("binding {}", cfg.metrics_listen))?;
    let issuer = server::Issuer::new(cfg, auth, pods).context("loading the CA directory")?;
    let mut registry = prometheus_client::registry::Registry::default();
    issuer.metrics.register(&mut registry);
    let signer = issuer.signer();
    tracing::info!(
        listen = %issuer.cfg.listen,
        signing = %signer.fingerprint,
        roots = signer.roots.len(),
        trust_domain = %signer.trust_domain,
        "issuer serving (this process holds the CA key)"
    );
    let reloader = {
        let issuer = issuer.clone();
        tokio::spawn(async move {
            let mut stamp = ca::dir_stamp(&issuer.cfg.ca_dir);
            loop {
                tokio::time::sleep(issuer.cfg.reload_interval).await;
                issuer.reload_if_changed(&mut stamp);
            }
        })
    };
    let grpc_task = tokio::spawn(server::serve_grpc(grpc, issuer.clone()));
    let http_task = tokio::spawn(server::serve_http(http, issuer.clone(), Arc::new(registry)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
    for t in [feeder, reloader, grpc_task, http_task] {
        t.abort();
    }
    Ok(())
}

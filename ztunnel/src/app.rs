//! Builds ztunnel from a [`Config`] (binding every socket, so tests can use port 0 and learn
//! the real addresses) and runs it: the data plane on one runtime, admin, metrics, discovery
//! and certificate rotation on another; on shutdown, stop accepting and drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};
use tokio::runtime::Handle;

use crate::config::{CaSource, Config, Source};
use crate::hbone::{Pool, TlsDialer};
use crate::identity::{
    CaError, CaFiles, CertificateProvider, FileCa, IssuerClient, SecretManager, REQUEST_TIMEOUT,
};
use crate::metrics::{Direction, Metrics, Tracker};
use crate::proxy::{serve, Proxy, SocketError, SocketFactory};
use crate::store::{self, AgentError, Store};
use ambient_common::http::{json, not_found, serve as serve_http, Reply};

/// How long the certificate pass waits after a change so that a burst of pushes costs one
/// walk of the local workloads.
const CERT_PASS_DEBOUNCE: Duration = Duration::from_millis(200);

/// Backoff of the certificate pass after a failure.
const CERT_RETRY_MIN: Duration = Duration::from_secs(1);
const CERT_RETRY_MAX: Duration = Duration::from_secs(30);

/// How often the node's interface addresses are re-read (they are never a destination a
/// pod may reach through ztunnel).
const NODE_ADDRS_REFRESH: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("setting up the certificate provider failed")]
    Ca(#[source] CaError),
    #[error("binding a listener failed")]
    Listen(#[source] SocketError),
    #[error("dropping privileges (--run-as) failed")]
    Privileges(#[source] crate::sys::PrivilegeError),
    #[error("binding the agent socket failed")]
    Agent(#[source] AgentError),
    #[error("building the runtime failed")]
    Runtime(#[source] std::io::Error),
    #[error("building the Kubernetes client failed")]
    Kube(#[source] store::kube::ClientError),
}

/// Real addresses after binding.
#[derive(Debug, Clone, Serialize)]
pub struct Addresses {
    pub outbound: Vec<SocketAddr>,
    pub inbound: Vec<SocketAddr>,
    pub inbound_plaintext: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

pub struct App {
    cfg: Arc<Config>,
    store: Arc<Store>,
    certs: Arc<SecretManager>,
    tracker: Arc<Tracker>,
    registry: Arc<Registry>,
    outbound: Vec<TcpListener>,
    inbound: Vec<TcpListener>,
    plaintext: Vec<TcpListener>,
    admin: TcpListener,
    metrics: TcpListener,
    readiness: TcpListener,
    agent: UnixListener,
    addrs: Addresses,
    ready: Arc<AtomicBool>,
    /// The client for `Source::Kube` (built in [`run_blocking`], else at the start of run).
    kube: Option<kube::Client>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

fn set_migrate_req() {
    // Connections queued on a closing SO_REUSEPORT listener move to a sibling instead of
    // being reset (Linux >= 5.14), which is what makes a takeover refuse nothing.
    for path in ["/proc/sys/net/ipv4/tcp_migrate_req"] {
        if let Err(e) = std::fs::write(path, "1") {
            tracing::warn!(path, error = %e, "cannot enable tcp_migrate_req; a takeover may reset queued connections");
        }
    }
}

/// The configured certificate provider: the file CA (`--ca-dir`) or the issuer client
/// (`--ca-address`, which connects on its first request).
pub fn provider(cfg: &Config) -> Result<Arc<dyn CertificateProvider>, AppError> {
    Ok(match &cfg.ca {
        CaSource::File { dir } => {
            Arc::new(FileCa::load(&CaFiles::in_dir(dir), &cfg.trust_domain).map_err(AppError::Ca)?)
        }
        CaSource::Issuer(settings) => Arc::new(
            IssuerClient::new(
                settings.clone(),
                &cfg.trust_domain,
                SocketFactory {
                    mark: cfg.mark,
                    connect_timeout: cfg.connect_timeout,
                },
                REQUEST_TIMEOUT,
            )
            .map_err(AppError::Ca)?,
        ),
    })
}

impl App {
    /// Sets up the configured certificate provider and builds.
    pub fn build(cfg: Config, data: &Handle, control: &Handle) -> Result<Self, AppError> {
        let provider = provider(&cfg)?;
        Self::build_with(cfg, provider, data, control)
    }

    /// Builds with any certificate provider.
    pub fn build_with(
        cfg: Config,
        provider: Arc<dyn CertificateProvider>,
        data: &Handle,
        control: &Handle,
    ) -> Result<Self, AppError> {
        Self::build_parts(cfg, provider, None, data, control)
    }

    /// [`App::build_with`], with the agent socket already bound (as root, before
    /// `--run-as`).
    fn build_parts(
        cfg: Config,
        provider: Arc<dyn CertificateProvider>,
        agent_socket: Option<std::os::unix::net::UnixListener>,
        data: &Handle,
        control: &Handle,
    ) -> Result<Self, AppError> {
        tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "effective configuration");
        let store = Store::new(&cfg.node_name, &cfg.trust_domain);
        if cfg.source != Source::None {
            store.enable_cross_check();
        }
        if cfg.remote_capture == crate::config::RemoteCapture::Annotation {
            store.require_capture_report();
        }
        if let Source::Manifests { dir } = &cfg.source {
            match store::load_manifests(dir, &cfg.excluded_namespaces) {
                Ok(m) => store.set_manifest(m),
                Err(e) => {
                    tracing::error!(error = %ambient_common::error::chain(&e), "initial manifest load failed; starting empty")
                }
            }
        }
        let certs = Arc::new(SecretManager::new(provider, cfg.cert_ttl));
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        crate::metrics::register_build(&mut registry);
        registry.register_collector(Box::new(crate::metrics::ProcessCollector));
        store.refusals().register(&mut registry);
        certs.register_metrics(&mut registry);
        let tracker = Tracker::new(metrics, cfg.access_log, &cfg.cluster_id);
        if cfg.tcp_migrate_req {
            set_migrate_req();
        }
        let sockets = SocketFactory {
            mark: cfg.mark,
            connect_timeout: cfg.connect_timeout,
        };
        let bind_all = |addrs: &[SocketAddr]| -> Result<Vec<TcpListener>, AppError> {
            sockets.listen_all(addrs).map_err(AppError::Listen)
        };
        let (outbound, inbound, plaintext) = {
            let _g = data.enter();
            (
                bind_all(&cfg.outbound_addrs)?,
                bind_all(&cfg.inbound_addrs)?,
                bind_all(&cfg.inbound_plaintext_addrs)?,
            )
        };
        let (admin, metrics_l, readiness, agent) = {
            let _g = control.enter();
            (
                sockets.listen(cfg.admin_addr).map_err(AppError::Listen)?,
                sockets
                    .listen_endpoint(cfg.metrics_addr)
                    .map_err(AppError::Listen)?,
                sockets
                    .listen_endpoint(cfg.readiness_addr)
                    .map_err(AppError::Listen)?,
                match agent_socket {
                    Some(l) => l
                        .set_nonblocking(true)
                        .and_then(|()| tokio::net::UnixListener::from_std(l))
                        .map_err(|source| {
                            AppError::Agent(store::AgentError::Bind {
                                path: cfg.agent_socket.clone(),
                                source,
                            })
                        })?,
                    None => store::bind_agent_socket(&cfg.agent_socket).map_err(AppError::Agent)?,
                },
            )
        };
        let addr = |l: &TcpListener| {
            l.local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
        };
        let addrs = Addresses {
            outbound: outbound.iter().map(addr).collect(),
            inbound: inbound.iter().map(addr).collect(),
            inbound_plaintext: plaintext.iter().map(addr).collect(),
            admin: addr(&admin),
            metrics: addr(&metrics_l),
            readiness: addr(&readiness),
        };
        Ok(Self {
            cfg: Arc::new(cfg),
            store,
            certs,
            tracker,
            registry: Arc::new(registry),
            outbound,
            inbound,
            plaintext,
            admin,
            metrics: metrics_l,
            readiness,
            agent,
            addrs,
            ready: Arc::new(AtomicBool::new(false)),
            kube: None,
        })
    }

    /// Uses `client` for `--source=kube` (instead of building one from the configuration).
    pub fn with_kube_client(mut self, client: kube::Client) -> Self {
        self.kube = Some(client);
        self
    }

    pub fn addresses(&self) -> &Addresses {
        &self.addrs
    }

    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Runs until `shutdown` completes, then drains for up to the drain timeout.
    pub async fn run(self, data: Handle, control: Handle, shutdown: impl Future<Output = ()>) {
        let Self {
            cfg,
            store,
            certs,
            tracker,
            registry,
            outbound,
            inbound,
            plaintext,
            admin,
            metrics,
            readiness,
            agent,
            addrs,
            ready,
            kube,
        } = self;
        let sockets = SocketFactory {
            mark: cfg.mark,
            connect_timeout: cfg.connect_timeout,
        };
        let node_addrs = Arc::new(crate::proxy::local::NodeAddrs::default());
        match node_addrs.refresh() {
            Ok(n) => tracing::info!(addresses = n, "node addresses read"),
            Err(e) => tracing::warn!(error = %e, "cannot read the node's addresses yet"),
        }
        let pool = {
            let _g = data.enter();
            let pool = Pool::new(
                cfg.pool.clone(),
                Box::new(TlsDialer {
                    certs: certs.clone(),
                    sockets: sockets.clone(),
                }),
            );
            pool.spawn_reaper();
            pool
        };
        let proxy = Arc::new(Proxy {
            cfg: cfg.clone(),
            store: store.clone(),
            certs: certs.clone(),
            pool: pool.clone(),
            sockets,
            tracker: tracker.clone(),
            hbone_conns: Default::default(),
            node_addrs: node_addrs.clone(),
            handshakes: crate::proxy::limit::HandshakeLimits::new(
                cfg.hbone_handshakes_per_source,
                cfg.hbone_handshakes_total,
            ),
        });
        if let Err(e) = node_addrs.clone().follow_changes() {
            tracing::warn!(error = %e, "no address change notifications; the node's addresses are polled only");
        }
        control.spawn(node_addrs.keep_fresh(NODE_ADDRS_REFRESH));

        // Control plane: certificates follow the local workloads. A pushed pod's certificate
        // is issued by the push itself; this pass drops unused ones and pre-issues for local
        // pods the cluster source knows first. It walks every local workload, so it runs
        // once per burst of changes, not once per push (where it raced the push for the
        // issuing lock and slowed every ADD by the size of the node).
        let mut changes = store.subscribe();
        {
            let (store, certs) = (store.clone(), certs.clone());
            control.spawn(async move {
                // After a failure (the issuer down or refusing) the pass runs again with
                // backoff, not only at the next change.
                let mut backoff = CERT_RETRY_MIN;
                loop {
                    let local = store.local_identities();
                    certs.retain(&local);
                    let missing: Vec<_> = local
                        .into_iter()
                        .filter(|id| certs.get(id).is_none())
                        .collect();
                    let failed = match certs.ensure(&missing).await {
                        Ok(()) => false,
                        Err(e) => {
                            tracing::warn!(error = %ambient_common::error::chain(&e), retry_in = ?backoff, "pre-issuing certificates failed");
                            true
                        }
                    };
                    let retry = async {
                        if failed {
                            tokio::time::sleep(backoff).await
                        } else {
                            std::future::pending().await
                        }
                    };
                    tokio::select! {
                        r = changes.changed() => {
                            if r.is_err() {
                                return;
                            }
                            tokio::time::sleep(CERT_PASS_DEBOUNCE).await;
                            changes.borrow_and_update();
                        }
                        () = retry => {}
                    }
                    backoff = if failed {
                        (backoff * 2).min(CERT_RETRY_MAX)
                    } else {
                        CERT_RETRY_MIN
                    };
                }
            });
        }
        {
            let certs = certs.clone();
            control.spawn(async move {
                loop {
                    tokio::time::sleep(certs.next_check()).await;
                    let n = certs.rotate_due().await;
                    if n > 0 {
                        tracing::info!(rotated = n, "certificates rotated");
                    }
                }
            });
        }
        // The cluster source. Readiness waits for the API's first complete state (the
        // directory was loaded in build).
        let synced = Arc::new(AtomicBool::new(true));
        match cfg.source.clone() {
            Source::None => {}
            Source::Manifests { dir } => {
                control.spawn(store::poll_manifests(
                    dir,
                    cfg.poll_interval,
                    cfg.excluded_namespaces.clone(),
                    store.clone(),
                    || {},
                ));
            }
            Source::Kube { kubeconfig } => {
                synced.store(false, Ordering::Release);
                let (store, synced, excluded) = (
                    store.clone(),
                    synced.clone(),
                    cfg.excluded_namespaces.clone(),
                );
                control.spawn(async move {
                    let client = match kube {
                        Some(c) => c,
                        None => match store::kube::client(kubeconfig.as_deref()).await {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::error!(error = %ambient_common::error::chain(&e), "no Kubernetes client; never ready");
                                return;
                            }
                        },
                    };
                    store::kube::KubeSource::new(client, excluded)
                        .run(store, || {}, synced)
                        .await;
                });
            }
        }
        if cfg.source != Source::None {
            // Pushes are checked against the cluster source, and not trusted for long
            // without it.
            let (store, ttl) = (store.clone(), cfg.agent_unconfirmed_ttl);
            control.spawn(async move {
                let every = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
                loop {
                    tokio::time::sleep(every).await;
                    store.expire_unconfirmed(ttl);
                }
            });
        }
        control.spawn(store::serve_agent(
            agent,
            store.clone(),
            certs.clone(),
            store::AgentPolicy {
                peer_uid: cfg.agent_peer_uid,
                confirm_wait: cfg.agent_confirm_wait,
                cert_timeout: cfg.connect_timeout,
            },
            Arc::new(|| {}),
        ));

        // HTTP endpoints.
        {
            let (store, certs, pool, cfg, tracker, addrs) = (
                store.clone(),
                certs.clone(),
                pool.clone(),
                cfg.clone(),
                tracker.clone(),
                addrs.clone(),
            );
            let route = Arc::new(move |path: &str| -> Reply {
                match path {
                    "/config_dump" => {
                        let st = store.snapshot();
                        json(&serde_json::json!({
                            "node": store.node(),
                            "config": &*cfg,
                            "addresses": &addrs,
                            "workloads": st.workloads().collect::<Vec<_>>(),
                            "services": st.services(),
                            "policies": st.policies(),
                            "ca": {
                                "source": &cfg.ca,
                                "trust_bundle": certs.trust_bundle_info(),
                                "issuer_error": certs.issuer_error(),
                            },
                            "certificates": certs.dump(),
                            "pool": pool.stats(),
                        }))
                    }
                    "/connections" => json(&tracker.live()),
                    _ => not_found(),
                }
            });
            control.spawn(serve_http(admin, "admin", route));
        }
        {
            let registry = registry.clone();
            control.spawn(serve_http(
                metrics,
                "metrics",
                Arc::new(move |path: &str| match path {
                    "/metrics" | "/stats/prometheus" => ambient_common::http::metrics(&registry),
                    _ => not_found(),
                }),
            ));
        }
        {
            let (ready, certs) = (ready.clone(), certs.clone());
            control.spawn(serve_http(
                readiness,
                "readiness",
                Arc::new(move |path: &str| match path {
                    "/healthz/ready" => readiness_reply(
                        ready.load(Ordering::Acquire) && synced.load(Ordering::Acquire),
                        certs.issuer_error(),
                    ),
                    _ => not_found(),
                }),
            ));
        }

        // Data plane.
        let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
        let mut accepting = Vec::new();
        for (ls, kind) in [
            (outbound, Direction::Outbound),
            (inbound, Direction::Inbound),
            (plaintext, Direction::InboundPlaintext),
        ] {
            for l in ls {
                accepting.push(data.spawn(serve(l, kind, proxy.clone(), drain_rx.clone())));
            }
        }
        ready.store(true, Ordering::Release);
        tracing::info!(addresses = ?addrs, "ztunnel ready");

        shutdown.await;
        tracing::info!(live = tracker.live_count(), deadline = ?cfg.drain_timeout, "draining");
        ready.store(false, Ordering::Release);
        let _ = drain_tx.send(true);
        for a in accepting {
            let _ = a.await;
        }
        let deadline = Instant::now() + cfg.drain_timeout;
        let busy = || tracker.live_count() > 0 || proxy.hbone_conns.load(Ordering::Acquire) > 0;
        while busy() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(left = tracker.live_count(), "drain finished");
        drop(drain_tx);
    }
}

/// `/healthz/ready`: 200 once serving (and synced), 503 before, and 503 naming the issuer's
/// error while the latest certificate request failed (a ztunnel that has not asked yet is
/// ready).
fn readiness_reply(serving: bool, issuer_error: Option<String>) -> Reply {
    match (serving, issuer_error) {
        (true, None) => (StatusCode::OK, "text/plain", "ready\n".into()),
        (true, Some(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: certificate issuer: {e}\n"),
        ),
        (false, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
    }
}

/// Runs ztunnel with its two runtimes until SIGTERM or SIGINT. With `--run-as`, the steps
/// that need root come first, then the process (still single-threaded) becomes that uid with
/// CAP_NET_ADMIN alone, and only then are the runtimes and the TCP listeners created.
pub fn run_blocking(mut cfg: Config) -> Result<(), AppError> {
    let ca = provider(&cfg)?;
    let mut agent_socket = None;
    if let Some((uid, gid)) = cfg.run_as {
        if cfg.tcp_migrate_req {
            set_migrate_req();
            cfg.tcp_migrate_req = false;
        }
        agent_socket =
            Some(store::bind_agent_socket_std(&cfg.agent_socket).map_err(AppError::Agent)?);
        crate::sys::drop_privileges(uid, gid, &[crate::sys::CAP_NET_ADMIN])
            .map_err(AppError::Privileges)?;
        tracing::info!(uid, gid, "running as uid {uid} with CAP_NET_ADMIN only");
    }
    let data = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.workers)
        .thread_name("ztunnel-data")
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ztunnel-control")
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    let kube = match &cfg.source {
        Source::Kube { kubeconfig } => Some(
            control
                .block_on(store::kube::client(kubeconfig.as_deref()))
                .map_err(AppError::Kube)?,
        ),
        _ => None,
    };
    let mut app = App::build_parts(cfg, ca, agent_socket, data.handle(), control.handle())?;
    if let Some(c) = kube {
        app = app.with_kube_client(c);
    }
    let (dh, ch) = (data.handle().clone(), control.handle().clone());
    control.block_on(async move {
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM"),
                        _ = int.recv() => tracing::info!("SIGINT"),
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        app.run(dh, ch, shutdown).await;
    });
    data.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_the_issuer_error() {
        assert_eq!(readiness_reply(true, None).0, StatusCode::OK);
        assert_eq!(
            readiness_reply(false, None).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let (status, _, body) = readiness_reply(true, Some("the issuer refused: denied".into()));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("certificate issuer: the issuer refused: denied"),
            "{body}"
        );
    }
}

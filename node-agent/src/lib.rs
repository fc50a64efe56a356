//! The node agent: decides which pods on this node are ambient and programs their
//! redirection to ztunnel.
//!
//! Layout: [`config`] (typed configuration), [`source`] (pods and namespaces, behind one
//! trait), [`agent`] (the core: the single writer of kernel state), [`nft`] (the ruleset,
//! libnftables and the element fast path), [`server`] (the plugin's and the CLI's unix
//! sockets), [`ztunnel`] (the push of local workloads), [`routing`] (policy routing for
//! ztunnel's transparent sockets), [`state`] (what survives a restart), [`cli`] (the
//! `pods`/`rules`/`status` views), [`sched`] (the drift observer's low priority).
#![deny(unsafe_code)]

pub mod adopt;
pub mod agent;
pub mod backend;
pub mod bypass;
pub mod cli;
pub mod config;
pub mod host;
mod http;
pub mod ipt;
pub mod kube_source;
pub mod metrics;
pub mod nfnl;
pub mod nft;
pub mod routing;
pub mod sched;
pub mod server;
pub mod source;
pub mod state;
#[cfg(test)]
mod testutil;
pub mod ztunnel;

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};

use crate::agent::{Command, Core};
use crate::config::{Config, SourceKind};
use crate::source::{ManifestDirSource, Snapshot, Source};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create run directory {0}")]
    RunDir(std::path::PathBuf, #[source] std::io::Error),
    #[error("reading the manifest directory: {0}")]
    Source(#[from] source::SourceError),
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube_source::KubeSourceError),
    #[error(transparent)]
    Dataplane(#[from] nft::DataplaneError),
    #[error("starting the agent core: {0}")]
    Core(ambient_common::agent_api::AgentError),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error("cannot bind metrics address {0}")]
    Metrics(std::net::SocketAddr, #[source] std::io::Error),
    #[error(transparent)]
    Routing(#[from] routing::RoutingError),
}

impl Config {
    pub fn policy_routing(&self) -> routing::PolicyRouting {
        routing::PolicyRouting {
            mark: self.mark,
            mask: self.mask,
            table: self.route_table,
            priority: self.route_rule_priority,
        }
    }
}

/// Makes sure bridged pods' packets reach the IP hooks (`br_netfilter`,
/// `bridge-nf-call-iptables`); returns a note for status.
fn ensure_bridge_netfilter() {
    for fam in ["iptables", "ip6tables"] {
        let name = format!("net/bridge/bridge-nf-call-{fam}");
        if host::sysctl(&name).as_deref() == Some("0") {
            match std::fs::write(std::path::Path::new("/proc/sys").join(&name), "1") {
                Ok(()) => tracing::info!(sysctl = %name, "enabled so bridged pods can be captured"),
                Err(e) => {
                    tracing::error!(sysctl = %name, error = %e, "bridged pods cannot be captured")
                }
            }
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT. Rules stay installed on exit (fail closed).
pub async fn run(cfg: Config) -> Result<(), RunError> {
    let started = Instant::now();
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(&cfg.run_dir).map_err(|e| RunError::RunDir(cfg.run_dir.clone(), e))?;
    tracing::info!(config = ?cfg, "starting node agent");

    ensure_bridge_netfilter();
    if cfg.policy_routing {
        routing::install(&cfg.policy_routing())?;
    }

    let (wl_tx, wl_rx) = ztunnel::WorkloadFeed::new();
    // Load the source once before reconciling, so a restart never releases pods it has
    // simply not read yet.
    // The API source starts unsynced: the core keeps what it had until both lists complete.
    let (mut first, source): (Snapshot, Box<dyn Source>) = match cfg.source {
        SourceKind::Manifests => {
            let source = ManifestDirSource {
                dir: cfg.manifest_dir.clone(),
                node_name: cfg.node_name.clone(),
                poll: cfg.source_poll,
            };
            (source.load()?, Box::new(source))
        }
        SourceKind::Kube => {
            let client = kube_source::client(cfg.kubeconfig.as_deref()).await?;
            let mut source = kube_source::KubeSource::new(client, cfg.node_name.clone());
            source.annotate = cfg.annotate_pods.then(|| wl_tx.captured());
            (Snapshot::default(), Box::new(source))
        }
    };
    first.generation = 1;
    let (snap_tx, snap_rx) = watch::channel(Arc::new(first));

    let mut registry = Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);

    let backend = backend::choose(cfg.backend, cfg.bridge_l2, &cfg.ruleset())?;
    tracing::info!(backend = ?backend, setting = ?cfg.backend, "redirection backend");
    metrics.backend_info(backend.name());
    let dp = backend::open(backend, cfg.ruleset())?;
    let t0 = Instant::now();
    let core = Core::start(
        cfg.clone(),
        dp,
        host::Sysfs::default(),
        snap_rx.borrow().clone(),
        metrics.clone(),
        wl_tx,
    )
    .map_err(RunError::Core)?;
    tracing::info!(elapsed = ?t0.elapsed(), "cold-start reconcile done");
    // Only now that this backend captures every enrolled pod: what another left goes.
    for removed in backend::remove_others(backend, &cfg.ruleset()) {
        tracing::info!(backend = %removed, "removed the rules of the previous backend");
    }

    let generation = core.kernel_generation();
    let (core_tx, core_rx) = mpsc::channel::<Command>(1024);
    let core_thread = std::thread::Builder::new()
        .name("agent-core".into())
        .spawn(move || core.run(core_rx))
        .expect("spawn core thread");

    // Source -> core.
    let source_task = source.run(snap_tx);
    {
        let mut rx = snap_rx.clone();
        let tx = core_tx.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let snap = rx.borrow_and_update().clone();
                if tx.send(Command::Snapshot(snap)).await.is_err() {
                    return;
                }
            }
        });
    }
    // Periodic drift check: the kernel is listed on a thread of its own (its own libnftables
    // context, in this same namespace), so that the listing never holds up an ADD.
    match backend::open(backend, cfg.ruleset()) {
        Ok(observer) => {
            let tx = core_tx.clone();
            let every = cfg.reconcile_interval;
            std::thread::Builder::new()
                .name("agent-drift".into())
                .spawn(move || drift_observer(observer, generation, every, tx))
                .expect("spawn drift observer thread");
        }
        Err(e) => {
            tracing::warn!(error = %e, "no drift observer; the core lists the kernel itself");
            let tx = core_tx.clone();
            let every = cfg.reconcile_interval;
            tokio::spawn(async move {
                let mut t = tokio::time::interval(every);
                t.tick().await;
                loop {
                    t.tick().await;
                    if tx.send(Command::Tick(None)).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    let (zt_tx, zt_rx) = watch::channel(ztunnel::ZtunnelStatus::default());
    tokio::spawn(ztunnel::run_client(
        cfg.ztunnel_socket.clone(),
        wl_rx,
        zt_tx,
        metrics.clone(),
    ));

    let shared = server::Shared {
        cfg: cfg.clone(),
        core: core_tx.clone(),
        snapshots: snap_rx.clone(),
        ztunnel: zt_rx,
        metrics,
    };
    let cni = server::bind(&cfg.cni_socket)?;
    let admin = server::bind(&cfg.admin_socket)?;
    tokio::spawn(server::serve_cni(cni, shared.clone()));
    tokio::spawn(server::serve_admin(admin, shared, started));
    let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|e| RunError::Metrics(cfg.metrics_addr, e))?;
    tokio::spawn(http::serve(metrics_listener, Arc::new(registry), snap_rx));
    tracing::info!(socket = %cfg.cni_socket.display(), "node agent ready");

    wait_for_signal().await;
    tracing::info!("shutting down; redirection rules stay in place");
    source_task.abort();
    let _ = std::fs::remove_file(&cfg.cni_socket);
    let _ = std::fs::remove_file(&cfg.admin_socket);
    drop(core_tx);
    // The core exits once the remaining senders (spawned tasks) are dropped with the runtime.
    drop(core_thread);
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Lists the kernel every `every` and hands the reading to the core; ends with the core.
fn drift_observer(
    mut dp: Box<dyn nft::Dataplane>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    every: std::time::Duration,
    core: mpsc::Sender<Command>,
) {
    if let Err(e) = sched::lower_current_thread_priority() {
        tracing::warn!(error = %e, "drift observer keeps normal priority");
    }
    loop {
        std::thread::sleep(every);
        let reading = agent::Reading {
            generation: generation.load(std::sync::atomic::Ordering::Acquire),
            observed: dp.observe().map_err(|e| e.to_string()),
            links: host::Sysfs::default().links().ok(),
        };
        if core.blocking_send(Command::Tick(Some(reading))).is_err() {
            return;
        }
    }
}

//! The agent's unix sockets: the plugin's (one [`AgentRequest`] per connection) and the
//! admin one used by the CLI. Requests are served concurrently; only the core changes state.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_common::agent_api::{
    AgentError, AgentOp, AgentReply, AgentRequest, ErrorKind, AGENT_API_VERSION,
};
use ambient_common::frame;
use ambient_common::serve::{accept, AcceptBackoff};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::agent::{Command, Report};
use crate::config::Config;
use crate::metrics::{Metrics, OpLabels};
use crate::source::Snapshot;
use crate::ztunnel::ZtunnelStatus;

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests served at once; more wait for a slot.
const MAX_CONCURRENT: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {path}: is another node-agent running?")]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds a unix socket, replacing a stale file, mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.to_owned(),
        source,
    })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(l)
}

#[derive(Clone)]
pub struct Shared {
    pub cfg: Arc<Config>,
    pub core: mpsc::Sender<Command>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub ztunnel: watch::Receiver<ZtunnelStatus>,
    pub metrics: Metrics,
}

async fn read_request<T: serde::de::DeserializeOwned>(
    stream: &mut UnixStream,
) -> Result<T, String> {
    match tokio::time::timeout(READ_TIMEOUT, frame::read_frame_async(stream)).await {
        Err(_) => Err("request not received in time".to_string()),
        Ok(Ok(Some(req))) => Ok(req),
        Ok(Ok(None)) => Err("connection closed before a request".to_string()),
        Ok(Err(e)) => Err(format!(
            "reading request: {}",
            ambient_common::error::chain(&e)
        )),
    }
}

async fn write_reply<T: Serialize>(stream: &mut UnixStream, reply: &T) {
    if frame::write_frame_async(stream, reply).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

/// Serves the plugin's socket until the listener fails.
pub async fn serve_cni(listener: UnixListener, shared: Shared) {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    let mut backoff = AcceptBackoff::default();
    loop {
        let (mut stream, _) = accept(&listener, &mut backoff, "cni").await;
        if let Err(refusal) = peer_allowed(&stream, shared.cfg.cni_peer_uid) {
            tracing::warn!(%refusal, "CNI socket caller refused");
            shared.metrics.fail("peer_refused");
            let reply = AgentReply::Error(AgentError::new(ErrorKind::InvalidRequest, refusal));
            // Read (and ignore) the request first, so the caller's write completes and it
            // reads the refusal instead of a broken pipe.
            tokio::spawn(async move {
                let _ = read_request::<serde_json::Value>(&mut stream).await;
                write_reply(&mut stream, &reply).await
            });
            continue;
        }
        let shared = shared.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            let Ok(_permit) = slots.acquire_owned().await else {
                return;
            };
            let reply = match read_request::<AgentRequest>(&mut stream).await {
                Ok(req) => handle(&shared, req).await,
                Err(msg) => AgentReply::Error(AgentError::new(ErrorKind::InvalidRequest, msg)),
            };
            write_reply(&mut stream, &reply).await;
        });
    }
}

/// Only the container runtime (uid `allowed`, root by default) may enrol, release or
/// garbage-collect pods: the caller is read from the socket (SO_PEERCRED), not believed.
fn peer_allowed(stream: &UnixStream, allowed: u32) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the caller's credentials: {e}"))?;
    ambient_common::frame::peer_uid_allowed(
        cred.uid(),
        cred.pid(),
        allowed,
        "use the CNI socket",
        "the container runtime, --cni-peer-uid",
    )
}

fn op_name(op: &AgentOp) -> &'static str {
    match op {
        AgentOp::Add(_) => "add",
        AgentOp::Del(_) => "del",
        AgentOp::Check(_) => "check",
        AgentOp::Status => "status",
        AgentOp::Gc { .. } => "gc",
    }
}

async fn call<T>(
    core: &mpsc::Sender<Command>,
    make: impl FnOnce(oneshot::Sender<Result<T, AgentError>>) -> Command,
) -> Result<T, AgentError> {
    let (tx, rx) = oneshot::channel();
    let gone = || AgentError::new(ErrorKind::NotReady, "node agent is shutting down");
    core.send(make(tx)).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())?
}

/// Handles one plugin request.
pub async fn handle(shared: &Shared, req: AgentRequest) -> AgentReply {
    if req.version != AGENT_API_VERSION {
        return AgentReply::Error(AgentError::new(
            ErrorKind::IncompatibleVersion,
            format!(
                "plugin speaks agent API v{}, this node agent v{AGENT_API_VERSION}: upgrade the plugin binary",
                req.version
            ),
        ));
    }
    shared
        .metrics
        .requests
        .get_or_create(&OpLabels {
            op: op_name(&req.op).into(),
        })
        .inc();
    let result = match req.op {
        AgentOp::Add(att) => {
            let started = Instant::now();
            let pod = format!("{}/{}", att.pod.namespace, att.pod.name);
            let r = add(shared, att).await;
            // The one line per ADD at the default level: what the runtime waited for.
            match &r {
                Ok(AgentReply::Added(outcome)) => tracing::info!(
                    pod, outcome = ?outcome, elapsed_us = started.elapsed().as_micros() as u64,
                    "ADD replied"
                ),
                Ok(_) => {}
                Err(e) => tracing::info!(
                    pod, kind = ?e.kind, error = %e.message, elapsed_us = started.elapsed().as_micros() as u64,
                    "ADD refused"
                ),
            }
            shared
                .metrics
                .add_duration
                .observe(started.elapsed().as_secs_f64());
            r
        }
        AgentOp::Del(r) => call(&shared.core, |reply| Command::Del { key: r.key, reply })
            .await
            .map(|()| AgentReply::Released),
        AgentOp::Check(att) => call(&shared.core, |reply| Command::Check { att, reply })
            .await
            .map(|()| AgentReply::Checked),
        AgentOp::Status => {
            if shared.snapshots.borrow().synced {
                Ok(AgentReply::Ready)
            } else {
                Err(AgentError::new(
                    ErrorKind::NotReady,
                    "node agent has not synced its pod source yet",
                ))
            }
        }
        AgentOp::Gc { valid } => call(&shared.core, |reply| Command::Gc {
            valid: valid.into_iter().map(|r| r.key).collect(),
            reply,
        })
        .await
        .map(|released| AgentReply::Collected { released }),
    };
    result.unwrap_or_else(|e| {
        shared.metrics.fail(match e.kind {
            ErrorKind::TryAgainLater => "pod_unknown",
            ErrorKind::InvalidRequest => "invalid_request",
            _ => "internal",
        });
        AgentReply::Error(e)
    })
}

/// Waits (bounded) until the source knows the pod and can decide, then hands it to the core;
/// then waits (bounded) for ztunnel to hold the pod's certificate.
async fn add(
    shared: &Shared,
    att: ambient_common::agent_api::Attachment,
) -> Result<AgentReply, AgentError> {
    let snapshot = wait_for_pod(shared, &att).await?;
    let (outcome, workload) = call(&shared.core, |reply| Command::Add {
        att,
        snapshot,
        reply,
    })
    .await?;
    if let Some(w) = workload {
        wait_for_ztunnel(shared, &w.uid).await;
    }
    Ok(AgentReply::Added(outcome))
}

/// Waits until the source can place the pod; returns the view in which it could.
async fn wait_for_pod(
    shared: &Shared,
    att: &ambient_common::agent_api::Attachment,
) -> Result<Arc<Snapshot>, AgentError> {
    let mut rx = shared.snapshots.clone();
    let deadline = tokio::time::Instant::now() + shared.cfg.pod_wait;
    loop {
        {
            let snap = rx.borrow_and_update();
            if snap
                .decide(&att.pod, &shared.cfg.excluded_namespaces)
                .is_some()
            {
                return Ok(Arc::clone(&snap));
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            return Err(AgentError::new(
                ErrorKind::TryAgainLater,
                format!(
                    "pod {}/{} (or its namespace) is not known to the node agent's source after {:?}; try again later",
                    att.pod.namespace, att.pod.name, shared.cfg.pod_wait
                ),
            ));
        }
    }
}

async fn wait_for_ztunnel(shared: &Shared, uid: &str) {
    let mut rx = shared.ztunnel.clone();
    let deadline = tokio::time::Instant::now() + shared.cfg.ztunnel_ack_timeout;
    loop {
        {
            let st = rx.borrow_and_update();
            if !st.connected || st.acked.contains(uid) {
                return;
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            tracing::warn!(uid, "ztunnel did not acknowledge the workload in time");
            return;
        }
    }
}

/// Requests of the admin socket (CLI <-> agent; both sides are this crate).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRequest {
    Report,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AdminReply {
    pub report: serde_json::Value,
    pub ztunnel_connected: bool,
    pub cni_socket: String,
    pub uptime_seconds: u64,
}

pub async fn serve_admin(listener: UnixListener, shared: Shared, started: Instant) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let (mut stream, _) = accept(&listener, &mut backoff, "admin").await;
        let shared = shared.clone();
        tokio::spawn(async move {
            if read_request::<AdminRequest>(&mut stream).await.is_err() {
                return;
            }
            let (tx, rx) = oneshot::channel::<Report>();
            if shared
                .core
                .send(Command::Report { reply: tx })
                .await
                .is_err()
            {
                return;
            }
            let Ok(report) = rx.await else { return };
            let reply = AdminReply {
                report: serde_json::to_value(report).unwrap_or_default(),
                ztunnel_connected: shared.ztunnel.borrow().connected,
                cni_socket: shared.cfg.cni_socket.display().to_string(),
                uptime_seconds: started.elapsed().as_secs(),
            };
            write_reply(&mut stream, &reply).await;
        });
    }
}

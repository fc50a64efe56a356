//! The agent's side of the agent -> ztunnel contract (see `ambient_common::ztunnel_api`):
//! keeps one connection, sends a snapshot on every connect and then the difference each time
//! the set of enrolled workloads changes. Publishes which workloads ztunnel acknowledged, so
//! an ADD can return once the pod's certificate is held.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use ambient_common::frame;
use ambient_common::ztunnel_api::{LocalWorkload, ZtunnelOp, ZtunnelReply, ZtunnelRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;

use crate::metrics::Metrics;

const RETRY: Duration = Duration::from_millis(250);
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZtunnelStatus {
    pub connected: bool,
    /// Uids of workloads ztunnel acknowledged on the current connection.
    pub acked: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("ztunnel socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("ztunnel frame: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("ztunnel did not answer in time")]
    Timeout,
    #[error("ztunnel refused: {0}")]
    Refused(String),
}

async fn exchange(stream: &mut UnixStream, op: ZtunnelOp) -> Result<(), LinkError> {
    let bytes = frame::encode(&ZtunnelRequest::new(op))?;
    stream.write_all(&bytes).await?;
    let read = async {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).await?;
        let mut body = vec![0u8; frame::body_len(header)?];
        stream.read_exact(&mut body).await?;
        Ok::<_, LinkError>(frame::decode::<ZtunnelReply>(&body)?)
    };
    match tokio::time::timeout(REPLY_TIMEOUT, read).await {
        Err(_) => Err(LinkError::Timeout),
        Ok(Err(e)) => Err(e),
        Ok(Ok(ZtunnelReply::Ack)) => Ok(()),
        Ok(Ok(ZtunnelReply::Error { message })) => Err(LinkError::Refused(message)),
    }
}

/// Runs forever (until the workloads sender is dropped).
pub async fn run_client(
    path: PathBuf,
    mut workloads: watch::Receiver<Vec<LocalWorkload>>,
    status: watch::Sender<ZtunnelStatus>,
    metrics: Metrics,
) {
    let mut logged_down = false;
    loop {
        let mut stream = match UnixStream::connect(&path).await {
            Ok(s) => s,
            Err(e) => {
                if !logged_down {
                    tracing::warn!(socket = %path.display(), error = %e, "ztunnel not reachable; pods are enrolled and wait for it");
                    logged_down = true;
                }
                if workloads.has_changed().is_err() {
                    return;
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        logged_down = false;
        let res = session(&mut stream, &mut workloads, &status, &metrics).await;
        metrics.ztunnel_connected.set(0);
        status.send_replace(ZtunnelStatus::default());
        match res {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "ztunnel connection lost");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

async fn session(
    stream: &mut UnixStream,
    workloads: &mut watch::Receiver<Vec<LocalWorkload>>,
    status: &watch::Sender<ZtunnelStatus>,
    metrics: &Metrics,
) -> Result<(), LinkError> {
    let current = workloads.borrow_and_update().clone();
    exchange(stream, ZtunnelOp::Snapshot(current.clone())).await?;
    let mut sent: BTreeMap<String, LocalWorkload> =
        current.into_iter().map(|w| (w.uid.clone(), w)).collect();
    metrics.ztunnel_connected.set(1);
    status.send_replace(ZtunnelStatus {
        connected: true,
        acked: sent.keys().cloned().collect(),
    });
    tracing::info!(workloads = sent.len(), "connected to ztunnel");
    loop {
        if workloads.changed().await.is_err() {
            return Ok(());
        }
        let want: BTreeMap<String, LocalWorkload> = workloads
            .borrow_and_update()
            .iter()
            .map(|w| (w.uid.clone(), w.clone()))
            .collect();
        for uid in sent
            .keys()
            .filter(|u| !want.contains_key(*u))
            .cloned()
            .collect::<Vec<_>>()
        {
            exchange(stream, ZtunnelOp::Remove { uid: uid.clone() }).await?;
            sent.remove(&uid);
            status.send_modify(|s| {
                s.acked.remove(&uid);
            });
        }
        for (uid, w) in &want {
            if sent.get(uid) != Some(w) {
                exchange(stream, ZtunnelOp::Add(w.clone())).await?;
                sent.insert(uid.clone(), w.clone());
                status.send_modify(|s| {
                    s.acked.insert(uid.clone());
                });
            }
        }
    }
}

//! The agent's side of the agent -> ztunnel contract (see `ambient_common::ztunnel_api`):
//! keeps one connection, sends a snapshot on every connect and then each change of the set
//! of enrolled workloads as the core reports it. Publishes which workloads ztunnel acknowledged, so
//! an ADD can return once the pod's certificate is held.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambient_common::frame;
use ambient_common::ztunnel_api::{LocalWorkload, ZtunnelOp, ZtunnelReply, ZtunnelRequest};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

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
    #[error("ztunnel closed the connection")]
    Closed,
    #[error("ztunnel refused: {0}")]
    Refused(String),
}

async fn exchange(stream: &mut UnixStream, op: ZtunnelOp) -> Result<(), LinkError> {
    frame::write_frame_async(stream, &ZtunnelRequest::new(op)).await?;
    let read = frame::read_frame_async::<ZtunnelReply>(stream);
    match tokio::time::timeout(REPLY_TIMEOUT, read).await {
        Err(_) => Err(LinkError::Timeout),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(None)) => Err(LinkError::Closed),
        Ok(Ok(Some(ZtunnelReply::Ack))) => Ok(()),
        Ok(Ok(Some(ZtunnelReply::Error { message }))) => Err(LinkError::Refused(message)),
    }
}

/// A change of the set of enrolled workloads, from the core to the client. The core sends
/// only what changed, so enrolling a pod costs the same at 1 or 1,000 enrolled pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadChange {
    Upsert(LocalWorkload),
    Remove(String),
}

/// The uids of the pods whose redirection is installed on this node (the workloads the core
/// publishes): what the agent reports on each pod (annotation), so that other nodes send
/// HBONE only to pods that are really captured.
pub type Captured = watch::Receiver<HashSet<String>>;

/// The core's end of the feed. Unbounded: the core never waits for ztunnel, and the client
/// drains the feed whether or not ztunnel is connected.
#[derive(Debug, Clone)]
pub struct WorkloadFeed {
    changes: mpsc::UnboundedSender<WorkloadChange>,
    captured: Arc<watch::Sender<HashSet<String>>>,
}

impl WorkloadFeed {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<WorkloadChange>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let feed = Self {
            changes: tx,
            captured: Arc::new(watch::channel(HashSet::new()).0),
        };
        (feed, rx)
    }

    pub fn send(&self, change: WorkloadChange) {
        self.captured.send_if_modified(|set| match &change {
            WorkloadChange::Upsert(w) => set.insert(w.uid.clone()),
            WorkloadChange::Remove(uid) => set.remove(uid),
        });
        // The client is gone only when the agent is shutting down.
        let _ = self.changes.send(change);
    }

    /// Follows the set of captured pods (by uid).
    pub fn captured(&self) -> Captured {
        self.captured.subscribe()
    }
}

/// Applies a change to the wanted set; returns the uid it touched.
fn apply(want: &mut BTreeMap<String, LocalWorkload>, change: WorkloadChange) -> String {
    match change {
        WorkloadChange::Upsert(w) => {
            let uid = w.uid.clone();
            want.insert(uid.clone(), w);
            uid
        }
        WorkloadChange::Remove(uid) => {
            want.remove(&uid);
            uid
        }
    }
}

/// Takes every change already queued; `false` once the core is gone and the feed empty.
fn drain(
    changes: &mut mpsc::UnboundedReceiver<WorkloadChange>,
    want: &mut BTreeMap<String, LocalWorkload>,
    dirty: &mut BTreeSet<String>,
) -> bool {
    loop {
        match changes.try_recv() {
            Ok(c) => {
                dirty.insert(apply(want, c));
            }
            Err(mpsc::error::TryRecvError::Empty) => return true,
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
}

/// Runs until the core drops its end of the feed.
pub async fn run_client(
    path: PathBuf,
    mut changes: mpsc::UnboundedReceiver<WorkloadChange>,
    status: watch::Sender<ZtunnelStatus>,
    metrics: Metrics,
) {
    let mut want: BTreeMap<String, LocalWorkload> = BTreeMap::new();
    let mut logged_down = false;
    loop {
        if !drain(&mut changes, &mut want, &mut BTreeSet::new()) {
            return;
        }
        let mut stream = match UnixStream::connect(&path).await {
            Ok(s) => s,
            Err(e) => {
                if !logged_down {
                    tracing::warn!(socket = %path.display(), error = %e, "ztunnel not reachable; pods are enrolled and wait for it");
                    logged_down = true;
                }
                // Keep taking changes while waiting to retry.
                let retry_at = tokio::time::Instant::now() + RETRY;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(retry_at) => break,
                        change = changes.recv() => match change {
                            Some(c) => { apply(&mut want, c); }
                            None => return,
                        },
                    }
                }
                continue;
            }
        };
        logged_down = false;
        let res = session(&mut stream, &mut changes, &mut want, &status, &metrics).await;
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

/// One connection: the whole set, then each change as it comes.
async fn session(
    stream: &mut UnixStream,
    changes: &mut mpsc::UnboundedReceiver<WorkloadChange>,
    want: &mut BTreeMap<String, LocalWorkload>,
    status: &watch::Sender<ZtunnelStatus>,
    metrics: &Metrics,
) -> Result<(), LinkError> {
    exchange(
        stream,
        ZtunnelOp::Snapshot(want.values().cloned().collect()),
    )
    .await?;
    let mut sent = want.clone();
    metrics.ztunnel_connected.set(1);
    status.send_replace(ZtunnelStatus {
        connected: true,
        acked: sent.keys().cloned().collect(),
    });
    tracing::info!(workloads = sent.len(), "connected to ztunnel");
    loop {
        // ztunnel only ever answers, so anything readable while idle is its close (a new
        // ztunnel taking over, or a crash): reconnect at once rather than at the next change.
        let mut probe = [0u8; 1];
        let mut dirty = BTreeSet::new();
        tokio::select! {
            change = changes.recv() => match change {
                Some(c) => { dirty.insert(apply(want, c)); }
                None => return Ok(()),
            },
            read = stream.read(&mut probe) => {
                return Err(match read {
                    Ok(0) => LinkError::Io(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) => LinkError::Refused("unsolicited bytes from ztunnel".into()),
                    Err(e) => LinkError::Io(e),
                });
            }
        }
        // Everything queued meanwhile goes in the same round.
        let open = drain(changes, want, &mut dirty);
        for uid in dirty {
            match (want.get(&uid), sent.get(&uid)) {
                (None, Some(_)) => {
                    exchange(stream, ZtunnelOp::Remove { uid: uid.clone() }).await?;
                    sent.remove(&uid);
                    status.send_modify(|s| {
                        s.acked.remove(&uid);
                    });
                }
                (Some(w), old) if old != Some(w) => {
                    exchange(stream, ZtunnelOp::Add(w.clone())).await?;
                    sent.insert(uid.clone(), w.clone());
                    status.send_modify(|s| {
                        s.acked.insert(uid);
                    });
                }
                _ => {}
            }
        }
        if !open {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    async fn read_op(s: &mut UnixStream) -> ZtunnelOp {
        let req: ZtunnelRequest = frame::read_frame_async(s).await.unwrap().unwrap();
        req.op
    }

    async fn ack(s: &mut UnixStream) {
        frame::write_frame_async(s, &ZtunnelReply::Ack)
            .await
            .unwrap();
    }

    fn workload(uid: &str) -> LocalWorkload {
        LocalWorkload {
            uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
            service_account: "sa".into(),
            node: "n".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        }
    }

    #[tokio::test]
    async fn snapshot_then_changes_then_resync_after_ztunnel_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zt.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (wl_tx, wl_rx) = WorkloadFeed::new();
        wl_tx.send(WorkloadChange::Upsert(workload("a")));
        let (st_tx, mut st_rx) = watch::channel(ZtunnelStatus::default());
        let mut reg = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut reg);
        let client = tokio::spawn(run_client(path.clone(), wl_rx, st_tx, metrics));

        // First ztunnel: snapshot, then an Add, then it goes away.
        let (mut s, _) = listener.accept().await.unwrap();
        assert!(matches!(read_op(&mut s).await, ZtunnelOp::Snapshot(w) if w.len() == 1));
        ack(&mut s).await;
        wl_tx.send(WorkloadChange::Upsert(workload("b")));
        assert!(matches!(read_op(&mut s).await, ZtunnelOp::Add(w) if w.uid == "b"));
        ack(&mut s).await;
        let st = st_rx
            .wait_for(|s| s.acked.contains("b"))
            .await
            .unwrap()
            .clone();
        assert!(st.connected);
        drop(s);

        // The agent notices the close without any workload change and resyncs.
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("agent reconnects after ztunnel closes")
            .unwrap();
        assert!(matches!(read_op(&mut s).await, ZtunnelOp::Snapshot(w) if w.len() == 2));
        ack(&mut s).await;
        wl_tx.send(WorkloadChange::Remove("a".into()));
        assert!(matches!(read_op(&mut s).await, ZtunnelOp::Remove { uid } if uid == "a"));
        // A refusal drops the connection and the agent tries again.
        let no = ZtunnelReply::Error {
            message: "no".into(),
        };
        frame::write_frame_async(&mut s, &no).await.unwrap();
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(read_op(&mut s).await, ZtunnelOp::Snapshot(w) if w.len() == 1));
        drop(wl_tx);
        ack(&mut s).await;
        tokio::time::timeout(Duration::from_secs(5), client)
            .await
            .expect("client ends when the agent drops its workloads")
            .unwrap();
    }
}

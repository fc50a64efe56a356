//! The node agent's push of local workloads over ztunnel's unix socket
//! (`ambient_common::ztunnel_api`). ztunnel is the server; each connection carries a
//! Snapshot, then Adds and Removes, each answered in order. `Ack` means the workloads are in
//! the store and a certificate is held for each identity; `Error{message}` otherwise.
//!
//! Nothing on the socket is believed blindly ([`AgentPolicy`]): the peer must be the
//! configured uid (SO_PEERCRED), and with a cluster source each pushed workload is checked
//! against the pod the source knows ([`Store::check_push`]). A push the source contradicts
//! (another namespace, name, service account or node for the same uid, or an IP the source
//! gives to another pod) is refused, logged and counted, and gets no certificate; one the
//! source may still settle (an IP of a pod of this node that a new pod reuses) is held up to
//! `confirm_wait` first. A pod the source does not know yet is applied (the ADD must not
//! wait for the source's next read) but dropped if the source contradicts it later or has
//! not confirmed it within `unconfirmed_ttl`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambient_common::frame;
use ambient_common::ztunnel_api::{
    LocalWorkload, ZtunnelOp, ZtunnelReply, ZtunnelRequest, ZTUNNEL_API_VERSION,
};
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};

use super::{PushCheck, Store};
use crate::identity::{Identity, SecretManager};

/// Who may push, and how pushes are checked.
#[derive(Debug, Clone)]
pub struct AgentPolicy {
    /// The only uid allowed on the socket (the node agent's; root by default).
    pub peer_uid: u32,
    /// How long a push the source may still settle is held before it is refused.
    pub confirm_wait: Duration,
    /// How long the certificate may take before the push is answered with an error.
    pub cert_timeout: Duration,
}

impl AgentPolicy {
    /// Root peer, 1 s hold, `cert_timeout` for certificates.
    pub fn new(cert_timeout: Duration) -> Self {
        Self {
            peer_uid: 0,
            confirm_wait: Duration::from_secs(1),
            cert_timeout,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot remove the stale socket {path}")]
    Stale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the directory of {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket (replacing a stale file; a ztunnel being replaced keeps serving its
/// already-open connection).
pub fn bind_agent_socket(path: &Path) -> Result<UnixListener, AgentError> {
    let l = bind_agent_socket_std(path)?;
    l.set_nonblocking(true).map_err(|source| AgentError::Bind {
        path: path.to_owned(),
        source,
    })?;
    UnixListener::from_std(l).map_err(|source| AgentError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// [`bind_agent_socket`] without a runtime: ztunnel binds it as root before it drops its
/// privileges (`--run-as`), and registers it with the control runtime later.
pub fn bind_agent_socket_std(path: &Path) -> Result<std::os::unix::net::UnixListener, AgentError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| AgentError::Dir {
            path: path.to_owned(),
            source,
        })?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(AgentError::Stale {
                path: path.to_owned(),
                source,
            })
        }
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(|source| AgentError::Bind {
        path: path.to_owned(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(l)
}

fn validate(w: &LocalWorkload, node: &str) -> Result<(), String> {
    if w.uid.is_empty() {
        return Err("workload has an empty uid".into());
    }
    if w.namespace.is_empty() || w.name.is_empty() {
        return Err(format!("workload {} has an empty namespace or name", w.uid));
    }
    if w.ips.is_empty() {
        return Err(format!("workload {}/{} has no IPs", w.namespace, w.name));
    }
    if !w.node.is_empty() && w.node != node {
        return Err(format!(
            "workload {}/{} is on node {:?}, this ztunnel serves {node:?}",
            w.namespace, w.name, w.node
        ));
    }
    Ok(())
}

fn local(w: &LocalWorkload, node: &str) -> LocalWorkload {
    let mut w = w.clone();
    w.node = node.to_owned();
    w
}

/// Applies one request; returns the reply.
pub async fn handle_request(
    req: ZtunnelRequest,
    store: &Store,
    certs: &SecretManager,
    policy: &AgentPolicy,
) -> ZtunnelReply {
    let cert_timeout = policy.cert_timeout;
    if req.version != ZTUNNEL_API_VERSION {
        return ZtunnelReply::Error {
            message: format!(
                "unsupported API version {} (ztunnel speaks {ZTUNNEL_API_VERSION})",
                req.version
            ),
        };
    }
    let td = store.trust_domain().to_owned();
    let ids: Vec<Identity> = match &req.op {
        ZtunnelOp::Snapshot(ws) => {
            if let Some(e) = ws.iter().find_map(|w| validate(w, store.node()).err()) {
                return ZtunnelReply::Error { message: e };
            }
            let ws: Vec<_> = ws.iter().map(|w| local(w, store.node())).collect();
            // The ones the source contradicts are left out (refusing the whole snapshot would
            // only make the agent reconnect and send it again).
            // One hold for the whole snapshot, not one per workload.
            let deadline = tokio::time::Instant::now() + policy.confirm_wait;
            let mut kept = Vec::with_capacity(ws.len());
            for w in ws {
                match checked(store, &w, deadline).await {
                    Ok(()) => kept.push(w),
                    Err(message) => {
                        tracing::warn!(%message, "workload left out of the agent's snapshot")
                    }
                }
            }
            let ws = kept;
            store.agent_snapshot(&ws);
            ws.iter()
                .map(|w| Identity::new(&td, &w.namespace, &default_sa(&w.service_account)))
                .collect()
        }
        ZtunnelOp::Add(w) => {
            if let Err(e) = validate(w, store.node()) {
                return ZtunnelReply::Error { message: e };
            }
            let w = &local(w, store.node());
            let deadline = tokio::time::Instant::now() + policy.confirm_wait;
            if let Err(message) = checked(store, w, deadline).await {
                return ZtunnelReply::Error { message };
            }
            store.agent_add(w);
            vec![Identity::new(
                &td,
                &w.namespace,
                &default_sa(&w.service_account),
            )]
        }
        ZtunnelOp::Remove { uid } => {
            store.agent_remove(uid);
            return ZtunnelReply::Ack;
        }
    };
    match tokio::time::timeout(cert_timeout, certs.ensure(&ids)).await {
        Ok(Ok(())) => ZtunnelReply::Ack,
        Ok(Err(e)) => ZtunnelReply::Error {
            message: ambient_common::error::chain(&e),
        },
        Err(_) => ZtunnelReply::Error {
            message: format!("no certificate within {cert_timeout:?}"),
        },
    }
}

/// Checks a push against the cluster source, holding it until `deadline` while the
/// contradiction is one the source may settle; the refusal is logged and counted.
async fn checked(
    store: &Store,
    w: &LocalWorkload,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    let mut changes = store.subscribe();
    loop {
        match store.check_push(w) {
            PushCheck::Confirmed | PushCheck::Unknown => return Ok(()),
            PushCheck::Contradicts { reason, may_settle } => {
                let settle = may_settle
                    && tokio::time::timeout_at(deadline, changes.changed())
                        .await
                        .is_ok_and(|r| r.is_ok());
                if settle {
                    continue;
                }
                let message = format!(
                    "workload {}/{} (uid {}, service account {:?}, IPs {:?}) refused: {reason}",
                    w.namespace, w.name, w.uid, w.service_account, w.ips
                );
                tracing::error!(%message, "agent push contradicts the cluster source");
                store.count_agent_refusal("contradicts_source");
                return Err(message);
            }
        }
    }
}

fn default_sa(sa: &str) -> String {
    if sa.is_empty() {
        "default".into()
    } else {
        sa.to_owned()
    }
}

async fn serve_conn(
    mut conn: UnixStream,
    store: Arc<Store>,
    certs: Arc<SecretManager>,
    policy: Arc<AgentPolicy>,
    on_change: Arc<dyn Fn() + Send + Sync>,
) -> Result<(), frame::FrameError> {
    loop {
        let reply = match frame::read_frame_async::<ZtunnelRequest>(&mut conn).await {
            Ok(None) => return Ok(()),
            Ok(Some(req)) => {
                tracing::debug!(?req, "agent request");
                let r = handle_request(req, &store, &certs, &policy).await;
                on_change();
                r
            }
            // A whole frame that is not a request is answered; anything else leaves the
            // stream out of step, and ends the session.
            Err(e @ frame::FrameError::Decode(_)) => ZtunnelReply::Error {
                message: ambient_common::error::chain(&e),
            },
            Err(e) => return Err(e),
        };
        if let ZtunnelReply::Error { message } = &reply {
            tracing::warn!(%message, "agent request refused");
        }
        frame::write_frame_async(&mut conn, &reply).await?;
    }
}

/// Only the node agent (uid `allowed`) may push: the caller is read from the socket
/// (SO_PEERCRED), not believed.
fn peer_allowed(conn: &UnixStream, allowed: u32) -> Result<(), String> {
    let cred = conn
        .peer_cred()
        .map_err(|e| format!("cannot read the caller's credentials: {e}"))?;
    ambient_common::frame::peer_uid_allowed(
        cred.uid(),
        cred.pid(),
        allowed,
        "push workloads",
        "the node agent, --agent-peer-uid",
    )
}

/// Serves the agent until the listener fails.
pub async fn serve_agent(
    listener: UnixListener,
    store: Arc<Store>,
    certs: Arc<SecretManager>,
    policy: AgentPolicy,
    on_change: Arc<dyn Fn() + Send + Sync>,
) {
    let policy = Arc::new(policy);
    let mut backoff = ambient_common::serve::AcceptBackoff::default();
    loop {
        let (mut conn, _) = ambient_common::serve::accept(&listener, &mut backoff, "agent").await;
        if let Err(refusal) = peer_allowed(&conn, policy.peer_uid) {
            tracing::warn!(%refusal, "agent socket caller refused");
            store.count_agent_refusal("peer_uid");
            // Say why, and let the caller finish writing its request (closing at once
            // would fail its write before it reads the reason); nothing it sends is read.
            tokio::spawn(async move {
                let reply = ZtunnelReply::Error { message: refusal };
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    frame::write_frame_async(&mut conn, &reply).await.ok();
                    let mut sink = [0u8; 4096];
                    while conn.read(&mut sink).await? > 0 {}
                    Ok::<_, std::io::Error>(())
                })
                .await;
            });
            continue;
        }
        tracing::info!("node agent connected");
        let (store, certs, policy, on_change) = (
            store.clone(),
            certs.clone(),
            policy.clone(),
            on_change.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = serve_conn(conn, store, certs, policy, on_change).await {
                tracing::warn!(error = %ambient_common::error::chain(&e), "agent connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ca_init, FileCa};

    fn lw(uid: &str, ip: &str) -> LocalWorkload {
        LocalWorkload {
            uid: uid.into(),
            namespace: "shop".into(),
            name: format!("p-{uid}"),
            service_account: "web".into(),
            node: "n1".into(),
            ips: vec![ip.parse().unwrap()],
        }
    }

    async fn rpc(conn: &mut UnixStream, op: ZtunnelOp) -> ZtunnelReply {
        frame::write_frame_async(conn, &ZtunnelRequest::new(op))
            .await
            .unwrap();
        frame::read_frame_async(conn).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn snapshot_add_remove_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let files = ca_init(&dir.path().join("ca"), "cluster.local", false).unwrap();
        let certs = Arc::new(SecretManager::new(
            Arc::new(FileCa::load(&files, "cluster.local").unwrap()),
            Duration::from_secs(3600),
        ));
        let store = Store::new("n1", "cluster.local");
        let path = dir.path().join("run/ztunnel.sock");
        let l = bind_agent_socket(&path).unwrap();
        let mut policy = AgentPolicy::new(Duration::from_secs(5));
        policy.peer_uid = nix::unistd::geteuid().as_raw();
        tokio::spawn(serve_agent(
            l,
            store.clone(),
            certs.clone(),
            policy,
            Arc::new(|| {}),
        ));
        let mut c = UnixStream::connect(&path).await.unwrap();
        assert_eq!(
            rpc(&mut c, ZtunnelOp::Snapshot(vec![lw("a", "10.1.0.2")])).await,
            ZtunnelReply::Ack
        );
        let id = Identity::new("cluster.local", "shop", "web");
        assert!(
            certs.get(&id).is_some(),
            "Ack only once the certificate is held"
        );
        assert_eq!(
            rpc(&mut c, ZtunnelOp::Add(lw("b", "10.1.0.3"))).await,
            ZtunnelReply::Ack
        );
        assert!(store
            .snapshot()
            .local_workload("10.1.0.3".parse().unwrap(), "n1")
            .is_some());
        assert_eq!(
            rpc(&mut c, ZtunnelOp::Remove { uid: "a".into() }).await,
            ZtunnelReply::Ack
        );
        assert!(store
            .snapshot()
            .workload("10.1.0.2".parse().unwrap())
            .is_none());
        // Bad input: a precise error, no state change.
        let mut bad = lw("c", "10.1.0.4");
        bad.ips.clear();
        let r = rpc(&mut c, ZtunnelOp::Add(bad)).await;
        assert!(
            matches!(r, ZtunnelReply::Error { ref message } if message.contains("no IPs")),
            "{r:?}"
        );
        let mut foreign = lw("d", "10.1.0.5");
        foreign.node = "n2".into();
        let r = rpc(&mut c, ZtunnelOp::Add(foreign)).await;
        assert!(matches!(r, ZtunnelReply::Error { .. }));
        assert!(store
            .snapshot()
            .workload("10.1.0.5".parse().unwrap())
            .is_none());
        // Garbage frame: an error reply, connection stays usable.
        let junk = b"{\"nope\":1}";
        let mut bytes = (junk.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(junk);
        tokio::io::AsyncWriteExt::write_all(&mut c, &bytes)
            .await
            .unwrap();
        assert!(matches!(
            frame::read_frame_async::<ZtunnelReply>(&mut c)
                .await
                .unwrap(),
            Some(ZtunnelReply::Error { .. })
        ));
        assert_eq!(
            rpc(&mut c, ZtunnelOp::Remove { uid: "b".into() }).await,
            ZtunnelReply::Ack
        );
    }

    /// Attack 7: a push binding another pod's IP to another service account is refused
    /// (no certificate for that account, the IP still maps to the source's pod), and a
    /// caller that is not the configured uid is refused before anything is read.
    #[tokio::test]
    async fn forged_pushes_and_foreign_callers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = ca_init(&dir.path().join("ca"), "cluster.local", false).unwrap();
        let certs = Arc::new(SecretManager::new(
            Arc::new(FileCa::load(&files, "cluster.local").unwrap()),
            Duration::from_secs(3600),
        ));
        let store = Store::new("n1", "cluster.local");
        store.enable_cross_check();
        store.set_manifest(super::super::ManifestState {
            workloads: vec![super::super::Workload {
                uid: "victim".into(),
                name: "p-victim".into(),
                namespace: "shop".into(),
                service_account: "web".into(),
                node: "n1".into(),
                ips: vec!["10.1.0.2".parse().unwrap()],
                labels: Default::default(),
                ambient: true,
                source: super::super::WorkloadSource::Manifest,
                reported: true,
                telemetry: Default::default(),
            }],
            ..Default::default()
        });
        let path = dir.path().join("run/ztunnel.sock");
        let mut policy = AgentPolicy::new(Duration::from_secs(5));
        policy.peer_uid = nix::unistd::geteuid().as_raw();
        policy.confirm_wait = Duration::from_millis(100);
        tokio::spawn(serve_agent(
            bind_agent_socket(&path).unwrap(),
            store.clone(),
            certs.clone(),
            policy,
            Arc::new(|| {}),
        ));
        let mut c = UnixStream::connect(&path).await.unwrap();
        let mut forged = lw("thief", "10.1.0.2");
        forged.service_account = "admin".into();
        let r = rpc(&mut c, ZtunnelOp::Add(forged)).await;
        assert!(
            matches!(&r, ZtunnelReply::Error { message } if message.contains("belongs to pod shop/p-victim")),
            "{r:?}"
        );
        assert!(certs
            .get(&Identity::new("cluster.local", "shop", "admin"))
            .is_none());
        assert_eq!(
            store
                .snapshot()
                .workload("10.1.0.2".parse().unwrap())
                .unwrap()
                .uid,
            "victim"
        );
        // The same forgery inside a snapshot is left out.
        let mut forged = lw("victim", "10.1.0.2");
        forged.service_account = "admin".into();
        rpc(&mut c, ZtunnelOp::Snapshot(vec![forged])).await;
        assert_eq!(
            store
                .snapshot()
                .workload("10.1.0.2".parse().unwrap())
                .unwrap()
                .service_account,
            "web"
        );
        assert!(certs
            .get(&Identity::new("cluster.local", "shop", "admin"))
            .is_none());

        // A caller whose uid is not the configured one.
        let path2 = dir.path().join("run/other.sock");
        let mut policy = AgentPolicy::new(Duration::from_secs(5));
        policy.peer_uid = nix::unistd::geteuid().as_raw() + 1;
        tokio::spawn(serve_agent(
            bind_agent_socket(&path2).unwrap(),
            store.clone(),
            certs.clone(),
            policy,
            Arc::new(|| {}),
        ));
        let mut c = UnixStream::connect(&path2).await.unwrap();
        let r = rpc(&mut c, ZtunnelOp::Snapshot(vec![])).await;
        assert!(
            matches!(&r, ZtunnelReply::Error { message } if message.contains("may not push")),
            "{r:?}"
        );
        assert_eq!(
            store
                .snapshot()
                .workload("10.1.0.2".parse().unwrap())
                .unwrap()
                .uid,
            "victim"
        );
    }
}

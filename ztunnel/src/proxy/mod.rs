//! The listeners and what happens to each connection:
//! - outbound (15001): captured connections from local ambient pods; HBONE to the destination
//!   pod's node, a same-node shortcut, or direct TCP for destinations outside the mesh;
//! - inbound (15008): HBONE from other ztunnels, terminated with the destination pod's
//!   certificate, authorized, connected to the pod keeping the client's source IP;
//! - inbound plaintext (15006): plaintext captured on its way to a local ambient pod, allowed
//!   by the namespace's mTLS mode and authorization policy.

mod inbound;
mod outbound;
mod socket;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

pub use socket::{canonical, original_dst, SocketError, SocketFactory};

use crate::config::Config;
use crate::hbone::{Pool, PoolError};
use crate::identity::{Identity, SecretError, SecretManager, TlsError};
use crate::metrics::{Direction, Peer, ResponseFlag, Tracker};
use crate::policy::{self, Decision};
use crate::store::{State, Store, Workload};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("original destination unknown")]
    OriginalDst(#[source] SocketError),
    #[error("connection addressed to the proxy itself ({0}); refusing a loop")]
    Loop(SocketAddr),
    #[error("source {0} is not an enrolled workload on this node")]
    NotLocalSource(IpAddr),
    #[error("{0} is not an ambient workload on this node")]
    NotLocalDestination(SocketAddr),
    #[error("service {vip} has no ready endpoint for port {port}")]
    NoEndpoint { vip: IpAddr, port: u16 },
    #[error("{0} is outside the mesh and --outside-mesh=deny")]
    OutsideMeshDenied(SocketAddr),
    #[error("{0} is inside --cluster-cidrs but no pod or Service has that address (waited {1:?}); refused rather than sent in plaintext")]
    UnknownInCluster(SocketAddr, std::time::Duration),
    #[error("namespace {0} requires mTLS (PeerAuthentication STRICT); plaintext refused")]
    Strict(String),
    #[error("denied by authorization policy: {0}")]
    Denied(String),
    #[error("connecting to the destination failed")]
    Connect(#[source] SocketError),
    #[error("HBONE to the destination failed")]
    Hbone(#[source] PoolError),
    #[error("no certificate for the destination identity")]
    Certificate(#[source] SecretError),
    #[error("TLS handshake with the client failed")]
    Tls(#[source] std::io::Error),
    #[error("client identity unusable")]
    PeerIdentity(#[source] TlsError),
    #[error("HTTP/2 error on the HBONE connection")]
    H2(#[source] h2::Error),
    #[error("relaying bytes failed")]
    Relay(#[source] std::io::Error),
}

/// What every connection handler needs.
pub struct Proxy {
    pub cfg: Arc<Config>,
    pub store: Arc<Store>,
    pub certs: Arc<SecretManager>,
    pub pool: Arc<Pool>,
    pub sockets: SocketFactory,
    pub tracker: Arc<Tracker>,
    /// Open inbound HBONE connections (drain waits for them too).
    pub hbone_conns: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

pub(crate) fn peer_of(w: Option<&Workload>, addr: Option<SocketAddr>, td: &str) -> Peer {
    Peer {
        addr,
        workload: w.map(|w| w.name.clone()),
        namespace: w.map(|w| w.namespace.clone()),
        identity: w.filter(|w| w.ambient).map(|w| w.identity(td)),
        app: w.and_then(|w| w.labels.get("app").cloned()),
    }
}

impl Proxy {
    fn td(&self) -> &str {
        &self.cfg.trust_domain
    }

    /// Authorizes a connection to a local workload and connects to it, keeping `src_ip` as
    /// the source when transparency is on. On refusal returns the response flag to record.
    pub(crate) async fn authorize_and_connect(
        &self,
        state: &State,
        src_identity: Option<&Identity>,
        src_ip: IpAddr,
        keep_source: bool,
        dst: &Workload,
        target: SocketAddr,
    ) -> Result<TcpStream, (ResponseFlag, ProxyError)> {
        let decision = policy::evaluate(
            state.policies.iter().map(|p| p.as_ref()),
            &self.cfg.root_namespace,
            &policy::Target {
                namespace: &dst.namespace,
                labels: &dst.labels,
            },
            &policy::Request {
                src_identity,
                src_ip,
                dst_port: target.port(),
            },
        );
        if let Decision::Deny(why) = decision {
            return Err((ResponseFlag::Deny, ProxyError::Denied(why)));
        }
        let r = if self.cfg.transparent && keep_source {
            self.sockets.connect_transparent(src_ip, target).await
        } else {
            self.sockets.connect(target).await
        };
        r.map_err(|e| (ResponseFlag::Connect, ProxyError::Connect(e)))
    }
}

/// Accepts on `listener` until `drain` fires, handling each connection per `kind`.
pub async fn serve(
    listener: TcpListener,
    kind: Direction,
    proxy: Arc<Proxy>,
    mut drain: tokio::sync::watch::Receiver<bool>,
) {
    let local = listener.local_addr().ok();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let p = proxy.clone();
                    let drain = drain.clone();
                    let peer = canonical(peer);
                    let span = tracing::info_span!("conn", ?kind, %peer);
                    tokio::spawn(tracing::Instrument::instrument(async move {
                        let res = match kind {
                            Direction::Outbound => outbound::outbound(p, tcp, peer, local.map(|l| l.port())).await,
                            Direction::Inbound => inbound::inbound(p, tcp, peer, drain).await,
                            Direction::InboundPlaintext => inbound::inbound_plaintext(p, tcp, peer).await,
                        };
                        if let Err(e) = res {
                            tracing::info!(error = %crate::error_chain(&e), "connection refused or failed");
                        }
                    }, span));
                }
                Err(e) => {
                    tracing::warn!(?local, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            _ = drain.changed() => break,
        }
    }
    tracing::info!(?local, ?kind, "listener closed for drain");
}

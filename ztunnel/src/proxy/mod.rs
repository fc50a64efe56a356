//! The listeners and what happens to each connection:
//! - outbound (15001): captured connections from local ambient pods; HBONE to the destination
//!   pod's node, a same-node shortcut, or direct TCP for destinations outside the mesh;
//! - inbound (15008): HBONE from other ztunnels, terminated with the destination pod's
//!   certificate, authorized, connected to the pod keeping the client's source IP;
//! - inbound plaintext (15006): plaintext captured on its way to a local ambient pod, allowed
//!   by the namespace's mTLS mode and authorization policy.

mod inbound;
pub mod limit;
pub mod local;
mod outbound;
mod socket;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::net::{TcpListener, TcpStream};

pub use socket::{canonical, original_dst, SocketError, SocketFactory};

use crate::config::Config;
use crate::hbone::{H2Relay, Lease, Pool, PoolError, TcpRelay};
use crate::identity::{Identity, SecretError, SecretManager, TlsError};
use crate::metrics::{ConnGuard, Direction, Peer, ResponseFlag, Tracker};
use crate::policy::{self, Decision};
use crate::store::{State, Store, Workload};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("original destination unknown")]
    OriginalDst(#[source] SocketError),
    #[error("connection addressed to the proxy itself ({0}); refusing a loop")]
    Loop(SocketAddr),
    #[error("{dst} is node-local ({why}); ztunnel never connects to it on a pod's behalf")]
    NodeLocal { dst: SocketAddr, why: &'static str },
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
    #[error("too many TLS handshakes in flight ({}); connection closed", .0.as_str())]
    HandshakeLimit(limit::Refused),
    #[error("no TLS handshake within {0:?}; connection closed")]
    HandshakeTimeout(std::time::Duration),
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
    /// The node's own addresses (never a destination on a pod's behalf).
    pub node_addrs: Arc<local::NodeAddrs>,
    /// Inbound HBONE handshakes in flight.
    pub handshakes: Arc<limit::HandshakeLimits>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

pub(crate) fn peer_of(w: Option<&Workload>, addr: Option<SocketAddr>, td: &str) -> Peer {
    Peer {
        addr,
        workload: w.map(|w| w.workload_name().to_owned()),
        namespace: w.map(|w| w.namespace.clone()),
        identity: w.filter(|w| w.ambient).map(|w| w.identity(td)),
        app: w.map(|w| w.canonical_service().to_owned()),
        version: w.map(|w| w.canonical_revision().to_owned()),
        region: w
            .map(|w| w.telemetry.region.clone())
            .filter(|r| !r.is_empty()),
        zone: w
            .map(|w| w.telemetry.zone.clone())
            .filter(|z| !z.is_empty()),
    }
}

impl Proxy {
    fn td(&self) -> &str {
        &self.cfg.trust_domain
    }

    /// Refuses `dst` if it is node-local (the node's own addresses included): counts it,
    /// logs it once per source. (A Service endpoint is checked by `outbound::decide`, on
    /// which the node's own addresses are allowed: host-network endpoints.)
    pub(crate) fn refuse_node_local(&self, src: IpAddr, dst: SocketAddr) -> Result<(), ProxyError> {
        match self.node_addrs.classify(dst.ip()) {
            Some(why) => Err(self.node_local_refusal(src, dst, why)),
            None => Ok(()),
        }
    }

    /// Counts and (rate-limited) logs a refused node-local destination; the error to return.
    pub(crate) fn node_local_refusal(
        &self,
        src: IpAddr,
        dst: SocketAddr,
        why: local::NodeLocal,
    ) -> ProxyError {
        self.store
            .refusals()
            .outbound
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: "node_local",
            })
            .inc();
        if self.node_addrs.should_log(src) {
            tracing::warn!(%src, %dst, kind = why.as_str(),
                "refused a node-local destination (logged once per source per minute; ztunnel_outbound_refused_total counts each)");
        }
        ProxyError::NodeLocal {
            dst,
            why: why.as_str(),
        }
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
            state.policies().iter().map(|p| p.as_ref()),
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
        // A local workload's address is a pod's, never the node's; a store entry saying
        // otherwise (a bad object or push) must not make ztunnel connect to the node itself.
        self.refuse_node_local(src_ip, target)
            .map_err(|e| (ResponseFlag::Deny, e))?;
        let r = if self.cfg.transparent && keep_source {
            self.sockets.connect_transparent(src_ip, target).await
        } else {
            self.sockets.connect(target).await
        };
        r.map_err(|e| (ResponseFlag::Connect, ProxyError::Connect(e)))
    }
}

/// What a connection's setup hands over once both ends are connected: the relay (sockets,
/// streams, a small state per direction) and the tracking. A connection's task holds only
/// this for the connection's life; the setup (lookups, peers, pool key, snapshot) is boxed
/// and freed before the relay starts.
pub(crate) struct Opened {
    relay: Relay,
    guard: ConnGuard,
    /// A same-node connection is tracked as inbound too; its counters mirror `guard`'s.
    mirror: Option<Box<ConnGuard>>,
}

enum Relay {
    /// A TCP connection and an HBONE stream; `tcp_is_client` when the TCP side is the client
    /// (outbound; inbound it is the pod).
    H2 {
        relay: H2Relay,
        tcp_is_client: bool,
        /// The pooled connection's slot, held while the stream is used.
        _lease: Option<Lease>,
    },
    /// Client (`a`) and server (`b`) TCP connections.
    Tcp(TcpRelay),
}

impl Opened {
    fn tcp(client: TcpStream, server: TcpStream, guard: ConnGuard) -> Self {
        Self {
            relay: Relay::Tcp(TcpRelay::new(client, server)),
            guard,
            mirror: None,
        }
    }

    fn h2(
        tcp: TcpStream,
        (send, recv, lease): (SendStream<Bytes>, RecvStream, Option<Lease>),
        tcp_is_client: bool,
        guard: ConnGuard,
    ) -> Self {
        Self {
            relay: Relay::H2 {
                relay: H2Relay::new(tcp, send, recv),
                tcp_is_client,
                _lease: lease,
            },
            guard,
            mirror: None,
        }
    }

    fn poll_relay(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let i = &self.guard.info;
        match &mut self.relay {
            Relay::H2 {
                relay,
                tcp_is_client,
                ..
            } => {
                // Bytes from the client are "received", towards it "sent".
                let (up, down) = if *tcp_is_client {
                    (&i.received, &i.sent)
                } else {
                    (&i.sent, &i.received)
                };
                relay.poll_relay(cx, up, down)
            }
            Relay::Tcp(r) => r.poll_relay(cx, &i.received, &i.sent),
        }
    }

    /// Ends the relay with its result: closes the sockets and streams, mirrors the counters
    /// and hands back the tracking guards (their drop records the connection's end).
    fn end(self, res: std::io::Result<()>) -> (Result<(), ProxyError>, Guards) {
        let Self {
            relay,
            guard,
            mirror,
        } = self;
        drop(relay);
        if let Some(m) = &mirror {
            let i = &guard.info;
            m.info
                .received
                .store(i.received.load(Ordering::Relaxed), Ordering::Relaxed);
            m.info
                .sent
                .store(i.sent.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        (res.map_err(ProxyError::Relay), Guards(guard, mirror))
    }
}

/// A finished connection's tracking guards (dropping them records its end).
struct Guards(
    #[allow(dead_code)] ConnGuard,
    #[allow(dead_code)] Option<Box<ConnGuard>>,
);

/// A connection's (or inbound HBONE stream's) task: the boxed setup `S`, then the relay.
/// Written by hand rather than as an `async fn`: tokio sizes a task's allocation (128-byte
/// aligned) for its future and keeps it for the connection's life, and an `async fn` keeps
/// its arguments and the setup's slot beside the relay state. This one holds the relay state,
/// the peer address and a tag (about 260 bytes).
pub(crate) struct ConnTask<S> {
    /// `None` for an inbound HBONE stream (whose task is not in a connection span).
    kind: Option<Direction>,
    peer: SocketAddr,
    stage: Stage<S>,
}

// The relay is inline on purpose: it is what the task holds for the connection's life (boxing
// it would add an allocation per connection, not save one).
#[allow(clippy::large_enum_variant)]
enum Stage<S> {
    Setup(S),
    Relay(Opened),
    Done,
}

impl<S> ConnTask<S> {
    pub(crate) fn new(kind: Option<Direction>, peer: SocketAddr, setup: S) -> Self {
        Self {
            kind,
            peer,
            stage: Stage::Setup(setup),
        }
    }

    /// Records the end (the guards' drop: metrics, access log) and logs the error; for a
    /// connection inside its span, entered again (so the log lines are as if the span had
    /// been held throughout).
    fn finish(&self, res: Result<(), ProxyError>, guards: Option<Guards>) {
        match self.kind {
            Some(kind) => {
                let span = conn_span(kind, self.peer);
                let _entered = span.enter();
                drop(guards);
                match res {
                    // Logged (rate-limited per source) where it was refused.
                    Err(ProxyError::NodeLocal { .. })
                    | Err(ProxyError::HandshakeLimit(_))
                    | Err(ProxyError::HandshakeTimeout(_))
                    | Ok(()) => {}
                    Err(e) => {
                        tracing::info!(error = %ambient_common::error::chain(&e), "connection refused or failed")
                    }
                }
            }
            None => {
                drop(guards);
                if let Err(e) = res {
                    let peer = self.peer;
                    tracing::info!(%peer, error = %ambient_common::error::chain(&e), "inbound stream refused or failed");
                }
            }
        }
    }
}

impl<S> Future for ConnTask<S>
where
    S: Future<Output = Result<Option<Opened>, ProxyError>> + Unpin,
{
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.get_mut();
        loop {
            match &mut this.stage {
                Stage::Setup(s) => match std::task::ready!(std::pin::Pin::new(s).poll(cx)) {
                    // The setup (and its span) is dropped here, before the relay starts.
                    Ok(Some(o)) => this.stage = Stage::Relay(o),
                    Ok(None) => {
                        this.stage = Stage::Done;
                        return std::task::Poll::Ready(());
                    }
                    Err(e) => {
                        this.stage = Stage::Done;
                        this.finish(Err(e), None);
                        return std::task::Poll::Ready(());
                    }
                },
                Stage::Relay(o) => {
                    let res = std::task::ready!(o.poll_relay(cx));
                    if let Stage::Relay(o) = std::mem::replace(&mut this.stage, Stage::Done) {
                        let (res, guards) = o.end(res);
                        this.finish(res, Some(guards));
                    }
                    return std::task::Poll::Ready(());
                }
                Stage::Done => return std::task::Poll::Ready(()),
            }
        }
    }
}

/// One accepted connection's setup: lookups, authorization, the upstream connection (for an
/// inbound HBONE connection, its whole life). Boxed by the caller.
async fn setup(
    kind: Direction,
    p: Arc<Proxy>,
    tcp: TcpStream,
    peer: SocketAddr,
    listener_port: Option<u16>,
    drain: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<Opened>, ProxyError> {
    match kind {
        Direction::Outbound => outbound::outbound(p, tcp, peer, listener_port)
            .await
            .map(Some),
        Direction::Inbound => inbound::inbound(p, tcp, peer, drain).await.map(|()| None),
        Direction::InboundPlaintext => inbound::inbound_plaintext(p, tcp, peer).await.map(Some),
    }
}

fn conn_span(kind: Direction, peer: SocketAddr) -> tracing::Span {
    tracing::info_span!("conn", ?kind, %peer)
}

/// Accepts on `listener` until `drain` fires, handling each connection per `kind`.
pub async fn serve(
    listener: TcpListener,
    kind: Direction,
    proxy: Arc<Proxy>,
    mut drain: tokio::sync::watch::Receiver<bool>,
) {
    let local = listener.local_addr().ok();
    let mut backoff = ambient_common::serve::AcceptBackoff::default();
    loop {
        tokio::select! {
            (tcp, peer) = ambient_common::serve::accept(&listener, &mut backoff, "proxy") => {
                    let _ = tcp.set_nodelay(true);
                    let peer = canonical(peer);
                    let setup = Box::pin(setup(
                        kind,
                        proxy.clone(),
                        tcp,
                        peer,
                        local.map(|l| l.port()),
                        drain.clone(),
                    ));
                    let setup = tracing::Instrument::instrument(setup, conn_span(kind, peer));
                    tokio::spawn(ConnTask::new(Some(kind), peer, setup));
            }
            _ = drain.changed() => break,
        }
    }
    tracing::info!(?local, ?kind, "listener closed for drain");
}

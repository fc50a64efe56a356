//! Inbound: HBONE (15008) and plaintext (15006) to local ambient pods.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;

use super::{original_dst, peer_of, ConnTask, Opened, Proxy, ProxyError};
use crate::config::MtlsMode;
use crate::hbone::{check_connect, parse_forwarded_for, server_builder, FORWARDED};
use crate::identity::{peer_identity, Identity};
use crate::metrics::{Direction, Peer, ResponseFlag};
use crate::store::Workload;

/// An inbound HBONE connection. The work is boxed: the accept loop's per-connection task is
/// sized for the largest of its handlers, and this one (TLS and HTTP/2 handshakes, about
/// 6.7 KB) would otherwise enlarge every outbound connection's task, which lives as long as
/// the connection (about 2 KB).
pub(super) async fn inbound(
    p: Arc<Proxy>,
    tcp: TcpStream,
    peer: SocketAddr,
    drain: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ProxyError> {
    Box::pin(inbound_connection(p, tcp, peer, drain)).await
}

async fn inbound_connection(
    p: Arc<Proxy>,
    tcp: TcpStream,
    peer: SocketAddr,
    mut drain: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ProxyError> {
    // Until the client has proven who it is, it holds one of a bounded number of places
    // (per source IP and in total) for a bounded time.
    let refused = |reason: &'static str, why: &dyn std::fmt::Display| {
        p.store
            .refusals()
            .handshakes
            .get_or_create(&crate::metrics::ReasonLabels { reason })
            .inc();
        if p.handshakes.log.should_log(peer.ip()) {
            tracing::warn!(%peer, reason, "{why} (logged once per source per minute; ztunnel_hbone_handshakes_refused_total counts each)");
        }
    };
    let slot = match p.handshakes.try_acquire(peer.ip()) {
        Ok(s) => s,
        Err(r) => {
            let e = ProxyError::HandshakeLimit(r);
            refused(r.as_str(), &e);
            return Err(e);
        }
    };
    let deadline = tokio::time::Instant::now() + p.cfg.hbone_handshake_timeout;
    let orig = original_dst(&tcp).map_err(ProxyError::OriginalDst)?;
    let state = p.store.snapshot();
    let w = state
        .local_workload(orig.ip(), p.store.node())
        .cloned()
        .ok_or(ProxyError::NotLocalDestination(orig))?;
    drop(state);
    let held = p
        .certs
        .fetch(&w.identity(p.td()))
        .await
        .map_err(ProxyError::Certificate)?;
    let mut tls = match tokio::time::timeout_at(
        deadline,
        tokio_rustls::TlsAcceptor::from(held.server.clone()).accept(tcp),
    )
    .await
    {
        Ok(r) => r.map_err(ProxyError::Tls)?,
        Err(_) => {
            let e = ProxyError::HandshakeTimeout(p.cfg.hbone_handshake_timeout);
            refused("timeout", &e);
            return Err(e);
        }
    };
    tls.get_mut()
        .1
        .set_buffer_limit(Some(crate::hbone::TLS_SEND_BUFFER));
    let client_id = Arc::new(peer_identity(tls.get_ref().1).map_err(ProxyError::PeerIdentity)?);
    // Authenticated: the place goes to the next client.
    drop(slot);
    let _open = ConnCount::new(&p);
    let mut conn = tokio::time::timeout(
        p.cfg.connect_timeout,
        server_builder().handshake::<_, Bytes>(tls),
    )
    .await
    .map_err(|_| {
        ProxyError::Tls(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no HTTP/2 preface after the TLS handshake",
        ))
    })?
    .map_err(ProxyError::H2)?;
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.accept() => match r {
                Some(Ok((req, respond))) => {
                    // The task captures only the boxed setup (not its arguments), so it holds
                    // little more than the relay for the stream's life.
                    let setup = Box::pin(open_stream(
                        p.clone(), req, respond, client_id.clone(), w.clone(), orig, peer,
                    ));
                    tokio::spawn(ConnTask::new(None, peer, setup));
                }
                Some(Err(e)) => return Err(ProxyError::H2(e)),
                None => return Ok(()),
            },
            _ = drain.changed(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
        }
    }
}

/// Counts an open inbound HBONE connection while alive.
struct ConnCount(Arc<Proxy>);

impl ConnCount {
    fn new(p: &Arc<Proxy>) -> Self {
        p.hbone_conns
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(p.clone())
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0
            .hbone_conns
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

fn reply(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder()
        .status(status)
        .body(())
        .unwrap_or_default();
    let _ = respond.send_response(resp, true);
}

async fn open_stream(
    p: Arc<Proxy>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    client_id: Arc<Identity>,
    w: Arc<Workload>,
    orig: SocketAddr,
    peer: SocketAddr,
) -> Result<Option<Opened>, ProxyError> {
    let target = match check_connect(
        req.method(),
        req.uri().authority().map(|a| a.as_str()),
        orig.ip(),
    ) {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(error = %ambient_common::error::chain(&e), "CONNECT refused (400)");
            reply(respond, StatusCode::BAD_REQUEST);
            return Ok(None);
        }
    };
    let td = p.td().to_owned();
    let state = p.store.snapshot();
    // The destination as the store says now, not as it was when the pooled connection was
    // opened: labels (policy selectors) may have arrived since, and the pod behind the IP may
    // have changed (then the certificate this connection presented is no longer its own).
    let w = match state.local_workload(orig.ip(), p.store.node()) {
        Some(now) if now.identity(&td) == w.identity(&td) => now.clone(),
        _ => {
            reply(respond, StatusCode::SERVICE_UNAVAILABLE);
            return Err(ProxyError::NotLocalDestination(orig));
        }
    };
    // Believe the forwarded client address only if it belongs to a workload with the very
    // identity the client proved.
    let forwarded = req.headers().get(FORWARDED);
    let src = forwarded
        .and_then(|v| v.to_str().ok())
        .and_then(parse_forwarded_for)
        .and_then(|ip| {
            state
                .workload(ip)
                .filter(|sw| sw.identity(&td) == *client_id)
                .map(|sw| (ip, sw.clone()))
        });
    if src.is_none() {
        tracing::debug!(?forwarded, client = %client_id, "client address not taken from the forwarded header");
    }
    let mut src_peer = match &src {
        Some((ip, sw)) => peer_of(Some(sw), Some(SocketAddr::new(*ip, 0)), &td),
        None => Peer {
            addr: Some(peer),
            ..Default::default()
        },
    };
    src_peer.identity = Some((*client_id).clone());
    let dst_peer = peer_of(Some(&w), Some(target), &td);
    let mut g = p
        .tracker
        .open(Direction::Inbound, src_peer, dst_peer, None, true);
    let (src_ip, keep) = match &src {
        Some((ip, _)) => (*ip, true),
        None => (peer.ip(), false),
    };
    let up = match p
        .authorize_and_connect(&state, Some(&*client_id), src_ip, keep, &w, target)
        .await
    {
        Ok(s) => s,
        Err((flag, e)) => {
            g.set_flag(flag);
            g.set_error(e.to_string());
            let code = match flag {
                ResponseFlag::Deny => StatusCode::UNAUTHORIZED,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            reply(respond, code);
            return Err(e);
        }
    };
    drop(state);
    let mut respond = respond;
    let send = respond
        .send_response(Response::new(()), false)
        .map_err(ProxyError::H2)?;
    Ok(Some(Opened::h2(
        up,
        (send, req.into_body(), None),
        false,
        g,
    )))
}

pub(super) async fn inbound_plaintext(
    p: Arc<Proxy>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<Opened, ProxyError> {
    let orig = original_dst(&tcp).map_err(ProxyError::OriginalDst)?;
    let state = p.store.snapshot();
    let w = state
        .local_workload(orig.ip(), p.store.node())
        .cloned()
        .ok_or(ProxyError::NotLocalDestination(orig))?;
    let td = p.td().to_owned();
    let mut src_peer = peer_of(
        state.workload(peer.ip()).map(|w| w.as_ref()),
        Some(peer),
        &td,
    );
    src_peer.identity = None; // plaintext proves nothing
    let dst_peer = peer_of(Some(&w), Some(orig), &td);
    let mut g = p
        .tracker
        .open(Direction::InboundPlaintext, src_peer, dst_peer, None, false);
    if state.mtls_mode(&w.namespace, &p.cfg.root_namespace, p.cfg.default_mtls_mode)
        == MtlsMode::Strict
    {
        g.set_flag(ResponseFlag::Deny);
        return Err(ProxyError::Strict(w.namespace.clone()));
    }
    let up = match p
        .authorize_and_connect(&state, None, peer.ip(), true, &w, orig)
        .await
    {
        Ok(s) => s,
        Err((flag, e)) => {
            g.set_flag(flag);
            g.set_error(e.to_string());
            return Err(e);
        }
    };
    drop(state);
    Ok(Opened::tcp(tcp, up, g))
}

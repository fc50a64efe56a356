//! Outbound: a local ambient pod's captured connection.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::{original_dst, peer_of, Opened, Proxy, ProxyError};
use crate::config::OutsideMesh;
use crate::hbone::{PoolError, PoolKey};
use crate::metrics::{Direction, ResponseFlag};

pub(super) async fn outbound(
    p: Arc<Proxy>,
    tcp: TcpStream,
    peer: SocketAddr,
    listener_port: Option<u16>,
) -> Result<Opened, ProxyError> {
    let orig = original_dst(&tcp).map_err(ProxyError::OriginalDst)?;
    // Sent to the listener itself, not redirected: a loop. (With TPROXY the local address is
    // the original destination, whose port is not the listener's.)
    let local = tcp.local_addr().ok().map(super::canonical);
    if local == Some(orig) && listener_port == Some(orig.port()) {
        return Err(ProxyError::Loop(orig));
    }
    // Loopback, link-local (cloud metadata), multicast and the node's own addresses: a pod
    // must not reach them through ztunnel, with the node's address.
    p.refuse_node_local(peer.ip(), orig, false)?;
    let node = p.store.node();
    let td = p.td();
    let in_cluster = |ip: std::net::IpAddr| p.cfg.cluster_cidrs.iter().any(|c| c.contains(ip));
    let deadline = tokio::time::Instant::now() + p.cfg.discovery_wait;
    // Resolve the destination. One inside the cluster's ranges that is not known yet (a pod
    // or Service created a moment ago) is waited for, never mistaken for "outside the mesh".
    let (state, target, service) = loop {
        let state = p.store.snapshot();
        // A Service VIP resolves to one of its ready endpoints.
        let (target, service) = match (state.workload(orig.ip()), state.service(orig.ip())) {
            (None, Some(svc)) => (
                svc.pick(orig.port()).ok_or(ProxyError::NoEndpoint {
                    vip: orig.ip(),
                    port: orig.port(),
                })?,
                Some(svc.host()),
            ),
            _ => (orig, None),
        };
        if service.is_some() {
            p.refuse_node_local(peer.ip(), target, true)?;
        }
        let unknown = state.workload(target.ip()).is_none() && in_cluster(target.ip());
        if !unknown {
            break (state, target, service);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ProxyError::UnknownInCluster(target, p.cfg.discovery_wait));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let src = state
        .local_workload(peer.ip(), node)
        .cloned()
        .ok_or(ProxyError::NotLocalSource(peer.ip()))?;
    let src_id = src.identity(td);
    let dst = state.workload(target.ip()).cloned();
    let src_peer = peer_of(Some(&src), Some(peer), td);
    let dst_peer = peer_of(dst.as_deref(), Some(target), td);
    match dst {
        Some(w) if w.ambient && w.node == node => {
            // Same node: no tunnel, but the same authorization as inbound.
            // Not encrypted (it never leaves the node): not reported as mutual_tls.
            let mut g = p.tracker.open(
                Direction::Outbound,
                src_peer.clone(),
                dst_peer.clone(),
                service.clone(),
                false,
            );
            let mut gi = p
                .tracker
                .open(Direction::Inbound, src_peer, dst_peer, service, false);
            let up = match p
                .authorize_and_connect(&state, Some(&src_id), peer.ip(), true, &w, target)
                .await
            {
                Ok(s) => s,
                Err((flag, e)) => {
                    g.set_flag(flag);
                    gi.set_flag(flag);
                    g.set_error(e.to_string());
                    gi.set_error(e.to_string());
                    return Err(e);
                }
            };
            let mut o = Opened::tcp(tcp, up, g);
            o.mirror = Some(Box::new(gi));
            Ok(o)
        }
        Some(w) if w.ambient => {
            let key = PoolKey {
                src: src_id,
                dst: SocketAddr::new(target.ip(), p.cfg.hbone_port),
                expected: w.identity(td),
            };
            let mut g = p
                .tracker
                .open(Direction::Outbound, src_peer, dst_peer, service, true);
            let stream = match p.pool.connect(&key, target, Some(peer)).await {
                Ok(s) => s,
                Err(e) => {
                    let flag = match &e {
                        PoolError::Status { status, .. } if status.as_u16() == 401 => {
                            ResponseFlag::Deny
                        }
                        _ => ResponseFlag::Connect,
                    };
                    g.set_flag(flag);
                    g.set_error(ambient_common::error::chain(&e));
                    return Err(ProxyError::Hbone(e));
                }
            };
            let (send, recv, lease) = stream.into_parts();
            Ok(Opened::h2(tcp, (send, recv, Some(lease)), true, g))
        }
        _ => {
            let mut g = p
                .tracker
                .open(Direction::Outbound, src_peer, dst_peer, service, false);
            if p.cfg.outside_mesh == OutsideMesh::Deny {
                g.set_flag(ResponseFlag::Deny);
                return Err(ProxyError::OutsideMeshDenied(target));
            }
            // From the pod's own address, as without the mesh (the destination's policies,
            // firewalls and logs see the pod, not the node); replies come back to this
            // socket through the same mark and policy routing as the inbound side's (on a
            // bridge, the node agent's rules route TCP addressed to an ambient pod's MAC
            // through the host, so a neighbour's reply is not switched around ztunnel).
            let same_family = peer.ip().is_ipv4() == target.ip().is_ipv4();
            let transparent = p.cfg.transparent && same_family;
            let up = if transparent {
                p.sockets.connect_transparent(peer.ip(), target).await
            } else {
                p.sockets.connect(target).await
            };
            let up = match up {
                Ok(s) => s,
                Err(e) => {
                    g.set_flag(ResponseFlag::Connect);
                    g.set_error(ambient_common::error::chain(&e));
                    return Err(ProxyError::Connect(e));
                }
            };
            Ok(Opened::tcp(tcp, up, g))
        }
    }
}

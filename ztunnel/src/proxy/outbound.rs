//! Outbound: a local ambient pod's captured connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambient_common::IpPrefix;

use tokio::net::TcpStream;

use super::{original_dst, peer_of, Opened, Proxy, ProxyError};
use crate::config::OutsideMesh;
use crate::hbone::{PoolError, PoolKey};
use crate::metrics::{Direction, ResponseFlag};
use crate::store::{State, Store, Workload};

/// Where a captured connection goes, decided from the store's state alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// A workload in the mesh on this node: no tunnel (the bytes never leave the node),
    /// the same authorization as inbound.
    SameNode(Arc<Workload>),
    /// An ambient workload on another node: HBONE to its node's ztunnel.
    Hbone(Arc<Workload>),
    /// Outside the mesh: a workload not in it, or an address outside the cluster's ranges.
    Outside(Option<Arc<Workload>>),
}

impl Route {
    pub fn workload(&self) -> Option<&Arc<Workload>> {
        match self {
            Route::SameNode(w) | Route::Hbone(w) => Some(w),
            Route::Outside(w) => w.as_ref(),
        }
    }
}

/// The decision for one connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The local ambient workload that opened the connection.
    pub src: Arc<Workload>,
    /// The destination: the original one, or the endpoint picked for a Service VIP.
    pub target: SocketAddr,
    /// The Service's host name when the original destination was its VIP.
    pub service: Option<String>,
    pub route: Route,
}

/// Why there is no decision yet, or none to make.
#[derive(Debug)]
pub enum Undecided {
    /// Inside the cluster's ranges and neither a workload nor a Service: one created a
    /// moment ago, not discovered yet. Never mistaken for "outside the mesh".
    Unknown(SocketAddr),
    /// The Service's picked endpoint is node-local (loopback, link-local, ...).
    NodeLocalEndpoint(SocketAddr, super::local::NodeLocal),
    Refused(ProxyError),
}

/// [`decide`] on the store's current state; a destination not known yet is decided again
/// at each change of the store, until `wait` has passed.
pub async fn resolve(
    store: &Store,
    cluster_cidrs: &[IpPrefix],
    src_ip: IpAddr,
    orig: SocketAddr,
    wait: std::time::Duration,
) -> Result<(Arc<State>, Decision), Undecided> {
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribed before the first look, so a change between the look and the wait is seen.
    let mut changes = store.subscribe();
    loop {
        let state = store.snapshot();
        match decide(&state, store.node(), cluster_cidrs, src_ip, orig) {
            Err(Undecided::Unknown(target)) => {
                // A pod or Service created a moment ago: wait for discovery to name it.
                let changed = tokio::time::timeout_at(deadline, changes.changed()).await;
                if !matches!(changed, Ok(Ok(()))) {
                    return Err(Undecided::Unknown(target));
                }
            }
            decided => return decided.map(|d| (state, d)),
        }
    }
}

/// Decides where a connection from `src_ip` to `orig` goes, in `state` on node `node`.
/// Checks in order: a Service VIP resolves to one of its ready endpoints; an unknown
/// destination inside `cluster_cidrs` is [`Undecided::Unknown`]; the source must be a
/// local workload; then the destination's workload, if any, picks the route.
pub fn decide(
    state: &State,
    node: &str,
    cluster_cidrs: &[IpPrefix],
    src_ip: IpAddr,
    orig: SocketAddr,
) -> Result<Decision, Undecided> {
    let (target, service) = match (state.workload(orig.ip()), state.service(orig.ip())) {
        (None, Some(svc)) => {
            let target =
                svc.pick(orig.port())
                    .ok_or(Undecided::Refused(ProxyError::NoEndpoint {
                        vip: orig.ip(),
                        port: orig.port(),
                    }))?;
            if let Some(why) = super::local::classify_endpoint(target.ip()) {
                return Err(Undecided::NodeLocalEndpoint(target, why));
            }
            (target, Some(svc.host()))
        }
        _ => (orig, None),
    };
    let dst = state.workload(target.ip());
    if dst.is_none() && cluster_cidrs.iter().any(|c| c.contains(target.ip())) {
        return Err(Undecided::Unknown(target));
    }
    let src = state
        .local_workload(src_ip, node)
        .cloned()
        .ok_or(Undecided::Refused(ProxyError::NotLocalSource(src_ip)))?;
    let route = match dst {
        Some(w) if w.ambient && w.node == node => Route::SameNode(w.clone()),
        Some(w) if w.ambient => Route::Hbone(w.clone()),
        w => Route::Outside(w.cloned()),
    };
    Ok(Decision {
        src,
        target,
        service,
        route,
    })
}

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
    p.refuse_node_local(peer.ip(), orig)?;
    let td = p.td();
    let wait = p.cfg.discovery_wait;
    let resolved = resolve(&p.store, &p.cfg.cluster_cidrs, peer.ip(), orig, wait).await;
    let (
        state,
        Decision {
            src,
            target,
            service,
            route,
        },
    ) = match resolved {
        Ok(r) => r,
        Err(Undecided::NodeLocalEndpoint(target, why)) => {
            return Err(p.node_local_refusal(peer.ip(), target, why))
        }
        Err(Undecided::Unknown(target)) => return Err(ProxyError::UnknownInCluster(target, wait)),
        Err(Undecided::Refused(e)) => return Err(e),
    };
    let src_id = src.identity(td);
    let src_peer = peer_of(Some(&src), Some(peer), td);
    let dst_peer = peer_of(route.workload().map(|w| &**w), Some(target), td);
    match route {
        Route::SameNode(w) => {
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
        Route::Hbone(w) => {
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
        Route::Outside(_) => {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::{
        Endpoint, ManifestState, Service, ServicePort, Store, TargetPort, TelemetryNames,
        WorkloadSource,
    };

    fn pod(name: &str, ip: [u8; 4], node: &str, ambient: bool) -> Workload {
        Workload {
            uid: format!("uid-{name}"),
            name: name.into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: node.into(),
            ips: vec![IpAddr::from(ip)],
            labels: BTreeMap::new(),
            ambient,
            reported: true,
            source: WorkloadSource::Manifest,
            telemetry: TelemetryNames::default(),
        }
    }

    fn service(name: &str, vip: [u8; 4], endpoints: &[([u8; 4], bool)]) -> Service {
        let endpoints = endpoints
            .iter()
            .map(|(ip, ready)| Endpoint {
                ip: IpAddr::from(*ip),
                ready: *ready,
                ports: BTreeMap::new(),
            })
            .collect();
        let ports = vec![ServicePort {
            name: "http".into(),
            port: 80,
            target: TargetPort::Number(8080),
        }];
        Service::new(
            name.into(),
            "shop".into(),
            vec![IpAddr::from(vip)],
            ports,
            endpoints,
        )
    }

    /// The outcome, in words, so the table reads as the cases do.
    fn outcome(r: Result<Decision, Undecided>) -> String {
        match r {
            Ok(d) => {
                let route = match &d.route {
                    Route::SameNode(w) => format!("same-node {}", w.name),
                    Route::Hbone(w) => format!("hbone {}", w.name),
                    Route::Outside(Some(w)) => format!("outside {}", w.name),
                    Route::Outside(None) => "outside".into(),
                };
                let via = d.service.map(|s| format!(" via {s}")).unwrap_or_default();
                format!("{route} {}{via} from {}", d.target, d.src.name)
            }
            Err(Undecided::Unknown(t)) => format!("wait for {t}"),
            Err(Undecided::NodeLocalEndpoint(t, why)) => format!("node-local {t} {}", why.as_str()),
            Err(Undecided::Refused(e)) => format!("refused: {e}"),
        }
    }

    #[test]
    fn every_outbound_outcome() {
        let store = Store::new("n1", "cluster.local");
        store.set_manifest(ManifestState {
            workloads: vec![
                pod("client", [10, 1, 0, 2], "n1", true),
                pod("neighbour", [10, 1, 0, 3], "n1", true),
                pod("plain-here", [10, 1, 0, 4], "n1", false),
                pod("remote", [10, 2, 0, 2], "n2", true),
                pod("plain-there", [10, 2, 0, 3], "n2", false),
            ],
            services: vec![
                service(
                    "web",
                    [10, 96, 0, 10],
                    &[([10, 2, 0, 2], true), ([10, 2, 0, 9], false)],
                ),
                service("empty", [10, 96, 0, 11], &[([10, 2, 0, 2], false)]),
                service("host", [10, 96, 0, 12], &[([127, 0, 0, 1], true)]),
                service("gone", [10, 96, 0, 13], &[([10, 2, 0, 77], true)]),
                service("outer", [10, 96, 0, 14], &[([192, 0, 2, 8], true)]),
            ],
            ..Default::default()
        });
        let state = store.snapshot();
        let cidrs: Vec<IpPrefix> = vec!["10.0.0.0/8".parse().unwrap()];
        let client = IpAddr::from([10, 1, 0, 2]);
        let cases: &[(IpAddr, &str, &str)] = &[
            (
                client,
                "10.1.0.3:80",
                "same-node neighbour 10.1.0.3:80 from client",
            ),
            (
                client,
                "10.2.0.2:80",
                "hbone remote 10.2.0.2:80 from client",
            ),
            (
                client,
                "10.1.0.4:80",
                "outside plain-here 10.1.0.4:80 from client",
            ),
            (
                client,
                "10.2.0.3:80",
                "outside plain-there 10.2.0.3:80 from client",
            ),
            (client, "192.0.2.8:443", "outside 192.0.2.8:443 from client"),
            (
                client,
                "10.96.0.10:80",
                "hbone remote 10.2.0.2:8080 via web.shop.svc from client",
            ),
            (
                client,
                "10.96.0.10:81",
                "refused: service 10.96.0.10 has no ready endpoint for port 81",
            ),
            (
                client,
                "10.96.0.11:80",
                "refused: service 10.96.0.11 has no ready endpoint for port 80",
            ),
            (
                client,
                "10.96.0.12:80",
                "node-local 127.0.0.1:8080 loopback",
            ),
            (client, "10.96.0.13:80", "wait for 10.2.0.77:8080"),
            (
                client,
                "10.96.0.14:80",
                "outside 192.0.2.8:8080 via outer.shop.svc from client",
            ),
            (client, "10.3.0.1:80", "wait for 10.3.0.1:80"),
            // The source must be an ambient workload of this node.
            (
                IpAddr::from([10, 1, 0, 4]),
                "10.2.0.2:80",
                "refused: source 10.1.0.4 is not an enrolled workload on this node",
            ),
            (
                IpAddr::from([10, 2, 0, 2]),
                "10.1.0.3:80",
                "refused: source 10.2.0.2 is not an enrolled workload on this node",
            ),
        ];
        for (src, orig, want) in cases {
            let got = outcome(decide(&state, "n1", &cidrs, *src, orig.parse().unwrap()));
            assert_eq!(&got, want, "{src} -> {orig}");
        }
    }

    /// A destination created a moment ago is decided when the store learns it, not at the
    /// next poll; one that never appears is given up at the deadline. (Paused time: the
    /// elapsed times are exact.)
    #[tokio::test(start_paused = true)]
    async fn an_unknown_destination_waits_for_the_store_to_change() {
        let store = Store::new("n1", "cluster.local");
        let client = pod("client", [10, 1, 0, 2], "n1", true);
        store.set_manifest(ManifestState {
            workloads: vec![client.clone()],
            ..Default::default()
        });
        let cidrs: Vec<IpPrefix> = vec!["10.0.0.0/8".parse().unwrap()];
        let src = IpAddr::from([10, 1, 0, 2]);
        let orig: SocketAddr = "10.2.0.5:80".parse().unwrap();
        let wait = std::time::Duration::from_secs(2);
        let later = store.clone();
        let appear = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(137)).await;
            later.set_manifest(ManifestState {
                workloads: vec![client, pod("new", [10, 2, 0, 5], "n2", true)],
                ..Default::default()
            });
        });
        let start = tokio::time::Instant::now();
        let (_, d) = resolve(&store, &cidrs, src, orig, wait).await.unwrap();
        assert_eq!(start.elapsed(), std::time::Duration::from_millis(137));
        assert!(matches!(&d.route, Route::Hbone(w) if w.name == "new"));
        appear.await.unwrap();

        let start = tokio::time::Instant::now();
        let gone: SocketAddr = "10.2.0.6:80".parse().unwrap();
        let r = resolve(&store, &cidrs, src, gone, wait).await;
        assert!(matches!(r, Err(Undecided::Unknown(t)) if t == gone));
        assert_eq!(start.elapsed(), wait);
    }
}

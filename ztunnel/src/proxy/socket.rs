//! The socket factory: every socket ztunnel opens carries its mark; listeners use
//! SO_REUSEPORT (so a new ztunnel can start beside the old one); transparent sockets keep the
//! client's source address. All through `socket2`, no `unsafe` here.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot create a socket for {addr}")]
    Create {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot set {option} on the socket for {addr} (is ztunnel running with CAP_NET_ADMIN?)"
    )]
    Option {
        option: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind {addr} (is another process not sharing SO_REUSEPORT holding it?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("binding the transparent source {src} failed (is IP_TRANSPARENT allowed?)")]
    BindSource {
        src: IpAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the original destination of a captured connection")]
    OriginalDst(#[source] std::io::Error),
}

/// Creates sockets with ztunnel's mark.
#[derive(Debug, Clone)]
pub struct SocketFactory {
    pub mark: u32,
    pub connect_timeout: Duration,
}

/// Whether `e`, binding `addr`, says the node has no IPv6 (only for `[::]`).
fn no_ipv6(addr: SocketAddr, e: &SocketError) -> bool {
    if addr.ip() != std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
        return false;
    }
    let io = match e {
        SocketError::Create { source, .. } | SocketError::Bind { source, .. } => source,
        _ => return false,
    };
    matches!(
        io.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL) | Some(libc::EPROTONOSUPPORT)
    )
}

fn new_socket(addr: SocketAddr) -> Result<TcpSocket, SocketError> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    s.map_err(|source| SocketError::Create { addr, source })
}

impl SocketFactory {
    fn mark(&self, s: &TcpSocket, addr: SocketAddr) -> Result<(), SocketError> {
        if self.mark == 0 {
            return Ok(());
        }
        SockRef::from(s)
            .set_mark(self.mark)
            .map_err(|source| SocketError::Option {
                option: "SO_MARK",
                addr,
                source,
            })
    }

    /// A listener with SO_REUSEADDR, SO_REUSEPORT and the mark; an IPv6 one is IPv6 only
    /// (its IPv4 twin is a listener of its own).
    pub fn listen(&self, addr: SocketAddr) -> Result<TcpListener, SocketError> {
        self.listen_v6only(addr, true)
    }

    /// Listeners on `addrs`, where an unspecified IPv6 address (`[::]`) the node cannot bind
    /// (a kernel without IPv6) is left out, logged: the defaults listen on both families
    /// wherever the node has IPv6. Any other failure is an error.
    pub fn listen_all(&self, addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, SocketError> {
        let mut out = Vec::with_capacity(addrs.len());
        for &a in addrs {
            match self.listen(a) {
                Ok(l) => out.push(l),
                Err(e) if no_ipv6(a, &e) => {
                    tracing::info!(addr = %a, "no IPv6 on this node; not listening on it")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// One listener for an HTTP endpoint: `0.0.0.0:port` becomes a dual-stack `[::]:port`
    /// (IPv4 as mapped addresses) where the node has IPv6, so kubelet's probes and scrapes
    /// reach it on either family; any other address as given.
    pub fn listen_endpoint(&self, addr: SocketAddr) -> Result<TcpListener, SocketError> {
        if addr.ip() == std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
            let dual = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, addr.port()));
            match self.listen_v6only(dual, false) {
                Ok(l) => return Ok(l),
                Err(e) if no_ipv6(dual, &e) => {}
                Err(e) => return Err(e),
            }
        }
        self.listen(addr)
    }

    fn listen_v6only(&self, addr: SocketAddr, v6only: bool) -> Result<TcpListener, SocketError> {
        let s = new_socket(addr)?;
        let opt = |option: &'static str| {
            move |source| SocketError::Option {
                option,
                addr,
                source,
            }
        };
        s.set_reuseaddr(true).map_err(opt("SO_REUSEADDR"))?;
        s.set_reuseport(true).map_err(opt("SO_REUSEPORT"))?;
        if addr.is_ipv6() {
            SockRef::from(&s)
                .set_only_v6(v6only)
                .map_err(opt("IPV6_V6ONLY"))?;
        }
        self.mark(&s, addr)?;
        s.bind(addr)
            .map_err(|source| SocketError::Bind { addr, source })?;
        s.listen(1024)
            .map_err(|source| SocketError::Listen { addr, source })
    }

    async fn finish(&self, s: TcpSocket, addr: SocketAddr) -> Result<TcpStream, SocketError> {
        let stream = tokio::time::timeout(self.connect_timeout, s.connect(addr))
            .await
            .map_err(|_| SocketError::Timeout {
                addr,
                timeout: self.connect_timeout,
            })?
            .map_err(|source| SocketError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A marked outgoing connection.
    pub async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, SocketError> {
        let s = new_socket(addr)?;
        self.mark(&s, addr)?;
        self.finish(s, addr).await
    }

    /// A marked outgoing connection whose source address is `src` (a client pod's IP, not one
    /// of this host's): IP_TRANSPARENT / IPV6_TRANSPARENT, bind to `src`:0.
    pub async fn connect_transparent(
        &self,
        src: IpAddr,
        addr: SocketAddr,
    ) -> Result<TcpStream, SocketError> {
        let s = new_socket(addr)?;
        self.mark(&s, addr)?;
        let r = SockRef::from(&s);
        let res = if addr.is_ipv4() {
            r.set_ip_transparent_v4(true)
        } else {
            r.set_ip_transparent_v6(true)
        };
        res.map_err(|source| SocketError::Option {
            option: "IP_TRANSPARENT",
            addr,
            source,
        })?;
        s.bind(SocketAddr::new(src, 0))
            .map_err(|source| SocketError::BindSource { src, source })?;
        self.finish(s, addr).await
    }
}

/// The destination a captured (REDIRECTed) connection was originally sent to.
/// Falls back to the local address when the connection was not NATed (direct connections,
/// tests without capture).
pub fn original_dst(s: &TcpStream) -> Result<SocketAddr, SocketError> {
    let local = s.local_addr().map_err(SocketError::OriginalDst)?;
    let r = SockRef::from(s);
    let orig = if local.is_ipv4() {
        r.original_dst_v4()
    } else {
        r.original_dst_v6()
    };
    match orig {
        Ok(a) => a
            .as_socket()
            .map(canonical)
            .ok_or_else(|| SocketError::OriginalDst(std::io::Error::other("not an inet address"))),
        // ENOENT: no conntrack entry (not NATed); ENOPROTOOPT: conntrack absent.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENOPROTOOPT)
            ) =>
        {
            Ok(canonical(local))
        }
        Err(e) => Err(SocketError::OriginalDst(e)),
    }
}

/// Turns IPv4-mapped IPv6 addresses into IPv4 ones.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_listeners_share_a_port() {
        let f = SocketFactory {
            mark: 0,
            connect_timeout: Duration::from_secs(1),
        };
        let a = f.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let b = f.listen(addr).unwrap();
        assert_eq!(b.local_addr().unwrap(), addr);
        let c = f.connect(addr).await.unwrap();
        // Not NATed: the original destination is the address connected to.
        let accepted = tokio::select! {
            r = a.accept() => r.unwrap().0,
            r = b.accept() => r.unwrap().0,
        };
        assert_eq!(original_dst(&accepted).unwrap(), addr);
        drop(c);
    }

    #[test]
    fn maps_v4_mapped() {
        let a: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(canonical(a), "10.1.2.3:80".parse::<SocketAddr>().unwrap());
    }
}

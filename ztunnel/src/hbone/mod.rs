//! HBONE, the tunnel protocol: one HTTP/2 CONNECT stream per proxied TCP connection inside a
//! mutual-TLS 1.3 connection (ALPN `h2`) between ztunnels. The wire format is Istio's:
//! `:method CONNECT`, `:authority <destination-ip>:<port>`, status 200 to open, then DATA
//! frames carry the bytes; END_STREAM is a half-close.
//!
//! Layout: authority parsing and the tuned HTTP/2 builders here; `relay` moves bytes between
//! a TCP socket and a stream (or another socket) with half-close and live byte counters;
//! `pool` is the client side: pooled, multiplexed connections per [`PoolKey`].

mod pool;
mod relay;

use std::net::{IpAddr, SocketAddr};

pub use pool::{Dialer, HboneStream, Io, Lease, Pool, PoolError, PoolKey, PoolStats, TlsDialer};
pub use relay::{relay_h2, relay_tcp, H2Relay, TcpRelay};

/// Header carrying the original client address (`for="<ip>:<port>"`), as Istio's ztunnel
/// sends it.
pub const FORWARDED: &str = "forwarded";

/// Initial per-stream flow-control window (bytes).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Initial per-connection flow-control window (bytes).
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame either side sends.
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Most TLS records (bytes) rustls queues for the socket before a write must wait. rustls's
/// default, 64 KiB, splits every 128 KiB relay read into two or three socket writes; with
/// room for two reads, each read leaves in one `writev`. Only queued data uses it.
pub const TLS_SEND_BUFFER: usize = 256 * 1024;
/// Most concurrent streams the server accepts on one connection.
pub const SERVER_MAX_STREAMS: u32 = 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("CONNECT request has no authority")]
    Missing,
    #[error("authority {0:?} is not <ip>:<port> (HBONE addresses pods by IP)")]
    Shape(String),
    #[error("authority {0:?} has port 0")]
    PortZero(String),
    #[error("authority {0:?} is not a unicast address")]
    NotUnicast(String),
}

/// Parses a CONNECT authority: `10.0.0.5:8080` or `[fd00::5]:8080`; names are refused.
pub fn parse_authority(s: &str) -> Result<SocketAddr, AuthorityError> {
    if s.is_empty() {
        return Err(AuthorityError::Missing);
    }
    let addr: SocketAddr = s.parse().map_err(|_| AuthorityError::Shape(s.to_owned()))?;
    if addr.port() == 0 {
        return Err(AuthorityError::PortZero(s.to_owned()));
    }
    let ip = addr.ip();
    let bad = ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if bad {
        return Err(AuthorityError::NotUnicast(s.to_owned()));
    }
    Ok(addr)
}

/// Why an inbound CONNECT is answered 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("malformed authority")]
    Authority(#[source] AuthorityError),
    #[error("authority {0} is not the pod this connection was sent to ({1})")]
    OtherPod(SocketAddr, IpAddr),
}

/// The checks an inbound CONNECT passes before anything is dialed: the method, the authority's
/// shape, and that the authority names the pod the connection was addressed to.
pub fn check_connect(
    method: &http::Method,
    authority: Option<&str>,
    pod: IpAddr,
) -> Result<SocketAddr, RequestError> {
    if method != http::Method::CONNECT {
        return Err(RequestError::Method(method.to_string()));
    }
    let target = parse_authority(authority.unwrap_or("")).map_err(RequestError::Authority)?;
    if target.ip() != pod {
        return Err(RequestError::OtherPod(target, pod));
    }
    Ok(target)
}

/// Formats the authority for a destination.
pub fn authority(dst: SocketAddr) -> String {
    dst.to_string()
}

/// The `Forwarded` value naming the original client, as Istio's ztunnel sends it.
pub fn forwarded_header(client: SocketAddr) -> String {
    format!("for=\"{client}\"")
}

/// The client IP of the first `for=` element of a `Forwarded` header value (RFC 7239), in
/// any of its forms: `for=10.0.0.1`, `for="10.0.0.1:51812"`, `for="[fd00::1]"`,
/// `for="[fd00::1]:51812"`, the parameter name in any case. Obfuscated identifiers
/// (`unknown`, `_hidden`) give `None`.
pub fn parse_forwarded_for(v: &str) -> Option<IpAddr> {
    v.split([';', ',']).find_map(|part| {
        let (name, val) = part.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let val = val.trim();
        let val = val
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .unwrap_or(val);
        if let Some(rest) = val.strip_prefix('[') {
            // IPv6, optionally followed by `:port`.
            let (ip, after) = rest.split_once(']')?;
            let port_ok = after.is_empty()
                || after
                    .strip_prefix(':')
                    .is_some_and(|p| p.parse::<u16>().is_ok());
            if !port_ok {
                return None;
            }
            return ip.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
        }
        if let Ok(ip) = val.parse::<IpAddr>() {
            return Some(ip);
        }
        // IPv4 with a port.
        let (ip, port) = val.rsplit_once(':')?;
        port.parse::<u16>().ok()?;
        ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
    })
}

/// HTTP/2 client settings tuned for throughput.
pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_FRAME as usize)
        .enable_push(false);
    b
}

/// HTTP/2 server settings tuned for throughput.
pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_FRAME as usize)
        .max_concurrent_streams(SERVER_MAX_STREAMS);
    b
}

/// Converts an h2 error to an I/O error for the relay.
pub(crate) fn h2_io(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| std::io::Error::other("h2 I/O error"))
    } else {
        std::io::Error::other(e)
    }
}

#[cfg(test)]
mod tests;

//! Work done from inside a network namespace without spawning a process: [`in_ns`] runs a
//! closure on a fresh thread that entered the namespace (sockets it opens live there), so a
//! test can open thousands of connections from a pod, or read ztunnel's HTTP endpoints in a
//! node, at the cost of a thread rather than an `ip netns exec`. Plus [`http_get`], a minimal
//! HTTP/1.0 client for those endpoints, and [`transfer`], a large echo transfer checked with
//! SHA-256.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum InNsError {
    #[error("cannot open network namespace {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}")]
    Enter {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("the thread working in {0} panicked")]
    Panicked(String),
}

/// Runs `f` on a new thread that first entered the network namespace at `ns_path`
/// (`/run/netns/<name>`); returns what `f` returned.
pub fn in_ns<T: Send>(ns_path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, InNsError> {
    let path = ns_path.display().to_string();
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(ns_path).map_err(|source| InNsError::Open {
                path: path.clone(),
                source,
            })?;
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
                InNsError::Enter {
                    path: path.clone(),
                    source,
                }
            })?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(InNsError::Panicked(path.clone())))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("GET http://{addr}{path}: {source}")]
    Io {
        addr: SocketAddr,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GET http://{addr}{path}: no status line in {head:?}")]
    Malformed {
        addr: SocketAddr,
        path: String,
        head: String,
    },
}

/// A tiny HTTP/1.0 GET: `(status, body)`.
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), HttpError> {
    let io = |source| HttpError::Io {
        addr,
        path: path.to_owned(),
        source,
    };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    // One write: `write!` on a socket may split the request into several segments.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| HttpError::Malformed {
            addr,
            path: path.to_owned(),
            head: head.chars().take(200).collect(),
        })?;
    Ok((status, body.to_owned()))
}

/// Deterministic pseudo-random bytes (xorshift), so both ends of a transfer can be checked
/// without holding a copy of the data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// What [`transfer`] observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferReport {
    pub local: SocketAddr,
    pub sent: usize,
    pub received: usize,
    pub sent_sha256: String,
    pub received_sha256: String,
    pub elapsed: Duration,
}

impl TransferReport {
    pub fn intact(&self) -> bool {
        self.sent == self.received && self.sent_sha256 == self.received_sha256
    }
}

/// Connects to an echo server at `to`, writes `data` (from a second thread) while reading the
/// echo, half-closes, and hashes both directions.
pub fn transfer(to: SocketAddr, data: &[u8], timeout: Duration) -> std::io::Result<TransferReport> {
    let start = Instant::now();
    let s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let local = s.local_addr()?;
    let mut w = s.try_clone()?;
    let mut r = s;
    let sent_sha256 = hex(&Sha256::digest(data));
    let (received, received_sha256) = std::thread::scope(|sc| {
        let writer = sc.spawn(move || -> std::io::Result<()> {
            for chunk in data.chunks(64 * 1024) {
                w.write_all(chunk)?;
            }
            w.shutdown(Shutdown::Write)
        });
        let mut h = Sha256::new();
        let mut n = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        let read = loop {
            match r.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(k) => {
                    h.update(&buf[..k]);
                    n += k;
                }
                Err(e) => break Err(e),
            }
        };
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("writer panicked")));
        read.and(wrote).map(|()| (n, hex(&h.finalize())))
    })?;
    Ok(TransferReport {
        local,
        sent: data.len(),
        received,
        sent_sha256,
        received_sha256,
        elapsed: start.elapsed(),
    })
}

/// The SHA-256 of `data`, in hex: what tests compare instead of printing large buffers.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_through_a_loopback_echo_is_intact() {
        let l = crate::probe::bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || crate::probe::serve_echo(l));
        let data = pattern(7, 3 * 1024 * 1024 + 17);
        let r = transfer(addr, &data, Duration::from_secs(10)).unwrap();
        assert!(r.intact(), "{r:?}");
        assert_eq!(r.received, data.len());
    }

    #[test]
    fn pattern_is_deterministic() {
        assert_eq!(pattern(1, 64), pattern(1, 64));
        assert_ne!(pattern(1, 64), pattern(2, 64));
    }

    #[test]
    fn http_get_parses_status_and_body() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // Read the whole request before answering: closing with request bytes still
            // unread would reset the client's write (EPIPE) on a slow scheduler.
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                .unwrap();
        });
        let (status, body) = http_get(addr, "/x", Duration::from_secs(5)).unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, "ok\n");
    }
}

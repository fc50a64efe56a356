//! Small TCP tools for inside pod namespaces, behind the `netprobe` binary: an echo server, a
//! server that records each connection's original destination (`SO_ORIGINAL_DST`, what a
//! REDIRECT/DNAT capture preserves), and a client that sends bytes and checks the answer.
//!
//! Records are JSON lines ([`ConnRecord`]) so tests read them with [`read_records`].

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O with {addr} failed")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} answered {got:?}, expected {expected:?}")]
    Mismatch {
        addr: SocketAddr,
        expected: String,
        got: String,
    },
    #[error("cannot write {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line} is not a connection record")]
    BadRecord {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// One accepted connection as the recording server saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnRecord {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// `SO_ORIGINAL_DST`: the destination before NAT, when the connection was NATed (or the
    /// local address when it was not); `None` when the kernel has no conntrack entry.
    pub orig_dst: Option<SocketAddr>,
}

/// Binds `addr` (use port 0 for any) and writes the bound address to `ready_file` if given,
/// so a test can wait for it.
pub fn bind(addr: SocketAddr, ready_file: Option<&Path>) -> Result<TcpListener, ProbeError> {
    let l = TcpListener::bind(addr).map_err(|source| ProbeError::Bind { addr, source })?;
    if let Some(f) = ready_file {
        let bound = l
            .local_addr()
            .map_err(|source| ProbeError::Bind { addr, source })?;
        write_atomically(f, bound.to_string().as_bytes())?;
    }
    Ok(l)
}

fn write_atomically(path: &Path, body: &[u8]) -> Result<(), ProbeError> {
    let tmp = path.with_extension("tmp");
    let err = |source| ProbeError::Record {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, body).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Echoes every connection until the process is killed (one thread per connection).
pub fn serve_echo(l: TcpListener) {
    for s in l.incoming().flatten() {
        std::thread::spawn(move || echo(s));
    }
}

fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Both);
}

/// The original destination of an accepted connection: `getsockopt(SOL_IP, SO_ORIGINAL_DST)`
/// for IPv4, `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` for IPv6.
pub fn original_dst(s: &TcpStream) -> Option<SocketAddr> {
    if s.local_addr().ok()?.is_ipv6() {
        let sin6 = getsockopt(&s.as_fd(), sockopt::Ip6tOriginalDst).ok()?;
        let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        return Some(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(sin6.sin6_port),
            0,
            sin6.sin6_scope_id,
        )));
    }
    let sin = getsockopt(&s.as_fd(), sockopt::OriginalDst).ok()?;
    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Some(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(sin.sin_port),
    )))
}

/// Accepts connections, appends a [`ConnRecord`] line to `out` for each (before any data is
/// exchanged), then echoes. Runs until the process is killed.
pub fn serve_origdst(l: TcpListener, out: &Path) -> Result<(), ProbeError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(|source| ProbeError::Record {
            path: out.to_path_buf(),
            source,
        })?;
    let file = Arc::new(Mutex::new(file));
    for s in l.incoming().flatten() {
        let (Ok(peer), Ok(local)) = (s.peer_addr(), s.local_addr()) else {
            continue;
        };
        let rec = ConnRecord {
            peer,
            local,
            orig_dst: original_dst(&s),
        };
        let mut line = serde_json::to_vec(&rec).expect("a record always serializes");
        line.push(b'\n');
        file.lock()
            .unwrap()
            .write_all(&line)
            .map_err(|source| ProbeError::Record {
                path: out.to_path_buf(),
                source,
            })?;
        std::thread::spawn(move || echo(s));
    }
    Ok(())
}

/// Reads the records written by [`serve_origdst`] (a missing file is no records yet).
pub fn read_records(path: &Path) -> Result<Vec<ConnRecord>, ProbeError> {
    let body = match std::fs::read_to_string(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ProbeError::Record {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    body.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| ProbeError::BadRecord {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// What [`connect`] observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReport {
    pub local: SocketAddr,
    pub received: String,
    pub connect_us: u64,
    pub total_us: u64,
}

/// Connects, sends `send`, reads its echo, then resets the connection (SO_LINGER 0 and
/// close: an RST instead of a FIN), as an application that aborts its connection does.
pub fn connect_then_reset(
    to: SocketAddr,
    send: &[u8],
    timeout: Duration,
) -> Result<(), ProbeError> {
    let io = |source| ProbeError::Io { addr: to, source };
    let mut s = TcpStream::connect_timeout(&to, timeout)
        .map_err(|source| ProbeError::Connect { addr: to, source })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.write_all(send).map_err(io)?;
    let mut got = 0;
    let mut buf = [0u8; 4096];
    while got < send.len() {
        match s.read(&mut buf).map_err(io)? {
            0 => break,
            n => got += n,
        }
    }
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&s.as_fd(), sockopt::Linger, &linger)
        .map_err(|e| io(std::io::Error::from(e)))?;
    drop(s);
    Ok(())
}

/// Connects to `to`, sends `send`, half-closes, and reads until `expect.len()` bytes arrived
/// (or EOF); fails unless they equal `expect` (when given).
pub fn connect(
    to: SocketAddr,
    send: &[u8],
    expect: Option<&[u8]>,
    timeout: Duration,
) -> Result<ConnectReport, ProbeError> {
    let io = |source| ProbeError::Io { addr: to, source };
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&to, timeout)
        .map_err(|source| ProbeError::Connect { addr: to, source })?;
    let connect_us = start.elapsed().as_micros() as u64;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let local = s.local_addr().map_err(io)?;
    s.write_all(send).map_err(io)?;
    let want = expect.map_or(send.len(), <[u8]>::len);
    let mut got = Vec::with_capacity(want);
    let mut buf = [0u8; 4096];
    while got.len() < want {
        match s.read(&mut buf).map_err(io)? {
            0 => break,
            n => got.extend_from_slice(&buf[..n]),
        }
    }
    let _ = s.shutdown(Shutdown::Both);
    let received = String::from_utf8_lossy(&got).into_owned();
    if let Some(e) = expect {
        if got != e {
            return Err(ProbeError::Mismatch {
                addr: to,
                expected: String::from_utf8_lossy(e).into_owned(),
                got: received,
            });
        }
    }
    Ok(ConnectReport {
        local,
        received,
        connect_us,
        total_us: start.elapsed().as_micros() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_and_record_on_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let out = dir.path().join("records.jsonl");
        let l = bind("127.0.0.1:0".parse().unwrap(), Some(&ready)).unwrap();
        let addr: SocketAddr = std::fs::read_to_string(&ready).unwrap().parse().unwrap();
        let out2 = out.clone();
        std::thread::spawn(move || serve_origdst(l, &out2));
        let r = connect(addr, b"ping", Some(b"ping"), Duration::from_secs(5)).unwrap();
        assert_eq!(r.received, "ping");
        let recs = read_records(&out).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].peer, r.local);
        assert_eq!(recs[0].local, addr);
        // Loopback is not NATed: the original destination, if reported, is the local address.
        if let Some(o) = recs[0].orig_dst {
            assert_eq!(o, addr);
        }
    }

    #[test]
    fn mismatch_is_an_error() {
        let l = bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || serve_echo(l));
        let e = connect(addr, b"abc", Some(b"xyz"), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, ProbeError::Mismatch { .. }), "{e}");
    }

    #[test]
    fn bad_record_file_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        std::fs::write(&p, "{}\n").unwrap();
        let e = read_records(&p).unwrap_err();
        assert!(matches!(e, ProbeError::BadRecord { line: 1, .. }));
        assert!(read_records(&dir.path().join("missing"))
            .unwrap()
            .is_empty());
    }
}

//! `netprobe`: TCP tools run inside test namespaces (`ip netns exec <ns> netprobe ...`).
//! See `ambient_tests::probe`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambient_tests::probe;
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "TCP probes for the ambient test harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo every connection.
    ListenEcho {
        #[arg(long, default_value = "0.0.0.0")]
        addr: std::net::IpAddr,
        #[arg(long)]
        port: u16,
        /// Written with the bound address once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Record (peer, local, SO_ORIGINAL_DST) of each connection as JSON lines, then echo.
    ListenOrigdst {
        #[arg(long, default_value = "0.0.0.0")]
        addr: std::net::IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Connect, send, check the answer; prints a JSON report, exits non-zero on failure.
    /// Sends raw Ethernet frames on an interface (AF_PACKET): what a pod with CAP_NET_RAW can
    /// put on its link, whatever its kernel's stack would have sent.
    Frame {
        #[arg(long)]
        dev: String,
        /// The whole frame in hex, from the destination MAC on (no FCS).
        #[arg(long)]
        hex: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Binds `addr:port` with SO_REUSEPORT (joining any group the kernel lets it join) and
    /// records every connection it accepts, as `listen-origdst` does. Exits 3 when the bind
    /// is refused.
    ListenReuseport {
        #[arg(long)]
        addr: std::net::IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Forwards every frame arriving on `--from` out of `--to` behind an 802.1Q tag (until
    /// killed): a pod's own stack, sending through a veth whose peer this reads, then puts
    /// tagged frames on its link as a pod with CAP_NET_RAW could.
    VlanRelay {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 0)]
        vid: u16,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "ping")]
        send: String,
        /// Expected answer (defaults to the echo of --send).
        #[arg(long)]
        expect: Option<String>,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::ListenEcho {
            addr,
            port,
            ready_file,
        } => {
            let l = probe::bind(SocketAddr::new(addr, port), ready_file.as_deref())?;
            probe::serve_echo(l);
        }
        Cmd::ListenOrigdst {
            addr,
            port,
            out,
            ready_file,
        } => {
            let l = probe::bind(SocketAddr::new(addr, port), ready_file.as_deref())?;
            probe::serve_origdst(l, &out)?;
        }
        Cmd::Frame { dev, hex, count } => {
            let frame = decode_hex(&hex).context("--hex")?;
            for _ in 0..count {
                raw::send_frame(&dev, &frame).with_context(|| format!("frame on {dev}"))?;
            }
        }
        Cmd::ListenReuseport {
            addr,
            port,
            out,
            ready_file,
        } => {
            let l = match reuseport_listener(SocketAddr::new(addr, port)) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("bind {addr}:{port} with SO_REUSEPORT: {e}");
                    std::process::exit(3);
                }
            };
            if let Some(f) = ready_file {
                std::fs::write(f, b"ready")?;
            }
            probe::serve_origdst(l, &out)?;
        }
        Cmd::VlanRelay {
            from,
            to,
            vid,
            ready_file,
        } => {
            let rx = raw::PacketSocket::bind(&from).with_context(|| format!("listen on {from}"))?;
            let tx = raw::PacketSocket::bind(&to).with_context(|| format!("send on {to}"))?;
            if let Some(f) = ready_file {
                std::fs::write(f, b"ready")?;
            }
            let mut buf = vec![0u8; 65536];
            loop {
                let n = rx.recv(&mut buf)?;
                if n < 14 {
                    continue;
                }
                let mut frame = Vec::with_capacity(n + 4);
                frame.extend_from_slice(&buf[..12]);
                frame.extend_from_slice(&[0x81, 0x00]);
                frame.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
                frame.extend_from_slice(&buf[12..n]);
                tx.send(&frame)?;
            }
        }
        Cmd::Connect {
            to,
            send,
            expect,
            timeout_ms,
        } => {
            let expect = expect.unwrap_or_else(|| send.clone());
            let r = probe::connect(
                to,
                send.as_bytes(),
                Some(expect.as_bytes()),
                Duration::from_millis(timeout_ms),
            )
            .with_context(|| format!("probe to {to}"))?;
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}

fn reuseport_listener(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrStorage,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    listen(&fd, Backlog::new(128)?)?;
    Ok(std::net::TcpListener::from(fd))
}

fn decode_hex(s: &str) -> anyhow::Result<Vec<u8>> {
    let s: String = s
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    anyhow::ensure!(s.len() % 2 == 0, "odd number of hex digits");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("not hex"))
        .collect()
}

/// The one place the harness writes to a packet socket.
#[allow(unsafe_code)]
mod raw {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    pub fn send_frame(dev: &str, frame: &[u8]) -> io::Result<()> {
        PacketSocket::bind(dev)?.send(frame)
    }

    /// A packet socket bound to one interface, receiving every protocol.
    pub struct PacketSocket {
        fd: OwnedFd,
    }

    impl PacketSocket {
        pub fn bind(dev: &str) -> io::Result<Self> {
            let ifindex = nix::net::if_::if_nametoindex(dev).map_err(io::Error::from)?;
            let all = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: socket(2) with constant arguments; the result is checked before use and
            // owned (closed on drop) right away.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(all),
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = all;
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: the address is valid for the length given, for the call.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Self { fd })
        }

        pub fn send(&self, frame: &[u8]) -> io::Result<()> {
            // SAFETY: the buffer is valid for its length, for the call.
            let n =
                unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }

        pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            // SAFETY: the buffer is valid and writable for its length, for the call.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(n as usize)
        }
    }
}

//! Packet capture on a namespace's interface, to show what crosses a link: [`Capture`] runs
//! `tcpdump -U -w` inside the namespace (registered with the namespace guard) and
//! [`parse_pcap`] reads the file into [`Packet`]s (Ethernet, IPv4/IPv6, TCP/UDP), so a test
//! can assert for instance that a plaintext marker never crossed the underlay, or that every
//! TCP segment between nodes went to port 15008.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use crate::netns::{NetNs, NetNsError};

/// IP protocol numbers.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot start tcpdump")]
    Start(#[source] NetNsError),
    #[error("tcpdump did not start listening on {ifname}: {detail}")]
    NotListening { ifname: String, detail: String },
    #[error("cannot read capture {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the capture never met the expected condition: {detail}")]
    Incomplete {
        detail: String,
        packets: Vec<Packet>,
    },
    #[error("capture is not a pcap file: {0}")]
    Format(String),
}

/// A running capture. [`Capture::finish`] stops it and returns the packets; dropping the
/// namespace guard stops it too.
#[derive(Debug)]
pub struct Capture {
    pid: u32,
    file: PathBuf,
}

impl Capture {
    /// Starts `tcpdump -i <ifname> -U -s 0 -w <file> <filter>` in `ns` and waits until it
    /// listens (so no packet sent after this returns is missed).
    pub fn start(
        ns: &NetNs,
        ifname: &str,
        filter: &str,
        file: &Path,
    ) -> Result<Self, CaptureError> {
        let mut cmd = ns.command("tcpdump");
        // Immediate mode: packets reach tcpdump (and, with -U, the file) as they arrive, not
        // when a ring-buffer block fills or times out.
        cmd.args([
            "-i",
            ifname,
            "--immediate-mode",
            "-U",
            "-n",
            "-s",
            "0",
            "-w",
        ])
        .arg(file)
        .args(filter.split_whitespace())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        // tcpdump says "listening on <if>" on stderr once the capture is open.
        let (tx, rx) = mpsc::channel();
        let pid = ns.spawn_with(&mut cmd, |child| {
            if let Some(err) = child.stderr.take() {
                std::thread::spawn(move || {
                    for line in BufReader::new(err).lines().map_while(Result::ok) {
                        let _ = tx.send(line);
                    }
                });
            }
        });
        let pid = pid.map_err(CaptureError::Start)?;
        let mut seen = String::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains("listening on") => break,
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(_) => {
                    ns.stop(pid);
                    return Err(CaptureError::NotListening {
                        ifname: ifname.to_owned(),
                        detail: seen,
                    });
                }
            }
        }
        Ok(Self {
            pid,
            file: file.to_path_buf(),
        })
    }

    /// The packets written so far (the capture goes on). tcpdump writes each packet shortly
    /// after it crossed the interface, not at once: poll this with
    /// [`crate::netns::eventually`] until the packet a test waits for is there, and only then
    /// check for what must be absent.
    pub fn packets(&self) -> Result<Vec<Packet>, CaptureError> {
        let bytes = std::fs::read(&self.file).map_err(|source| CaptureError::Read {
            path: self.file.clone(),
            source,
        })?;
        parse_pcap(&bytes)
    }

    /// Waits (up to `deadline`) until `done` holds for the packets captured so far, then stops
    /// tcpdump and returns everything it wrote.
    pub fn finish_when(
        self,
        ns: &NetNs,
        deadline: Duration,
        done: impl Fn(&[Packet]) -> bool,
    ) -> Result<Vec<Packet>, CaptureError> {
        let waited = crate::netns::eventually(deadline, || match self.packets() {
            Ok(p) if done(&p) => Ok(()),
            Ok(p) => Err(format!("{} packets, condition not met yet", p.len())),
            Err(e) => Err(e.to_string()),
        });
        ns.stop(self.pid);
        let packets = self.packets()?;
        match waited {
            Ok(()) => Ok(packets),
            Err(e) => Err(CaptureError::Incomplete {
                detail: e.to_string(),
                packets,
            }),
        }
    }

    /// Stops tcpdump (SIGTERM) and returns what it wrote. Packets of the last milliseconds may
    /// be missing: prefer [`Capture::finish_when`].
    pub fn finish(self, ns: &NetNs) -> Result<Vec<Packet>, CaptureError> {
        ns.stop(self.pid);
        self.packets()
    }
}

/// One captured IP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// TCP/UDP ports (0 for other protocols).
    pub sport: u16,
    pub dport: u16,
    /// Transport payload (after the TCP/UDP header), or the IP payload for other protocols.
    pub payload: Vec<u8>,
}

/// True when `needle` occurs in any packet's payload.
pub fn payload_contains(packets: &[Packet], needle: &[u8]) -> bool {
    !needle.is_empty()
        && packets
            .iter()
            .any(|p| p.payload.windows(needle.len()).any(|w| w == needle))
}

const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW: u32 = 101;
const LINKTYPE_LINUX_SLL: u32 = 113;

/// Parses a classic pcap file (either byte order, micro- or nanosecond timestamps) with
/// Ethernet, raw IP or Linux "cooked" link types. Non-IP frames are skipped.
pub fn parse_pcap(b: &[u8]) -> Result<Vec<Packet>, CaptureError> {
    if b.len() < 24 {
        return Err(CaptureError::Format(format!(
            "{} bytes, no header",
            b.len()
        )));
    }
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => return Err(CaptureError::Format(format!("bad magic {m:#x}"))),
    };
    let u32_at = |o: usize| {
        let a = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = u32_at(20);
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= b.len() {
        let incl = u32_at(off + 8) as usize;
        let start = off + 16;
        let Some(frame) = b.get(start..start + incl) else {
            break; // truncated last record: tcpdump was stopped mid-write
        };
        let ip = match linktype {
            LINKTYPE_ETHERNET => ethernet_payload(frame),
            LINKTYPE_RAW => Some(frame),
            LINKTYPE_LINUX_SLL => frame.get(16..),
            other => return Err(CaptureError::Format(format!("link type {other}"))),
        };
        if let Some(p) = ip.and_then(parse_ip) {
            out.push(p);
        }
        off = start + incl;
    }
    Ok(out)
}

fn ethernet_payload(f: &[u8]) -> Option<&[u8]> {
    let mut ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let mut off = 14;
    // One VLAN tag.
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
        off = 18;
    }
    matches!(ethertype, 0x0800 | 0x86dd)
        .then(|| f.get(off..))
        .flatten()
}

fn parse_ip(p: &[u8]) -> Option<Packet> {
    match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
            let protocol = *p.get(9)?;
            let src = IpAddr::from(<[u8; 4]>::try_from(p.get(12..16)?).ok()?);
            let dst = IpAddr::from(<[u8; 4]>::try_from(p.get(16..20)?).ok()?);
            let body = p.get(ihl..total.min(p.len()))?;
            Some(transport(src, dst, protocol, body))
        }
        6 => {
            let len = usize::from(u16::from_be_bytes([*p.get(4)?, *p.get(5)?]));
            let protocol = *p.get(6)?; // extension headers are not followed
            let src = IpAddr::from(<[u8; 16]>::try_from(p.get(8..24)?).ok()?);
            let dst = IpAddr::from(<[u8; 16]>::try_from(p.get(24..40)?).ok()?);
            let body = p.get(40..(40 + len).min(p.len()))?;
            Some(transport(src, dst, protocol, body))
        }
        _ => None,
    }
}

fn transport(src: IpAddr, dst: IpAddr, protocol: u8, body: &[u8]) -> Packet {
    let ports = |b: &[u8]| {
        (b.len() >= 4).then(|| {
            (
                u16::from_be_bytes([b[0], b[1]]),
                u16::from_be_bytes([b[2], b[3]]),
            )
        })
    };
    let (sport, dport, payload) = match protocol {
        TCP => {
            let (s, d) = ports(body).unwrap_or_default();
            let hl = body.get(12).map_or(0, |x| usize::from(x >> 4) * 4);
            (s, d, body.get(hl..).unwrap_or_default().to_vec())
        }
        UDP => {
            let (s, d) = ports(body).unwrap_or_default();
            (s, d, body.get(8..).unwrap_or_default().to_vec())
        }
        _ => (0, 0, body.to_vec()),
    };
    Packet {
        src,
        dst,
        protocol,
        sport,
        dport,
        payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&4u16.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&65535u32.to_le_bytes());
        b.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        for f in frames {
            b.extend_from_slice(&[0; 8]);
            b.extend_from_slice(&(f.len() as u32).to_le_bytes());
            b.extend_from_slice(&(f.len() as u32).to_le_bytes());
            b.extend_from_slice(f);
        }
        b
    }

    fn tcp4(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = 20 + 20 + payload.len();
        let mut ip = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            TCP,
            0,
            0,
        ];
        ip.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&sport.to_be_bytes());
        tcp.extend_from_slice(&dport.to_be_bytes());
        tcp.extend_from_slice(&[0; 8]);
        tcp.push(5 << 4);
        tcp.extend_from_slice(&[0; 7]);
        f.extend(ip);
        f.extend(tcp);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn parses_tcp_over_ethernet() {
        let b = pcap(&[
            tcp4(40000, 15008, b"\x16\x03\x01"),
            tcp4(40001, 80, b"GET /secret"),
        ]);
        let p = parse_pcap(&b).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].dport, 15008);
        assert_eq!(p[0].src, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(p[1].payload, b"GET /secret");
        assert!(payload_contains(&p, b"secret"));
        assert!(!payload_contains(&p, b"absent"));
        assert!(!payload_contains(&p, b""));
    }

    #[test]
    fn every_truncation_is_handled() {
        let b = pcap(&[tcp4(1, 2, b"payload")]);
        for end in 0..b.len() {
            let _ = parse_pcap(&b[..end]);
        }
        assert!(parse_pcap(&[0u8; 24]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_frames_never_panic(frames in proptest::collection::vec(
            proptest::collection::vec(proptest::num::u8::ANY, 0..80), 0..4)) {
            let _ = parse_pcap(&pcap(&frames));
        }
    }
}

//! Observing a running cluster from outside its processes: what crossed the underlay
//! ([`UnderlaySummary`], [`ambient_plaintext`], [`finish_quiet`] for a capture), a process's
//! resident memory ([`rss_kb`]) and the end of a log file ([`tail`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use crate::capture::{Capture, Packet, TCP};
use crate::netns::NetNs;

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let body = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = body.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// What crossed the underlay, grouped by flow.
#[derive(Debug, Clone, Default)]
pub struct UnderlaySummary {
    /// (src ip, dst ip, server port) -> (packets, payload bytes).
    pub flows: BTreeMap<(IpAddr, IpAddr, u16), (u64, u64)>,
}

impl UnderlaySummary {
    /// Groups TCP packets by (src, dst, the lower of the two ports: the server's).
    pub fn from_packets(packets: &[Packet]) -> Self {
        let mut s = Self::default();
        for p in packets.iter().filter(|p| p.protocol == TCP) {
            let port = p.sport.min(p.dport);
            let e = s.flows.entry((p.src, p.dst, port)).or_default();
            e.0 += 1;
            e.1 += p.payload.len() as u64;
        }
        s
    }
}

/// Packets that carry TCP payload to or from an ambient pod address outside HBONE (port
/// `hbone_port` on the pod side): a plaintext leak of an ambient pod.
pub fn ambient_plaintext<'a>(
    packets: &'a [Packet],
    ambient: &[Ipv4Addr],
    hbone_port: u16,
) -> Vec<&'a Packet> {
    let is_amb = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) => ambient.contains(v4),
        IpAddr::V6(_) => false,
    };
    packets
        .iter()
        .filter(|p| p.protocol == TCP && !p.payload.is_empty())
        .filter(|p| {
            (is_amb(&p.src) && p.sport != hbone_port) || (is_amb(&p.dst) && p.dport != hbone_port)
        })
        .collect()
}

/// Stops a capture once nothing new was written for `quiet` (tcpdump writes with a lag), at
/// most after `deadline`; returns the packets. Errors carry no packet dump.
pub fn finish_quiet(
    cap: Capture,
    ns: &NetNs,
    quiet: Duration,
    deadline: Duration,
) -> Result<Vec<Packet>, String> {
    let start = std::time::Instant::now();
    let mut last = usize::MAX;
    let mut since = std::time::Instant::now();
    loop {
        let n = cap.packets().map_err(|e| e.to_string())?.len();
        if n != last {
            last = n;
            since = std::time::Instant::now();
        } else if since.elapsed() >= quiet || start.elapsed() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cap.finish(ns).map_err(|e| e.to_string())
}

/// Reads the RSS of a process in kB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_detection_ignores_hbone_and_empty_segments() {
        let amb: Ipv4Addr = "10.1.2.2".parse().unwrap();
        let node: IpAddr = "10.1.0.1".parse().unwrap();
        let pkt = |src: IpAddr, dst: IpAddr, sport, dport, payload: &[u8]| Packet {
            src,
            dst,
            protocol: TCP,
            sport,
            dport,
            payload: payload.to_vec(),
        };
        let packets = vec![
            pkt(node, amb.into(), 40000, 15008, b"\x16\x03"),
            pkt(amb.into(), node, 15008, 40000, b"\x17\x03"),
            pkt(node, amb.into(), 40001, 8080, b""),
            pkt(node, amb.into(), 40001, 8080, b"secret"),
        ];
        let leaks = ambient_plaintext(&packets, &[amb], 15008);
        assert_eq!(leaks.len(), 1);
        assert_eq!(leaks[0].payload, b"secret");
        let s = UnderlaySummary::from_packets(&packets);
        assert_eq!(s.flows[&(node, amb.into(), 15008)], (1, 2));
    }
}

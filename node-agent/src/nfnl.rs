//! Netfilter netlink plumbing shared by the nftables element writer (`nft::netlink`) and the
//! ipset client (`ipt::ipset`): one socket type, one message builder, one reply reader.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

// linux/netlink.h
pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_F_NET_BYTEORDER: u16 = 0x4000;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

const RECV_BUF: usize = 64 * 1024;
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netfilter netlink socket: {0}")]
    Socket(#[source] Errno),
    #[error("netlink send failed: {0}")]
    Send(#[source] Errno),
    #[error("netlink receive failed: {0}")]
    Recv(#[source] Errno),
    #[error("no reply from the kernel within {0:?}")]
    Timeout(Duration),
    #[error("malformed netlink reply")]
    Malformed,
    /// The kernel refused the request; what it refused was not applied.
    #[error("{0}")]
    Refused(String),
}

/// A netfilter netlink socket in the network namespace it was created in.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    pub fn open() -> Result<Self, NetlinkError> {
        Self::open_protocol(SockProtocol::NetlinkNetFilter)
    }

    /// A socket of another netlink protocol (`NetlinkRoute` for link changes).
    pub fn open_protocol(protocol: SockProtocol) -> Result<Self, NetlinkError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            protocol,
        )
        .map_err(NetlinkError::Socket)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(NetlinkError::Socket)?;
        let timeout = TimeVal::new(REPLY_TIMEOUT.as_secs() as _, 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(NetlinkError::Socket)?;
        // Start somewhere unlikely to meet replies meant for an earlier socket's requests.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Ok(Self {
            fd,
            seq,
            buf: vec![0; RECV_BUF],
        })
    }

    /// The sequence number the next request should carry.
    pub fn next_seq(&self) -> u32 {
        self.seq.wrapping_add(1)
    }

    /// Records that requests up to sequence number `last` were sent.
    pub fn used_through(&mut self, last: u32) {
        self.seq = last;
    }

    pub fn send(&self, bytes: &[u8]) -> Result<(), NetlinkError> {
        sendto(
            self.fd.as_raw_fd(),
            bytes,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map(drop)
        .map_err(NetlinkError::Send)
    }

    /// One datagram from the kernel.
    pub fn recv(&mut self) -> Result<&[u8], NetlinkError> {
        loop {
            match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => return Ok(&self.buf[..n]),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(NetlinkError::Timeout(REPLY_TIMEOUT)),
                Err(e) => return Err(NetlinkError::Recv(e)),
            }
        }
    }
}

/// A message being written: header and nfgenmsg now, length at the end.
pub struct Msg {
    start: usize,
}

impl Msg {
    pub fn begin(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8) -> Msg {
        let start = out.len();
        out.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in end()
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        out.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg: family, version 0, res_id 0
        Msg { start }
    }

    /// Sets nfgenmsg.res_id (big endian): the subsystem, for batch control messages.
    pub fn res_id(&self, out: &mut [u8], id: u16) {
        let at = self.start + NLMSG_HDRLEN + 2;
        out[at..at + 2].copy_from_slice(&id.to_be_bytes());
    }

    pub fn end(self, out: &mut [u8]) {
        let len = (out.len() - self.start) as u32;
        out[self.start..self.start + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

pub fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

pub fn put(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    pad4(out);
}

pub fn put_str(out: &mut Vec<u8>, kind: u16, s: &str) {
    let mut b = Vec::with_capacity(s.len() + 1);
    b.extend_from_slice(s.as_bytes());
    b.push(0);
    put(out, kind, &b);
}

pub fn nest_begin(out: &mut Vec<u8>, kind: u16) -> usize {
    let at = out.len();
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    at
}

pub fn nest_end(out: &mut [u8], at: usize) {
    let len = (out.len() - at) as u16;
    out[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

/// One message of a datagram: type, flags, sequence number, and what follows the header.
pub struct Reply<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub body: &'a [u8],
}

/// The messages of a datagram.
pub fn messages(mut data: &[u8]) -> Result<Vec<Reply<'_>>, NetlinkError> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(NetlinkError::Malformed);
        }
        out.push(Reply {
            kind: u16::from_ne_bytes(data[4..6].try_into().unwrap()),
            flags: u16::from_ne_bytes(data[6..8].try_into().unwrap()),
            seq: u32::from_ne_bytes(data[8..12].try_into().unwrap()),
            body: &data[NLMSG_HDRLEN..len],
        });
        let aligned = (len + 3) & !3;
        data = &data[aligned.min(data.len())..];
    }
    Ok(out)
}

/// The error code of an NLMSG_ERROR body (0 is an acknowledgement) and the sequence number
/// of the request it answers.
pub fn error_of(body: &[u8]) -> Result<(u32, i32), NetlinkError> {
    // struct nlmsgerr: int error; struct nlmsghdr msg (the request's header).
    if body.len() < 4 + NLMSG_HDRLEN {
        return Err(NetlinkError::Malformed);
    }
    let code = i32::from_ne_bytes(body[0..4].try_into().unwrap());
    let seq = u32::from_ne_bytes(body[4 + 8..4 + 12].try_into().unwrap());
    Ok((seq, code))
}

/// (sequence number, error code) of every NLMSG_ERROR message in a datagram; code 0 is
/// an acknowledgement.
pub fn parse_acks(data: &[u8]) -> Result<Vec<(u32, i32)>, NetlinkError> {
    messages(data)?
        .into_iter()
        .filter(|m| m.kind == NLMSG_ERROR)
        .map(|m| error_of(m.body))
        .collect()
}

/// The attributes in `data`: (type without the nested and byte-order flags, payload).
pub fn attrs(mut data: &[u8]) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes(data[0..2].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(data[2..4].try_into().unwrap()) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return Err(NetlinkError::Malformed);
        }
        out.push((kind, &data[4..len]));
        let aligned = (len + 3) & !3;
        data = &data[aligned.min(data.len())..];
    }
    Ok(out)
}

/// A NUL-terminated string attribute.
pub fn attr_str(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_and_errors_are_read_by_sequence() {
        let mut d = Vec::new();
        for (seq, code) in [(7u32, 0i32), (8, -2)] {
            d.extend_from_slice(&36u32.to_ne_bytes());
            d.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            d.extend_from_slice(&[0; 10]);
            d.extend_from_slice(&code.to_ne_bytes());
            d.extend_from_slice(&[0; 8]);
            d.extend_from_slice(&seq.to_ne_bytes());
            d.extend_from_slice(&[0; 4]);
        }
        assert_eq!(parse_acks(&d).unwrap(), vec![(7, 0), (8, -2)]);
        assert!(parse_acks(&d[..20]).is_err() || parse_acks(&d[..20]).unwrap().is_empty());
        let mut bad = d.clone();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_acks(&bad).is_err());
    }

    #[test]
    fn attributes_round_trip_with_nesting_and_padding() {
        let mut out = Vec::new();
        put_str(&mut out, 2, "set");
        let n = nest_begin(&mut out, 7);
        put(&mut out, 3 | NLA_F_NET_BYTEORDER, &[1, 2, 3]);
        nest_end(&mut out, n);
        let top = attrs(&out).unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].0, attr_str(top[0].1).as_str()), (2, "set"));
        assert_eq!(top[1].0, 7);
        let inner = attrs(top[1].1).unwrap();
        assert_eq!(inner, vec![(3, &[1u8, 2, 3][..])]);
        let mut bad = out.clone();
        bad[0..2].copy_from_slice(&200u16.to_ne_bytes());
        assert!(attrs(&bad).is_err());
    }
}

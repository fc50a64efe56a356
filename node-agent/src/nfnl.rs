//! Netfilter netlink plumbing shared by the nftables element writer (`nft::netlink`) and the
//! ipset client (`ipt::ipset`), and the rtnetlink readers (`ipt::links`, `bypass`): one socket
//! type and the nfgenmsg header; the wire format is `ambient_common::netlink`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

pub use ambient_common::netlink::{
    attr_str, attrs, error_of, messages, nest_begin, nest_end, pad4, put, put_str, Malformed,
    NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, NLM_F_ACK,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_MULTI, NLM_F_REQUEST,
};

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
    #[error(transparent)]
    Malformed(#[from] Malformed),
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

/// A netfilter message being written: the netlink header and `struct nfgenmsg` now, the
/// length at [`Msg::end`].
pub struct Msg(ambient_common::netlink::Msg);

impl Msg {
    pub fn begin(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8) -> Msg {
        let msg = ambient_common::netlink::Msg::begin(out, kind, flags, seq);
        out.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg: family, version 0, res_id 0
        Msg(msg)
    }

    /// Sets nfgenmsg.res_id (big endian): the subsystem, for batch control messages.
    pub fn res_id(&self, out: &mut [u8], id: u16) {
        let at = self.0.body_at() + 2;
        out[at..at + 2].copy_from_slice(&id.to_be_bytes());
    }

    pub fn end(self, out: &mut [u8]) {
        self.0.end(out)
    }
}

/// (sequence number, error code) of every NLMSG_ERROR message in a datagram; code 0 is
/// an acknowledgement.
pub fn parse_acks(data: &[u8]) -> Result<Vec<(u32, i32)>, NetlinkError> {
    Ok(ambient_common::netlink::acks(data)?)
}

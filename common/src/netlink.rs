//! The netlink wire format (`linux/netlink.h`, the rtnetlink parts of `linux/rtnetlink.h`
//! and `linux/if_link.h`): message headers and attributes, built into and read from plain
//! byte buffers with bounds checks, never by pointer casts. The one codec of the project:
//! the CNI plugin's link lookup, and the node agent's nftables, ipset, link-group, address
//! and tc-filter requests all use it; the sockets stay with their users. Every reader
//! returns [`Malformed`] rather than panic, whatever the bytes.

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

// rtnetlink message types and the fixed headers that follow nlmsghdr.
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_GETADDR: u16 = 22;
pub const RTM_NEWTFILTER: u16 = 44;
pub const RTM_GETTFILTER: u16 = 46;
/// `struct ifinfomsg`: family, pad, type, index, flags, change.
pub const IFINFOMSG_LEN: usize = 16;
/// `struct ifaddrmsg`: family, prefix length, flags, scope, index.
pub const IFADDRMSG_LEN: usize = 8;
/// `struct tcmsg`: family, pads, index, handle, parent, info.
pub const TCMSG_LEN: usize = 20;
pub const IFLA_ADDRESS: u16 = 1;
pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_LINK: u16 = 5;
pub const IFLA_GROUP: u16 = 27;
/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Bytes that are not the netlink message they claim to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed netlink message: {0}")]
pub struct Malformed(pub &'static str);

/// A message being written: the header now, its length at [`Msg::end`].
#[derive(Debug)]
pub struct Msg {
    start: usize,
}

impl Msg {
    /// Appends a header (port id 0: the kernel's); the caller appends the family header
    /// and the attributes.
    pub fn begin(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32) -> Msg {
        let start = out.len();
        out.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in end()
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        Msg { start }
    }

    /// Where the message's family header starts in the buffer.
    pub fn body_at(&self) -> usize {
        self.start + NLMSG_HDRLEN
    }

    pub fn end(self, out: &mut [u8]) {
        let len = (out.len() - self.start) as u32;
        out[self.start..self.start + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

/// A whole request: header, then `fixed` (the family header), then `attributes`.
pub fn request(kind: u16, flags: u16, seq: u32, fixed: &[u8], attributes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NLMSG_HDRLEN + fixed.len() + attributes.len());
    let msg = Msg::begin(&mut out, kind, flags, seq);
    out.extend_from_slice(fixed);
    out.extend_from_slice(attributes);
    msg.end(&mut out);
    out
}

/// `struct ifinfomsg` for the link with `index` (0: named by `IFLA_IFNAME` instead).
pub fn ifinfomsg(index: i32) -> [u8; IFINFOMSG_LEN] {
    let mut m = [0u8; IFINFOMSG_LEN];
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m
}

pub fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// Appends an attribute.
pub fn put(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    pad4(out);
}

/// Appends a NUL-terminated string attribute.
pub fn put_str(out: &mut Vec<u8>, kind: u16, s: &str) {
    let mut b = Vec::with_capacity(s.len() + 1);
    b.extend_from_slice(s.as_bytes());
    b.push(0);
    put(out, kind, &b);
}

/// Opens a nested attribute; [`nest_end`] closes it.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub body: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The messages of a datagram.
pub fn messages(mut data: &[u8]) -> Result<Vec<Message<'_>>, Malformed> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32_at(data, 0) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(Malformed("message length out of bounds"));
        }
        out.push(Message {
            kind: u16_at(data, 4),
            flags: u16_at(data, 6),
            seq: u32_at(data, 8),
            body: &data[NLMSG_HDRLEN..len],
        });
        data = data.get((len + 3) & !3..).unwrap_or(&[]);
    }
    Ok(out)
}

/// The sequence number of the request an `NLMSG_ERROR` body answers, and its error code
/// (0: an acknowledgement; otherwise a negated errno).
pub fn error_of(body: &[u8]) -> Result<(u32, i32), Malformed> {
    // struct nlmsgerr: int error; struct nlmsghdr msg (the request's header).
    if body.len() < 4 + NLMSG_HDRLEN {
        return Err(Malformed("short error message"));
    }
    let code = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
    Ok((u32_at(body, 4 + 8), code))
}

/// (sequence number, error code) of every `NLMSG_ERROR` message in a datagram.
pub fn acks(data: &[u8]) -> Result<Vec<(u32, i32)>, Malformed> {
    messages(data)?
        .into_iter()
        .filter(|m| m.kind == NLMSG_ERROR)
        .map(|m| error_of(m.body))
        .collect()
}

/// The attributes in `data`: (type without the nested and byte-order flags, payload).
pub fn attrs(mut data: &[u8]) -> Result<Vec<(u16, &[u8])>, Malformed> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16_at(data, 0) as usize;
        let kind = u16_at(data, 2) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return Err(Malformed("attribute length out of bounds"));
        }
        out.push((kind, &data[4..len]));
        data = data.get((len + 3) & !3..).unwrap_or(&[]);
    }
    Ok(out)
}

/// A NUL-terminated string attribute (lossy UTF-8).
pub fn attr_str(payload: &[u8]) -> String {
    let raw = payload.split(|b| *b == 0).next().unwrap_or(&[]);
    String::from_utf8_lossy(raw).into_owned()
}

/// A 4-byte attribute in host order.
pub fn attr_u32(payload: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(payload).ok().map(u32::from_ne_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_and_errors_are_read_by_sequence() {
        let mut d = Vec::new();
        for (seq, code) in [(7u32, 0i32), (8, -2)] {
            let mut body = code.to_ne_bytes().to_vec();
            body.extend_from_slice(&request(16, 0, seq, &[], &[]));
            d.extend_from_slice(&request(NLMSG_ERROR, 0, 1, &body, &[]));
        }
        assert_eq!(acks(&d).unwrap(), vec![(7, 0), (8, -2)]);
        for end in 0..d.len() {
            let _ = acks(&d[..end]); // never panics
        }
        let mut bad = d.clone();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(acks(&bad).is_err());
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
        assert_eq!(attrs(top[1].1).unwrap(), vec![(3, &[1u8, 2, 3][..])]);
        let mut bad = out.clone();
        bad[0..2].copy_from_slice(&200u16.to_ne_bytes());
        assert!(attrs(&bad).is_err());
        for end in 0..out.len() {
            let _ = attrs(&out[..end]);
        }
    }

    #[test]
    fn a_request_carries_its_length_and_headers() {
        let mut attrs_buf = Vec::new();
        put_str(&mut attrs_buf, IFLA_IFNAME, "eth0");
        let r = request(RTM_GETLINK, NLM_F_REQUEST, 9, &ifinfomsg(4), &attrs_buf);
        let m = messages(&r).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].kind, m[0].flags, m[0].seq),
            (RTM_GETLINK, NLM_F_REQUEST, 9)
        );
        assert_eq!(m[0].body.len(), IFINFOMSG_LEN + 12);
        assert_eq!(i32::from_ne_bytes(m[0].body[4..8].try_into().unwrap()), 4);
        let a = attrs(&m[0].body[IFINFOMSG_LEN..]).unwrap();
        assert_eq!((a[0].0, attr_str(a[0].1).as_str()), (IFLA_IFNAME, "eth0"));
    }
}

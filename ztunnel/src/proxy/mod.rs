//! The listeners: outbound capture, inbound HBONE, inbound plaintext; and the socket factory.

mod socket;

pub use socket::{canonical, original_dst, SocketError, SocketFactory};

//! Byte relays with half-close and live counters.
//!
//! The relays are plain structs polled by hand rather than `async fn`s: a relay lives as long
//! as its connection, in the connection's task, and a hand-written state machine holds only
//! the sockets, the streams and one small state per direction (about 200 bytes) where the
//! equivalent `async` code kept every nested future's state (readiness waits, `write_all`,
//! `try_join!`: 700+ bytes), for each of 10,000 open connections.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::h2_io;

/// Read buffers hold memory only while data moves: each direction waits for its socket to be
/// readable without a buffer, reads into one of `MIN_CHUNK` bytes, doubles it (up to
/// `MAX_CHUNK`) while reads fill it (bulk transfer) and gives it back after a read that does
/// not. An idle connection thus holds no relay buffer (10,000 idle connections would otherwise
/// keep 10,000 partly touched 128 KiB buffers).
const MIN_CHUNK: usize = 8 * 1024;
/// Largest read per direction (bulk transfers).
const MAX_CHUNK: usize = 128 * 1024;

/// An adaptive read buffer (see [`MIN_CHUNK`]).
struct ReadBuf {
    buf: BytesMut,
    /// The next read's size (u32: the relays live as long as their connections, their state
    /// is kept small).
    size: u32,
    /// The last read filled the buffer.
    full: bool,
}

impl ReadBuf {
    fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            size: MIN_CHUNK as u32,
            full: false,
        }
    }

    /// Reads what `tcp` holds (call after readiness, so an idle connection waits without a
    /// buffer). Through `poll_read`, which clears the socket's readiness after a short read:
    /// the receive queue is drained, and the next read waits for epoll instead of making a
    /// `recvfrom` that only says "would block" (one syscall per request-response exchange).
    /// Pending when the readiness was spurious; the buffer is given back then.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
    ) -> Poll<std::io::Result<usize>> {
        self.buf.reserve(self.size as usize);
        let room = self.buf.capacity() - self.buf.len();
        match tokio_util::io::poll_read_buf(Pin::new(tcp), cx, &mut self.buf) {
            Poll::Ready(Ok(n)) => {
                self.full = n == room;
                if self.full {
                    self.size = (self.size * 2).min(MAX_CHUNK as u32);
                } else {
                    self.size = (self.size / 2).max(MIN_CHUNK as u32);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                self.release();
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    /// Whether the last read filled the buffer (more is likely queued: keep it).
    fn bulk(&self) -> bool {
        self.full
    }

    /// Gives the allocation back (bytes already split off keep theirs until dropped).
    fn release(&mut self) {
        self.buf = BytesMut::new();
    }
}

/// Writes `buf` to `wr`; `Ok(0)` from the socket is an error (as `write_all`'s).
fn poll_write_some(
    wr: &mut TcpStream,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<std::io::Result<usize>> {
    let n = ready!(Pin::new(wr).poll_write(cx, buf))?;
    if n == 0 {
        return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
    }
    Poll::Ready(Ok(n))
}

/// Whether `e` is a peer ending its connection abruptly (a reset, or a write after it went
/// away) rather than a fault of the relay. A connection may end that way at any time: it ends
/// the direction that saw it (a read as end of stream, a write as nothing left to deliver)
/// and lets the other one finish, so an application's RST reaches the HBONE peer as an end of
/// stream, as Istio's ztunnel passes it on, and not as a cancelled stream that its server
/// logs as an error.
fn ungraceful(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | BrokenPipe | NotConnected | UnexpectedEof
    )
}

/// Combines two directions: any error ends both (as `try_join!`), done when both are.
fn join(a: Poll<std::io::Result<()>>, b: Poll<std::io::Result<()>>) -> Poll<std::io::Result<()>> {
    match (a, b) {
        (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
        (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
        _ => Poll::Pending,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for data (from the socket or the stream).
    Read,
    /// Passing on what was read.
    Write,
    /// The source ended: passing the half-close on.
    Close,
    Done,
}

/// TCP -> HBONE stream.
struct ToH2 {
    /// Holds what is left to send of the last read (chunks are split off it as the stream
    /// gets capacity).
    rb: ReadBuf,
    /// The last read's size (counted once all is sent; at most `MAX_CHUNK`).
    n: u32,
    phase: Phase,
}

impl ToH2 {
    fn new() -> Self {
        Self {
            rb: ReadBuf::new(),
            n: 0,
            phase: Phase::Read,
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        tcp: &mut TcpStream,
        send: &mut SendStream<Bytes>,
        count: &AtomicU64,
    ) -> Poll<std::io::Result<()>> {
        loop {
            match self.phase {
                Phase::Read => {
                    ready!(tcp.poll_read_ready(cx))?;
                    let n = match ready!(self.rb.poll_fill(cx, tcp)) {
                        Ok(n) => n,
                        // Reset by the application: an end of stream like a FIN.
                        Err(e) if ungraceful(&e) => 0,
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                    if n == 0 {
                        self.phase = Phase::Close;
                        continue;
                    }
                    self.n = n as u32;
                    self.phase = Phase::Write;
                }
                Phase::Write => {
                    while !self.rb.buf.is_empty() {
                        let len = self.rb.buf.len();
                        send.reserve_capacity(len);
                        let cap = match ready!(send.poll_capacity(cx)) {
                            Some(r) => r.map_err(h2_io)?,
                            // The peer no longer reads this stream: nothing more to send.
                            None => {
                                self.rb.release();
                                self.phase = Phase::Done;
                                return Poll::Ready(Ok(()));
                            }
                        };
                        if cap == 0 {
                            continue;
                        }
                        let chunk = self.rb.buf.split_to(cap.min(len)).freeze();
                        send.send_data(chunk, false).map_err(h2_io)?;
                    }
                    if !self.rb.bulk() {
                        self.rb.release();
                    }
                    count.fetch_add(self.n as u64, Ordering::Relaxed);
                    self.phase = Phase::Read;
                }
                Phase::Close => {
                    send.send_data(Bytes::new(), true).map_err(h2_io)?;
                    self.rb.release();
                    self.phase = Phase::Done;
                }
                Phase::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// HBONE stream -> TCP.
struct FromH2 {
    /// What is left to write of the last DATA frame.
    data: Bytes,
    /// Its size (flow-control capacity released and counted once all is written; at most
    /// the largest frame, `MAX_FRAME`).
    n: u32,
    phase: Phase,
}

impl FromH2 {
    fn new() -> Self {
        Self {
            data: Bytes::new(),
            n: 0,
            phase: Phase::Read,
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        recv: &mut RecvStream,
        tcp: &mut TcpStream,
        count: &AtomicU64,
    ) -> Poll<std::io::Result<()>> {
        loop {
            match self.phase {
                Phase::Read => match ready!(recv.poll_data(cx)) {
                    Some(r) => {
                        self.data = r.map_err(h2_io)?;
                        self.n = self.data.len() as u32;
                        self.phase = Phase::Write;
                    }
                    None => self.phase = Phase::Close,
                },
                Phase::Write => {
                    while !self.data.is_empty() {
                        match ready!(poll_write_some(tcp, cx, &self.data)) {
                            Ok(n) => self.data.advance(n),
                            // The application went away: nobody is left to deliver to.
                            Err(e) if ungraceful(&e) => {
                                self.data = Bytes::new();
                                self.phase = Phase::Done;
                                return Poll::Ready(Ok(()));
                            }
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    self.data = Bytes::new();
                    let _ = recv.flow_control().release_capacity(self.n as usize);
                    count.fetch_add(self.n as u64, Ordering::Relaxed);
                    self.phase = Phase::Read;
                }
                Phase::Close => {
                    match ready!(Pin::new(&mut *tcp).poll_shutdown(cx)) {
                        Ok(()) => {}
                        // Already gone: its side is closed anyway.
                        Err(e) if ungraceful(&e) => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    self.phase = Phase::Done;
                }
                Phase::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// A relay between a TCP connection and an HBONE stream (see [`relay_h2`]).
pub struct H2Relay {
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    up: ToH2,
    down: FromH2,
}

impl H2Relay {
    pub fn new(tcp: TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            tcp,
            send,
            recv,
            up: ToH2::new(),
            down: FromH2::new(),
        }
    }

    /// Moves bytes both ways; ready once both directions finished or either failed. `up`
    /// counts TCP -> stream bytes, `down` stream -> TCP.
    pub fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        up: &AtomicU64,
        down: &AtomicU64,
    ) -> Poll<std::io::Result<()>> {
        let a = self.up.poll(cx, &mut self.tcp, &mut self.send, up);
        if let Poll::Ready(Err(e)) = a {
            return Poll::Ready(Err(e));
        }
        let b = self.down.poll(cx, &mut self.recv, &mut self.tcp, down);
        join(a, b)
    }
}

/// Relays between a TCP connection and an HBONE stream until both directions finished.
/// `up` counts TCP -> stream bytes, `down` stream -> TCP. Any error ends both directions
/// (dropping the stream resets it).
pub async fn relay_h2(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    up: &AtomicU64,
    down: &AtomicU64,
) -> std::io::Result<()> {
    let mut r = H2Relay::new(tcp, send, recv);
    poll_fn(|cx| r.poll_relay(cx, up, down)).await
}

/// One direction of a TCP -> TCP relay.
struct CopyHalf {
    rb: ReadBuf,
    /// How much of `rb.buf` is written (at most `MAX_CHUNK`).
    pos: u32,
    phase: Phase,
}

impl CopyHalf {
    fn new() -> Self {
        Self {
            rb: ReadBuf::new(),
            pos: 0,
            phase: Phase::Read,
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        rd: &mut TcpStream,
        wr: &mut TcpStream,
        count: &AtomicU64,
    ) -> Poll<std::io::Result<()>> {
        loop {
            match self.phase {
                Phase::Read => {
                    ready!(rd.poll_read_ready(cx))?;
                    let n = match ready!(self.rb.poll_fill(cx, rd)) {
                        Ok(n) => n,
                        Err(e) if ungraceful(&e) => 0,
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                    if n == 0 {
                        self.rb.release();
                        self.phase = Phase::Close;
                    } else {
                        self.pos = 0;
                        self.phase = Phase::Write;
                    }
                }
                Phase::Write => {
                    while (self.pos as usize) < self.rb.buf.len() {
                        match ready!(poll_write_some(wr, cx, &self.rb.buf[self.pos as usize..])) {
                            Ok(n) => self.pos += n as u32,
                            Err(e) if ungraceful(&e) => {
                                self.rb.release();
                                self.phase = Phase::Done;
                                return Poll::Ready(Ok(()));
                            }
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    count.fetch_add(self.pos as u64, Ordering::Relaxed);
                    self.rb.buf.clear();
                    if !self.rb.bulk() {
                        self.rb.release();
                    }
                    self.phase = Phase::Read;
                }
                Phase::Close => {
                    match ready!(Pin::new(&mut *wr).poll_shutdown(cx)) {
                        Ok(()) => {}
                        Err(e) if ungraceful(&e) => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    self.phase = Phase::Done;
                }
                Phase::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// A relay between two TCP connections (see [`relay_tcp`]).
pub struct TcpRelay {
    a: TcpStream,
    b: TcpStream,
    ab: CopyHalf,
    ba: CopyHalf,
}

impl TcpRelay {
    pub fn new(a: TcpStream, b: TcpStream) -> Self {
        Self {
            a,
            b,
            ab: CopyHalf::new(),
            ba: CopyHalf::new(),
        }
    }

    /// Moves bytes both ways with half-close; ready once both directions finished or either
    /// failed.
    pub fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        a_to_b: &AtomicU64,
        b_to_a: &AtomicU64,
    ) -> Poll<std::io::Result<()>> {
        let x = self.ab.poll(cx, &mut self.a, &mut self.b, a_to_b);
        if let Poll::Ready(Err(e)) = x {
            return Poll::Ready(Err(e));
        }
        let y = self.ba.poll(cx, &mut self.b, &mut self.a, b_to_a);
        join(x, y)
    }
}

/// Relays between two TCP connections with half-close; `a_to_b` and `b_to_a` count bytes.
pub async fn relay_tcp(
    a: TcpStream,
    b: TcpStream,
    a_to_b: &AtomicU64,
    b_to_a: &AtomicU64,
) -> std::io::Result<()> {
    let mut r = TcpRelay::new(a, b);
    poll_fn(|cx| r.poll_relay(cx, a_to_b, b_to_a)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn tcp_relay_passes_half_close_and_counts_both_ways() {
        // client <-> (a relay b) <-> server
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let (ab, ba) = (AtomicU64::new(0), AtomicU64::new(0));
        let relay = relay_tcp(a, b, &ab, &ba);
        let peers = async {
            let big = vec![7u8; 1 << 20];
            client.write_all(&big).await.unwrap();
            client.shutdown().await.unwrap(); // half-close
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, big);
            // The other direction still works after the half-close.
            server.write_all(b"reply").await.unwrap();
            server.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"reply");
        };
        let (r, ()) = tokio::join!(relay, peers);
        r.unwrap();
        assert_eq!(ab.load(Ordering::Relaxed), 1 << 20);
        assert_eq!(ba.load(Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_cleanly_and_reaches_the_other_side_as_end_of_stream() {
        let (client, a) = pair().await;
        let (b, mut server) = pair().await;
        let (ab, ba) = (AtomicU64::new(0), AtomicU64::new(0));
        let relay = relay_tcp(a, b, &ab, &ba);
        let peers = async {
            let mut client = client.into_std().unwrap();
            std::io::Write::write_all(&mut client, b"abc").unwrap();
            let mut got = [0u8; 3];
            server.read_exact(&mut got).await.unwrap();
            // The client aborts: SO_LINGER 0 and close send an RST.
            client.set_nonblocking(false).unwrap();
            let sock = socket2::SockRef::from(&client);
            sock.set_linger(Some(std::time::Duration::ZERO)).unwrap();
            drop(client);
            // The server sees an end of stream (its writes towards the client are dropped).
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            server.write_all(b"late").await.unwrap();
            server.shutdown().await.unwrap();
        };
        let (r, ()) = tokio::join!(relay, peers);
        r.expect("a reset is an end, not a relay error");
        assert_eq!(ab.load(Ordering::Relaxed), 3);
    }
}

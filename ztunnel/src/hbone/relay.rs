//! Byte relays with half-close and live counters.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncWrite, AsyncWriteExt};
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
    size: usize,
    /// The last read filled the buffer.
    full: bool,
}

impl ReadBuf {
    fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            size: MIN_CHUNK,
            full: false,
        }
    }

    /// Reads what `tcp` holds without waiting (call after readiness). `None` when the
    /// readiness was spurious. The bytes read are at the end of `self.buf`.
    fn try_read(&mut self, tcp: &TcpStream) -> std::io::Result<Option<usize>> {
        self.buf.reserve(self.size);
        let room = self.buf.capacity() - self.buf.len();
        match tcp.try_read_buf(&mut self.buf) {
            Ok(n) => {
                self.full = n == room;
                if self.full {
                    self.size = (self.size * 2).min(MAX_CHUNK);
                } else {
                    self.size = (self.size / 2).max(MIN_CHUNK);
                }
                Ok(Some(n))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.release();
                Ok(None)
            }
            Err(e) => Err(e),
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

async fn read_to_h2(
    tcp: &TcpStream,
    send: &mut SendStream<Bytes>,
    count: &AtomicU64,
) -> std::io::Result<()> {
    let mut rb = ReadBuf::new();
    loop {
        tcp.readable().await?;
        let Some(n) = rb.try_read(tcp)? else {
            continue;
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(());
        }
        let mut data = rb.buf.split().freeze();
        if !rb.bulk() {
            rb.release();
        }
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(r) => r.map_err(h2_io)?,
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "HBONE stream closed by peer",
                    ))
                }
            };
            if cap == 0 {
                continue;
            }
            let chunk = data.split_to(cap.min(data.len()));
            send.send_data(chunk, false).map_err(h2_io)?;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn h2_to_write<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    wr: &mut W,
    count: &AtomicU64,
) -> std::io::Result<()> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let len = chunk.len();
        wr.write_all(&chunk).await?;
        let _ = recv.flow_control().release_capacity(len);
        count.fetch_add(len as u64, Ordering::Relaxed);
    }
    wr.shutdown().await
}

/// Relays between a TCP connection and an HBONE stream until both directions finished.
/// `up` counts TCP -> stream bytes, `down` stream -> TCP. Any error ends both directions
/// (dropping the stream resets it).
pub async fn relay_h2(
    mut tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    up: &AtomicU64,
    down: &AtomicU64,
) -> std::io::Result<()> {
    let (rd, mut wr) = tcp.split();
    tokio::try_join!(
        read_to_h2(rd.as_ref(), &mut send, up),
        h2_to_write(&mut recv, &mut wr, down)
    )?;
    Ok(())
}

async fn copy_half<W: AsyncWrite + Unpin>(
    rd: &TcpStream,
    wr: &mut W,
    count: &AtomicU64,
) -> std::io::Result<()> {
    let mut rb = ReadBuf::new();
    loop {
        rd.readable().await?;
        let Some(n) = rb.try_read(rd)? else {
            continue;
        };
        if n == 0 {
            return wr.shutdown().await;
        }
        wr.write_all(&rb.buf).await?;
        rb.buf.clear();
        if !rb.bulk() {
            rb.release();
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Relays between two TCP connections with half-close; `a_to_b` and `b_to_a` count bytes.
pub async fn relay_tcp(
    mut a: TcpStream,
    mut b: TcpStream,
    a_to_b: &AtomicU64,
    b_to_a: &AtomicU64,
) -> std::io::Result<()> {
    let (ar, mut aw) = a.split();
    let (br, mut bw) = b.split();
    tokio::try_join!(
        copy_half(ar.as_ref(), &mut bw, a_to_b),
        copy_half(br.as_ref(), &mut aw, b_to_a)
    )?;
    Ok(())
}

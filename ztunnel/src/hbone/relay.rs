//! Byte relays with half-close and live counters.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::h2_io;

/// Read buffer size per direction.
const CHUNK: usize = 128 * 1024;

async fn read_to_h2<R: AsyncRead + Unpin>(
    rd: &mut R,
    send: &mut SendStream<Bytes>,
    count: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        buf.reserve(CHUNK);
        let n = rd.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(());
        }
        let mut data = buf.split().freeze();
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
    let (mut rd, mut wr) = tcp.split();
    tokio::try_join!(
        read_to_h2(&mut rd, &mut send, up),
        h2_to_write(&mut recv, &mut wr, down)
    )?;
    Ok(())
}

async fn copy_half<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    count: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return wr.shutdown().await;
        }
        wr.write_all(&buf[..n]).await?;
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
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    tokio::try_join!(
        copy_half(&mut ar, &mut bw, a_to_b),
        copy_half(&mut br, &mut aw, b_to_a)
    )?;
    Ok(())
}

//! A read buffer under TLS that holds memory only while data arrives.
//!
//! rustls reads the socket 4 KiB at a time; a buffer below it turns those into fewer, larger
//! socket reads. Unlike `tokio::io::BufReader` (a zeroed buffer of fixed size for the
//! connection's life), this one is used only during bulk transfers: reads go straight into the
//! caller's buffer until one fills it; then a buffer of our own (starting at 8 KiB, doubling
//! while reads fill it, up to `max`) serves the following reads, and it is given back when a
//! read does not fill it or would block. An idle HBONE connection holds none.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// First buffer size.
const MIN: usize = 8 * 1024;

pub struct LazyBufReader<T> {
    inner: T,
    /// Read from `inner` and not yet handed out (no capacity outside a bulk transfer).
    buf: BytesMut,
    /// The next buffered read's size.
    size: usize,
    max: usize,
    /// The last fill filled the buffer (bulk: keep it).
    full: bool,
}

impl<T> LazyBufReader<T> {
    pub fn new(inner: T, max: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            size: MIN.min(max),
            max,
            full: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn release(&mut self) {
        self.buf = BytesMut::new();
        self.full = false;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for LazyBufReader<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if !this.full {
                // Not in a bulk transfer: read straight into the caller's buffer (an idle
                // connection waits here holding no buffer of ours). Filling it means more is
                // probably queued: buffer the next reads.
                let before = out.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
                this.full = out.filled().len() > before && out.remaining() == 0;
                return Poll::Ready(Ok(()));
            }
            // The buffer is empty: this reuses its allocation when nothing else holds it,
            // and the read goes into uninitialised room (no zeroing of up to `max` bytes).
            this.buf.reserve(this.size);
            let room = this.buf.capacity();
            let n =
                match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                    Poll::Pending => {
                        // The burst is over: wait without the buffer.
                        this.release();
                        return Poll::Pending;
                    }
                    Poll::Ready(r) => r?,
                };
            this.full = n > 0 && n == room;
            if this.full {
                this.size = (this.size * 2).min(this.max);
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() && !this.full {
            this.release();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for LazyBufReader<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_and_bulk_reads_arrive_in_order_and_idle_holds_nothing() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut r = LazyBufReader::new(a, 64 * 1024);
        // Small messages, read 4 KiB at a time as rustls does.
        b.write_all(b"hello").await.unwrap();
        let mut small = [0u8; 4096];
        let n = r.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"hello");
        assert_eq!(
            r.buf.capacity(),
            0,
            "drained after a short fill: no buffer held"
        );
        // Bulk: 300 KiB written, read back in 4 KiB reads.
        let data: Vec<u8> = (0..300 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        let w = {
            let data = data.clone();
            tokio::spawn(async move {
                b.write_all(&data).await.unwrap();
                b.shutdown().await.unwrap();
            })
        };
        let mut got = Vec::new();
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        w.await.unwrap();
        assert_eq!(got, data);
        assert_eq!(
            r.buf.capacity(),
            0,
            "the end of the burst gave the buffer back"
        );
        assert!(
            r.size > MIN && r.size <= 64 * 1024,
            "grew for the bulk reads"
        );
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut r = LazyBufReader::new(a, 64 * 1024);
        r.write_all(b"up").await.unwrap();
        r.flush().await.unwrap();
        let mut got = [0u8; 2];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"up");
    }
}

//! The accept loop of every listener in the long-lived processes.
//!
//! `accept` fails for reasons that do not go away on the next call: EMFILE and ENFILE (out
//! of file descriptors), ENOBUFS and ENOMEM. Retrying at once spins a core on the same
//! error and floods the log, so [`accept`] waits after each failure, doubling from
//! [`AcceptBackoff::MIN`] to [`AcceptBackoff::MAX`] while the failures go on; a successful
//! accept resets the wait.

use std::future::Future;
use std::io;
use std::time::Duration;

/// The wait policy after failed accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptBackoff {
    next: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self { next: Self::MIN }
    }
}

impl AcceptBackoff {
    pub const MIN: Duration = Duration::from_millis(5);
    pub const MAX: Duration = Duration::from_secs(1);

    /// An accept failed: how long to wait before the next one.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        wait
    }

    /// An accept succeeded.
    pub fn succeeded(&mut self) {
        self.next = Self::MIN;
    }
}

/// A listening socket: tokio's TCP and unix listeners.
pub trait Listen {
    type Stream;
    type Addr;
    fn accept_once(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send;
}

impl Listen for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    fn accept_once(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send {
        self.accept()
    }
}

impl Listen for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    fn accept_once(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send {
        self.accept()
    }
}

/// The next connection of `listener`. Failures are logged with `what` (the listener's
/// name) and retried after `backoff`'s wait; this returns only with a connection.
pub async fn accept<L: Listen>(
    listener: &L,
    backoff: &mut AcceptBackoff,
    what: &str,
) -> (L::Stream, L::Addr) {
    loop {
        match listener.accept_once().await {
            Ok(conn) => {
                backoff.succeeded();
                return conn;
            }
            Err(e) => {
                let wait = backoff.failed();
                tracing::warn!(listener = what, error = %e, retry_in = ?wait, "accept failed");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let ms = Duration::from_millis;
        let mut b = AcceptBackoff::default();
        let waits: Vec<_> = (0..10).map(|_| b.failed()).collect();
        assert_eq!(
            waits,
            [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000].map(ms)
        );
        b.succeeded();
        assert_eq!(b.failed(), ms(5));
    }

    /// A listener out of file descriptors: `fail` EMFILEs, then a connection.
    struct Exhausted {
        calls: AtomicUsize,
        fail: usize,
    }

    impl Listen for Exhausted {
        type Stream = ();
        type Addr = ();
        async fn accept_once(&self) -> io::Result<((), ())> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail {
                Err(io::Error::from_raw_os_error(24)) // EMFILE
            } else {
                Ok(((), ()))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn emfile_is_retried_after_a_growing_wait_not_in_a_spin() {
        let l = Exhausted {
            calls: AtomicUsize::new(0),
            fail: 12,
        };
        let mut backoff = AcceptBackoff::default();
        let start = tokio::time::Instant::now();
        accept(&l, &mut backoff, "test").await;
        assert_eq!(l.calls.load(Ordering::SeqCst), 13);
        // 5+10+...+640 ms, then four waits at the 1 s cap.
        assert_eq!(start.elapsed(), Duration::from_millis(1275 + 4000));
        assert_eq!(backoff, AcceptBackoff::default(), "reset by the success");
    }
}
